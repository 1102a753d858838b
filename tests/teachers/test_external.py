"""The external-teacher export: ProtoCLIP's `src/utils/RoBERTa.py` (L2 normalisation, faiss PCAMatrix) on a cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protorkd.teachers.cache import build_teacher_cache
from protorkd.teachers.external import export_rows, fit_pca, save_pca, training_rows


def protoclip_external_features(features_per_row: np.ndarray, dim: int) -> np.ndarray:
    """ProtoCLIP's RoBERTa.py after the pooling, transcribed: F.normalize each row's feature (stored in a float64
    array), then its PCA(dim, feature): faiss.PCAMatrix trained on all rows and applied to them."""
    import faiss

    all_text_features = np.zeros([len(features_per_row), features_per_row.shape[1]])
    all_text_features[:] = F.normalize(torch.from_numpy(features_per_row), dim=-1).numpy()
    feature = all_text_features.astype(np.float32)
    pca = faiss.PCAMatrix(feature.shape[1], dim)
    pca.train(feature)
    return pca.apply_py(feature)


@pytest.fixture
def cache(tmp_path):
    """A cache of 40 corpus rows over 30 distinct captions (10 captions occur twice), 8-d features of varied norm."""
    generator = np.random.default_rng(0)
    unique = (generator.normal(size=(30, 8)) * generator.uniform(0.5, 3.0, size=(30, 1))).astype(np.float16)
    keys = [f"caption {i}" for i in range(30)] + [f"caption {i}" for i in range(0, 20, 2)]
    table = {f"caption {i}": unique[i] for i in range(30)}

    def encode(texts):
        return torch.from_numpy(np.stack([table[t] for t in texts]).astype(np.float32))

    return build_teacher_cache(
        tmp_path / "c", modality="text", keys=keys, spec={"model": "toy"}, encode=encode, dim=8, progress=False
    )


def test_export_equals_protoclips_normalised_faiss_pca_of_every_row(cache, tmp_path):
    per_row = np.asarray(cache.features[cache.rows], dtype=np.float32)  # duplicates counted, as ProtoCLIP's CSV rows
    expected = protoclip_external_features(per_row, 3)
    pca = fit_pca(training_rows(cache), 3)
    exported = np.load(export_rows(cache, tmp_path / "external.npy", pca=pca))
    assert exported.shape == (40, 3) and exported.dtype == np.float32
    np.testing.assert_allclose(exported, expected, rtol=0, atol=2e-6)
    # the explained variance is the variance of the projected rows (faiss' eigenvalues are of X^T X)
    np.testing.assert_allclose(pca.explained_variance, expected.astype(np.float64).var(axis=0), rtol=1e-5)
    normalized = per_row / np.linalg.norm(per_row, axis=1, keepdims=True)
    assert pca.total_variance == pytest.approx(normalized.astype(np.float64).var(axis=0).sum(), rel=1e-5)


def test_export_without_normalisation_is_faiss_pca_of_the_raw_rows_and_without_pca_the_rows(cache, tmp_path):
    import faiss

    per_row = np.asarray(cache.features[cache.rows], dtype=np.float32)
    reference = faiss.PCAMatrix(8, 2)
    reference.train(per_row)
    pca = fit_pca(training_rows(cache), 2, normalize=False)
    raw = np.load(export_rows(cache, tmp_path / "raw.npy", pca=pca, normalize=False))
    np.testing.assert_allclose(raw, reference.apply_py(per_row), rtol=0, atol=1e-5)
    rows = np.load(export_rows(cache, tmp_path / "rows.npy", pca=None, normalize=True))
    np.testing.assert_allclose(rows, per_row / np.linalg.norm(per_row, axis=1, keepdims=True), rtol=1e-6, atol=0)
    as_cached = np.load(export_rows(cache, tmp_path / "cached.npy", pca=None, normalize=False))
    np.testing.assert_array_equal(as_cached, per_row)


def test_saved_pca_records_its_normalisation_and_explained_share(cache):
    pca = fit_pca(training_rows(cache), 3)
    path = save_pca(cache, pca)
    assert path.name == "pca-3.npz"
    stored = np.load(path)
    np.testing.assert_array_equal(stored["components"], pca.components)
    assert bool(stored["normalized"])
    record = json.loads((cache.folder / "manifest.json").read_text())["pca"]["3"]
    assert record["normalized"] is True
    assert record["explained_variance_ratio"] == pytest.approx(pca.explained_variance.sum() / pca.total_variance)
    assert save_pca(cache, fit_pca(training_rows(cache), 3, normalize=False)).name == "pca-3-raw.npz"


def test_training_rows_are_every_corpus_row_up_to_faiss_limit(cache, monkeypatch):
    import faiss

    import protorkd.teachers.external as external

    assert external.FAISS_MAX_POINTS_PER_D == faiss.PCAMatrix(8, 2).max_points_per_d
    assert training_rows(cache).shape == (40, 8)
    monkeypatch.setattr(external, "FAISS_MAX_POINTS_PER_D", 2)  # at most 2 x 8 = 16 rows
    sample = training_rows(cache, seed=3)
    assert sample.shape == (16, 8)
    assert np.array_equal(sample, training_rows(cache, seed=3)) and not np.array_equal(sample, training_rows(cache))
