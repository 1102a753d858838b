from __future__ import annotations

from math import comb

import pytest
import torch
import torch.nn.functional as F

from protorkd.eval.retrieval import retrieval_metrics


def _random(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_perfect_features_give_100_recall_at_1_with_five_captions_per_image():
    images = _random(50, 16, 0)
    owners = torch.arange(50).repeat_interleave(5)
    texts = images[owners]
    metrics = retrieval_metrics(images, texts, owners, block=7)
    assert all(value == 100.0 for value in metrics.values())


def test_a_model_whose_embeddings_are_all_equal_scores_exactly_chance():
    n_images, per_image = 40, 5
    n_texts = n_images * per_image
    owners = torch.arange(n_images).repeat_interleave(per_image)
    same = F.normalize(torch.ones(1, 8), dim=-1)
    metrics = retrieval_metrics(same.repeat(n_images, 1), same.repeat(n_texts, 1), owners, block=7)
    for k in (1, 5, 10):
        # text->image: its image among K of I at random; image->text: one of its 5 captions among K of T
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(100 * k / n_images, abs=1e-9)
        chance = 1 - comb(n_texts - per_image, k) / comb(n_texts, k)
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(100 * chance, abs=1e-9)


def test_a_tie_counts_as_half_a_hit_between_two_candidates():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 are identical
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    owners = torch.tensor([0, 2])
    metrics = retrieval_metrics(images, texts, owners, ks=(1, 2))
    # text 0 ties images 0 and 1 at the top: R@1 = (0.5 + 1) / 2, R@2 = 1
    assert metrics["text_to_image_R@1"] == 75.0 and metrics["text_to_image_R@2"] == 100.0
    # image 1 has no caption and is left out; images 0 and 2 rank their own caption first
    assert metrics["image_to_text_R@1"] == 100.0


def test_image_to_text_is_a_hit_when_any_caption_ranks_first():
    images = torch.eye(3)
    # image 0 has captions 0 and 1; caption 1 matches image 0 exactly, caption 0 matches image 1 better.
    texts = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    owners = torch.tensor([0, 0, 1, 2])
    metrics = retrieval_metrics(images, texts, owners, ks=(1,))
    assert metrics["image_to_text_R@1"] == 100.0  # image 1's best text is caption 2 (1.0 > 0.8)
    assert metrics["text_to_image_R@1"] == 75.0  # caption 0 retrieves image 1 first


def test_blocked_computation_equals_single_block_and_is_independent_of_caption_order():
    images, texts = _random(37, 8, 3), _random(111, 8, 4)
    owners = torch.randint(0, 37, (111,), generator=torch.Generator().manual_seed(5))
    owners[:37] = torch.arange(37)
    reference = retrieval_metrics(images, texts, owners, block=10_000)
    assert retrieval_metrics(images, texts, owners, block=4) == reference
    permutation = torch.randperm(111, generator=torch.Generator().manual_seed(6))
    assert retrieval_metrics(images, texts[permutation], owners[permutation], block=5) == reference


def test_mean_recall_is_the_mean_of_the_six_recalls():
    metrics = retrieval_metrics(_random(20, 8, 7), _random(40, 8, 8), torch.arange(20).repeat(2))
    six = [v for k, v in metrics.items() if "_R@" in k]
    assert len(six) == 6 and metrics["mean_recall"] == pytest.approx(sum(six) / 6, abs=1e-12)
