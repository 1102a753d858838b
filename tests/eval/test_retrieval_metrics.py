from __future__ import annotations

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


def test_random_features_give_chance_recall():
    n_images, captions_per_image = 400, 5
    owners = torch.arange(n_images).repeat_interleave(captions_per_image)
    metrics = retrieval_metrics(_random(n_images, 64, 1), _random(n_images * captions_per_image, 64, 2), owners)
    # text->image: K / I. image->text: 1 - C(T-5, K) / C(T, K) ~ 1 - (1 - 5/T)^K.
    assert abs(metrics["text_to_image_R@10"] - 100 * 10 / n_images) < 1.0
    expected_i2t = 100 * (1 - (1 - captions_per_image / (n_images * captions_per_image)) ** 10)
    assert abs(metrics["image_to_text_R@10"] - expected_i2t) < 2.0


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
    assert len(six) == 6 and abs(metrics["mean_recall"] - sum(six) / 6) < 1e-9
