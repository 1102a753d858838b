"""Top-k hits with ties in expectation, checked by enumerating every order of the tied candidates, and the
classification metrics against sklearn."""

from __future__ import annotations

import itertools

import pytest
import torch

from protorkd.eval.ranking import accuracy_metrics, hit_probability


@pytest.mark.parametrize("better", [0, 1, 2])
@pytest.mark.parametrize("negatives", [0, 1, 3])
@pytest.mark.parametrize("positives", [1, 2, 3])
def test_hit_probability_equals_the_share_of_orders_of_the_tied_candidates_with_a_hit(better, negatives, positives):
    tied = "n" * negatives + "p" * positives
    orders = set(itertools.permutations(tied))
    for k in range(1, 7):
        with_hit = sum("p" in ("b" * better + "".join(order))[:k] for order in orders)
        expected = with_hit / len(orders)
        got = hit_probability(torch.tensor([better]), torch.tensor([negatives]), torch.tensor([positives]), k)
        assert got.item() == pytest.approx(expected, abs=1e-12), (k, expected)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_without_ties_accuracy_metrics_equal_topk_and_sklearns_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 12, generator=generator)
    labels = torch.randint(0, 11, (500,), generator=generator)  # class 11 never occurs: it does not count
    metrics = accuracy_metrics(logits, labels)
    top5 = logits.topk(5, dim=1).indices
    assert metrics["top1"] == pytest.approx(100 * (top5[:, 0] == labels).double().mean().item(), abs=1e-12)
    assert metrics["top5"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).double().mean().item(), abs=1e-12)
    reference = balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    assert metrics["mean_per_class_recall"] == pytest.approx(100 * reference, abs=1e-12)


def test_constant_logits_score_exactly_chance_and_top5_needs_five_classes():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    assert accuracy_metrics(torch.zeros(12, 10), labels) == {
        "top1": pytest.approx(10.0),
        "top5": pytest.approx(50.0),
        "mean_per_class_recall": pytest.approx(10.0),
    }
    assert accuracy_metrics(torch.zeros(4, 4), torch.tensor([0, 1, 2, 3])) == {
        "top1": 25.0,
        "mean_per_class_recall": 25.0,
    }


def test_mean_per_class_recall_weights_classes_equally():
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [1.0, 0]])  # always class 0
    assert accuracy_metrics(logits, labels) == {"top1": 75.0, "mean_per_class_recall": 50.0}
