"""ELEVATER's metrics on cases with a known answer, and the linear probe on separable features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protorkd.eval.elevater import probe_scores, validation_split, zeroshot_scores
from protorkd.eval.elevater_metrics import METRICS, map_11_point, mean_per_class_accuracy, roc_auc
from protorkd.eval.logistic import fit_one_vs_rest


def one_hot(labels: list[int], n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), n).float()


def _perfect(metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, labels or targets) of a classifier that ranks every right answer first."""
    if metric == "roc_auc":
        binary = torch.tensor([0, 1, 1, 0])
        return one_hot(binary.tolist(), 2), binary
    if metric == "11point_mAP":
        targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]).float()
        return targets * 0.9 + 0.05, targets
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    return one_hot(labels.tolist(), 3), labels


@pytest.mark.parametrize("metric", ["accuracy", "mean-per-class", "roc_auc", "11point_mAP"])
def test_a_perfect_classifier_scores_100_on_every_metric(metric):
    expected = pytest.approx(100.0) if metric == "11point_mAP" else 100.0  # mAP sums float precisions
    assert METRICS.get(metric)(*_perfect(metric)) == expected


def test_mean_per_class_accuracy_weighs_classes_not_images():
    labels = torch.tensor([0, 0, 0, 0, 1])  # unbalanced: a majority-class guesser is 80% accurate
    always_zero = one_hot([0, 0, 0, 0, 0], 2)
    assert METRICS.get("accuracy")(always_zero, labels) == pytest.approx(80.0)
    assert mean_per_class_accuracy(always_zero, labels) == pytest.approx(50.0)  # (100 + 0) / 2
    # classes absent from the test labels do not count: 3 columns, only classes 0 and 1 present
    assert mean_per_class_accuracy(torch.tensor([[1.0, 0, 0]] * 4 + [[0, 1.0, 0]]), labels) == 100.0


def test_roc_auc_matches_a_hand_count_of_ordered_pairs():
    labels = torch.tensor([0, 0, 1, 1])
    positive_score = torch.tensor([0.1, 0.4, 0.35, 0.8])
    scores = torch.stack([1 - positive_score, positive_score], dim=1)
    # pairs (positive, negative) ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: (0.35<0.4) -> 3/4
    assert roc_auc(scores, labels) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="binary"):
        roc_auc(torch.rand(4, 3), labels)


def test_11_point_map_matches_a_hand_computation():
    # class 0, ranked: pos, neg, pos, neg -> operating points (R, P): (.5, 1), (.5, .5), (1, 2/3), (1, .5)
    #   interpolated P at R >= 0, .1 .. .5 is 1 (6 points), at .6 .. 1 it is 2/3 (5 points): AP = 28/33
    # class 1, ranked: neg, neg, pos, neg -> (0, 0), (0, 0), (1, 1/3), (1, 1/4), plus the curve's (0, 1) end
    #   point: P at R >= 0 is 1 (1 point), at .1 .. 1 it is 1/3 (10 points): AP = 13/33
    scores = torch.tensor([[0.9, 0.4], [0.8, 0.3], [0.7, 0.2], [0.6, 0.1]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 0]]).float()
    assert map_11_point(scores, targets) == pytest.approx(100 * (28 / 33 + 13 / 33) / 2)
    # a class without positives is left out of the mean
    with_empty = torch.cat([targets, torch.zeros(4, 1)], dim=1)
    assert map_11_point(torch.cat([scores, torch.rand(4, 1)], dim=1), with_empty) == pytest.approx(100 * 41 / 66)


def test_zeroshot_scores_are_softmax_of_scaled_cosines():
    features = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    classifier = torch.nn.functional.normalize(torch.randn(8, 3), dim=0)
    scores = zeroshot_scores(features, classifier)
    assert torch.allclose(scores.sum(dim=1), torch.ones(5))
    assert torch.equal(scores.argmax(dim=1), (features @ classifier).argmax(dim=1))


def test_validation_split_takes_the_first_ceil_20_percent_of_each_class_as_the_toolkit_does():
    labels = torch.tensor([1, 0, 0, 2, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 3] + [4] * 15)
    fit, val = validation_split(labels)
    # class 0 (10 images): its first 2; class 1 (5): its first 1; classes 2 and 3 (1 each): their only
    # image (the toolkit leaves them no training image); class 4 (15): its first 3
    assert val == [0, 1, 2, 3, 16, 17, 18, 19]
    assert fit == [i for i in range(len(labels)) if i not in val]


def test_multilabel_validation_split_is_the_toolkits_greedy_pass():
    targets = torch.tensor(
        [[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]]
    ).float()
    # needs: ceil(0.2 * [5, 3, 3]) = [1, 1, 1]; class 0 takes image 0 -> [0, 1, 1]; class 1 takes image 1
    # -> [-1, 0, 1]; class 2 takes image 3 -> [-2, 0, 0]: done
    assert validation_split(targets) == ([2, 4, 5, 6, 7, 8], [0, 1, 3])


def _separable(n_per_class: int, n_classes: int, dim: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=generator) * 4
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[labels] + 0.1 * torch.randn(len(labels), dim, generator=generator), labels


def test_linear_probe_separates_separable_classes():
    x_train, y_train = _separable(6, 3)
    x_test, y_test = _separable(4, 3, seed=1)
    x_test = x_test - _separable(4, 3, seed=1)[0] + _separable(4, 3, seed=0)[0]  # same centres as train
    scores, info = probe_scores(x_train, y_train, x_test, num_classes=3, metric="accuracy", multilabel=False)
    assert scores.shape == (12, 3) and torch.allclose(scores.sum(dim=1), torch.ones(12))
    assert METRICS.get("accuracy")(scores, y_test) == 100.0 and info["val_score"] == 100.0


def test_multilabel_probe_reaches_full_map_on_separable_labels_with_the_toolkits_softmax_scores():
    generator = torch.Generator().manual_seed(0)
    # one or two labels per image: their softmax scores (about 1 or 1/2) stay above every negative's
    single = torch.nn.functional.one_hot(torch.randint(0, 3, (25,), generator=generator), 3).float()
    pairs = 1.0 - torch.nn.functional.one_hot(torch.randint(0, 3, (15,), generator=generator), 3).float()
    targets = torch.cat([single, pairs])[torch.randperm(40, generator=generator)]
    features = torch.cat(
        [targets * 4 - 2 + 0.1 * torch.randn(40, 3, generator=generator), torch.randn(40, 2, generator=generator)],
        dim=1,
    )
    scores, info = probe_scores(
        features[:30], targets[:30], features[30:], num_classes=3, metric="11point_mAP", multilabel=True
    )
    # one sigmoid classifier per class, scored like the toolkit's `validate`: the softmax of the logits
    assert torch.allclose(scores.sum(dim=1), torch.ones(10))
    assert map_11_point(scores, targets[30:]) == pytest.approx(100.0) and info["val_score"] == pytest.approx(100.0)


def test_one_vs_rest_fit_equals_independent_sklearn_fits():
    from sklearn.linear_model import LogisticRegression

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    targets = (features[:, :2] + 0.8 * torch.randn(60, 2, generator=generator, dtype=torch.float64) > 0).double()
    l2 = 0.05
    weight, bias = fit_one_vs_rest(features, targets, l2, max_iter=500)
    for c in range(2):  # sklearn minimises C * sum(log-loss) + ||w||^2 / 2, i.e. ours times N with C = 1 / (l2 N)
        reference = LogisticRegression(C=1.0 / (l2 * 60), tol=1e-10, max_iter=5000)
        reference.fit(features.numpy(), targets[:, c].numpy())
        np.testing.assert_allclose(weight[c].numpy(), reference.coef_[0], atol=1e-4)
        assert bias[c].item() == pytest.approx(reference.intercept_[0], abs=1e-4)
