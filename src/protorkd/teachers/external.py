"""A teacher cache as ProtoCLIP's `--external-teacher` array: per corpus row, L2-normalised, reduced by an exact PCA.

ProtoCLIP's `src/utils/RoBERTa.py` mean-pools RoBERTa-large's token features, L2-normalises each caption's
feature, fits faiss' `PCAMatrix(1024, 64)` on the features of every CSV row and saves the projected rows. Here
the teacher is any cached one (`protorkd cache-teacher`), pooled as that teacher pools (see docs/method.md,
"external teacher"); the rest is ProtoCLIP's: the rows are L2-normalised (`normalize=False` keeps them raw), and
the PCA is faiss' `PCAMatrix`, an exact eigendecomposition of the covariance of the rows (each corpus row
counted once, so a caption that occurs twice weighs twice). faiss trains a PCA on at most
`max_points_per_d` x D rows (1000 x D) and subsamples larger inputs with a fixed seed; so as not to hold more
than that in memory, larger corpora are subsampled here first, with the run's seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protorkd.errors import UsageError
from protorkd.io import atomic_path
from protorkd.teachers.cache import TeacherFeatures, read_manifest, write_manifest

FAISS_MAX_POINTS_PER_D = 1000  # faiss.PCAMatrix().max_points_per_d: the most training rows per input dimension


def l2_normalized(rows: np.ndarray) -> np.ndarray:
    """[n, D] float32 rows divided by their L2 norms (torch's F.normalize: norms below 1e-12 count as 1e-12)."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-12))
    return rows / norms


@dataclass(frozen=True)
class FeaturePCA:
    """A PCA as faiss' `PCAMatrix` fits it: `apply(x) = (x - mean) @ components` (faiss' A x + b), after an L2
    normalisation of x when `normalized` (the rows it was fitted on were normalised)."""

    mean: np.ndarray  # [D] float32
    components: np.ndarray  # [D, d] float32: faiss' A transposed, the leading eigenvectors as columns
    explained_variance: np.ndarray  # [d] variance of the training rows along each component
    total_variance: float  # the training rows' total variance (the trace of their covariance)
    normalized: bool

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    def apply(self, rows: np.ndarray) -> np.ndarray:
        """[n, D] -> [n, d] float32."""
        rows = l2_normalized(rows) if self.normalized else np.asarray(rows, dtype=np.float32)
        return (rows - self.mean) @ self.components

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything as arrays, for `np.savez`."""
        return {
            "mean": self.mean,
            "components": self.components,
            "explained_variance": self.explained_variance,
            "total_variance": np.asarray(self.total_variance),
            "normalized": np.asarray(self.normalized),
        }


def fit_pca(rows: np.ndarray, dim: int, *, normalize: bool = True) -> FeaturePCA:
    """faiss' exact PCA of [n, D] rows (L2-normalised first with `normalize`, as ProtoCLIP) to `dim` components."""
    import faiss  # imported here so that reading a cache does not load faiss

    if not 1 <= dim <= rows.shape[1]:
        raise UsageError(f"--pca-dim {dim}: must be between 1 and the feature width {rows.shape[1]}")
    data = l2_normalized(rows) if normalize else np.ascontiguousarray(rows, dtype=np.float32)
    pca = faiss.PCAMatrix(data.shape[1], dim)
    pca.train(np.ascontiguousarray(data))
    n = min(len(data), pca.max_points_per_d * data.shape[1])  # the rows faiss trained on
    eigenvalues = faiss.vector_to_array(pca.eigenvalues).astype(np.float64) / n  # faiss: of X^T X, not of X^T X / n
    return FeaturePCA(
        mean=faiss.vector_to_array(pca.mean).astype(np.float32),
        components=np.ascontiguousarray(faiss.vector_to_array(pca.A).reshape(dim, data.shape[1]).T),
        explained_variance=eigenvalues[:dim],
        total_variance=float(eigenvalues.sum()),
        normalized=normalize,
    )


def training_rows(cache: TeacherFeatures, *, seed: int = 0) -> np.ndarray:
    """[n, D] float32 features of the cache's corpus rows (each row once, unreadable ones left out), at most
    faiss' 1000 x D: a larger corpus is subsampled without replacement with `seed`."""
    usable = np.setdiff1d(np.arange(len(cache.rows)), np.fromiter(cache.bad_rows, dtype=np.int64))
    limit = FAISS_MAX_POINTS_PER_D * cache.dim
    if len(usable) > limit:
        usable = np.sort(np.random.default_rng(seed).choice(usable, limit, replace=False))
    return np.asarray(cache.features[cache.rows[usable]], dtype=np.float32)


def save_pca(cache: TeacherFeatures, pca: FeaturePCA) -> Path:
    """Store a PCA beside the cache (`pca-<dim>.npz`, `pca-<dim>-raw.npz` without normalisation) and record it
    in the manifest."""
    name = f"pca-{pca.dim}" + ("" if pca.normalized else "-raw")
    path = cache.folder / f"{name}.npz"
    with atomic_path(path) as tmp:
        np.savez(tmp, **pca.arrays())
    manifest = read_manifest(cache.folder) or {}
    manifest.setdefault("pca", {})[name.removeprefix("pca-")] = {
        "file": path.name,
        "normalized": pca.normalized,
        "explained_variance_ratio": float(pca.explained_variance.sum() / max(pca.total_variance, 1e-12)),
    }
    write_manifest(cache.folder, manifest)
    return path


def export_rows(
    cache: TeacherFeatures, path: Path, *, pca: FeaturePCA | None = None, normalize: bool = True, chunk: int = 65536
) -> Path:
    """Write [N corpus rows, d] float32 features as a .npy file: projected by `pca` when given (which normalises
    them if it was fitted on normalised rows), else L2-normalised with `normalize`, else as cached.

    This is the per-row layout ProtoCLIP's `--external-teacher` reads. Written to a temporary file, then renamed.
    """
    path = Path(path)
    width = cache.dim if pca is None else pca.dim
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(cache.rows), width))
        for start in range(0, len(cache.rows), chunk):
            block = np.asarray(cache.features[cache.rows[start : start + chunk]], dtype=np.float32)
            if pca is not None:
                block = pca.apply(block)
            elif normalize:
                block = l2_normalized(block)
            out[start : start + len(block)] = block
        out.flush()
        del out
    return path
