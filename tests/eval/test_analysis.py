from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protorkd.eval.analysis import analyze, average_self_similarity, cluster_agreement, feature_statistics


def test_modality_gap_std_and_self_similarity_on_known_features():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    stats = feature_statistics(image, text)
    assert stats["modality_gap"] == pytest.approx(2**0.5)
    assert stats["image_feature_std"] == 0.0
    assert stats["image_avg_self_similarity"] == pytest.approx(1.0)


def test_average_self_similarity_equals_the_brute_force_off_diagonal_mean():
    x = F.normalize(torch.randn(50, 7, generator=torch.Generator().manual_seed(0)), dim=-1)
    sims = x @ x.T
    brute = (sims.sum() - sims.diag().sum()) / (50 * 49)
    assert average_self_similarity(x) == pytest.approx(float(brute), abs=1e-6)


def test_identical_image_and_text_clusters_agree_perfectly_and_random_ones_do_not():
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 16, generator=generator) * 5
    features = centres.repeat_interleave(30, 0) + 0.1 * torch.randn(120, 16, generator=generator)
    agreement = cluster_agreement(features, features.clone(), k=4)
    assert agreement["image_text_cluster_ari"] == pytest.approx(100.0)
    assert agreement["image_text_cluster_ami"] == pytest.approx(100.0)
    random = cluster_agreement(features, torch.randn(120, 16, generator=generator), k=4)
    assert abs(random["image_text_cluster_ari"]) < 10.0


def test_analysis_pairs_each_image_with_its_first_caption():
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    owners = torch.tensor([1, 0, 1, 2])  # image 0's first caption is row 1, image 1's is row 0
    metrics = analyze(images, texts, owners, n_clusters=2)
    assert metrics["modality_gap"] == pytest.approx(0.0, abs=1e-9)
