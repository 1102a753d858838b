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


def test_cluster_agreement_of_two_known_partitions_matches_a_hand_computed_ari():
    from sklearn.metrics import adjusted_mutual_info_score

    generator = torch.Generator().manual_seed(1)
    centres = 5 * torch.eye(16)[:4]  # four orthogonal directions: k-means (on normalised features) finds them
    image_groups = torch.arange(4).repeat_interleave(30)
    # the texts of groups 0 and 1 swap halves: text groups {0a, 1b}, {1a, 0b}, {2}, {3}, still 4 x 30
    text_groups = image_groups.clone()
    text_groups[15:30], text_groups[45:60] = 1, 0
    images = centres[image_groups] + 0.1 * torch.randn(120, 16, generator=generator)
    texts = centres[text_groups] + 0.1 * torch.randn(120, 16, generator=generator)
    agreement = cluster_agreement(images, texts, k=4)
    # contingency [[15, 15, 0, 0], [15, 15, 0, 0], [0, 0, 30, 0], [0, 0, 0, 30]]: pairs together in both
    # partitions 4 C(15, 2) + 2 C(30, 2) = 1290; in each partition 4 C(30, 2) = 1740; of C(120, 2) = 7140
    expected_pairs = 1740 * 1740 / 7140
    assert agreement["image_text_cluster_ari"] == pytest.approx(100 * (1290 - expected_pairs) / (1740 - expected_pairs))
    reference = adjusted_mutual_info_score(image_groups.numpy(), text_groups.numpy())
    assert agreement["image_text_cluster_ami"] == pytest.approx(100 * reference)
    same = cluster_agreement(images, images.clone(), k=4)
    assert same == {"image_text_cluster_ari": pytest.approx(100.0), "image_text_cluster_ami": pytest.approx(100.0)}


def test_analysis_pairs_each_image_with_its_first_caption():
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    owners = torch.tensor([1, 0, 1, 2])  # image 0's first caption is row 1, image 1's is row 0
    metrics = analyze(images, texts, owners, n_clusters=2)
    assert metrics["modality_gap"] == pytest.approx(0.0, abs=1e-9)


def test_one_captioned_image_has_no_clusters_to_compare_instead_of_a_faiss_crash():
    """Issue 25: a captions file with one captioned image crashed in faiss (k-means of 1 point into 2 clusters)."""
    one = torch.tensor([[1.0, 0.0, 0.0]])
    assert cluster_agreement(one, one, 10) == {}
    with pytest.warns(UserWarning, match="degrees of freedom"):  # the std of one feature is undefined (NaN)
        metrics = analyze(one, one, torch.tensor([0]), n_clusters=10)
    assert "modality_gap" in metrics and "image_text_cluster_ari" not in metrics
