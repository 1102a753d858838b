"""ELEVATER's metrics on cases with a known answer and against vision-evaluation's code, the validation split,
and the L-BFGS probe on separable features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protorkd.eval.elevater import zeroshot_scores
from protorkd.eval.elevater_metrics import METRICS, map_11_point, mean_per_class_accuracy, roc_auc
from protorkd.eval.elevater_probe import MULTILABEL_TOLERANCE, ProbeData, lbfgs_probe, validation_split
from protorkd.eval.logistic import LogisticRegressionProblem, standardize


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


def _vision_evaluation_map(predictions: np.ndarray, targets: np.ndarray, n_points: int = 11) -> float:
    """vision-evaluation 0.2.9's MeanAveragePrecisionNPointsEvaluator (`_calculate`, `_per_class_calc`), the
    11-point mAP the ELEVATER toolkit calls, transcribed."""
    from sklearn import metrics as sm

    def per_class(predictions, targets):
        precision, recall, _ = sm.precision_recall_curve(targets, predictions)
        recall_thresholds = np.linspace(1, 0, n_points, endpoint=True).tolist()
        precision_sum = 0
        recall_idx = 0
        precision_tmp = 0
        for threshold in recall_thresholds:
            while recall_idx < len(recall) and threshold <= recall[recall_idx]:
                precision_tmp = max(precision_tmp, precision[recall_idx])
                recall_idx += 1
            precision_sum += precision_tmp
        return precision_sum / n_points

    return float(np.mean([per_class(predictions[:, i], targets[:, i]) for i in range(predictions.shape[1])]))


def test_11_point_map_equals_vision_evaluations_on_recalls_that_land_on_the_thresholds():
    # 10 positives per class: recalls are multiples of 1/10, so some land exactly on 0.3, 0.6, 0.7, where
    # np.linspace(0, 1, 11) (0.30000000000000004, ...) and the toolkit's np.linspace(1, 0, 11) disagree
    generator = torch.Generator().manual_seed(3)
    targets = torch.zeros(40, 6)
    for c in range(6):
        targets[torch.randperm(40, generator=generator)[:10], c] = 1.0
    scores = (targets * 0.6 + torch.rand(40, 6, generator=generator)).softmax(dim=1)
    theirs = 100.0 * _vision_evaluation_map(scores.double().numpy(), targets.numpy())
    assert map_11_point(scores, targets) == theirs  # to the bit
    # the case discriminates: the ascending thresholds score these same curves lower
    from sklearn.metrics import precision_recall_curve

    ascending = []
    for c in range(6):
        precision, recall, _ = precision_recall_curve(targets[:, c].numpy(), scores[:, c].double().numpy())
        ascending.append(np.mean([precision[recall >= t].max() for t in np.linspace(0, 1, 11)]))
    assert 100.0 * float(np.mean(ascending)) < theirs - 0.01


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


def _probe_data(x_train, y_train, x_test, y_test) -> ProbeData:
    return ProbeData(x_train, y_train, x_train, y_train, x_test, y_test)


def test_lbfgs_probe_separates_separable_classes():
    x_train, y_train = _separable(6, 3)
    x_test, y_test = _separable(4, 3, seed=1)
    x_test = x_test - _separable(4, 3, seed=1)[0] + _separable(4, 3, seed=0)[0]  # same centres as train
    outcome = lbfgs_probe(
        _probe_data(x_train, y_train, x_test, y_test), metric="accuracy", multilabel=False, num_classes=3
    )
    scores = outcome.test_probabilities
    assert scores.shape == (12, 3) and torch.allclose(scores.sum(dim=1), torch.ones(12))
    assert METRICS.get("accuracy")(scores, y_test) == 100.0 and outcome.info["val_score"] == 100.0
    assert outcome.info["converged"] == 1.0


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
    outcome = lbfgs_probe(
        _probe_data(features[:30], targets[:30], features[30:], targets[30:]),
        metric="11point_mAP",
        multilabel=True,
        num_classes=3,
    )
    # one sigmoid classifier per class, scored like the toolkit's `validate`: the softmax of the logits
    assert torch.allclose(outcome.test_probabilities.sum(dim=1), torch.ones(10))
    assert map_11_point(outcome.test_probabilities, targets[30:]) == pytest.approx(100.0)
    assert outcome.info["val_score"] == pytest.approx(100.0)


@pytest.mark.parametrize("l2", [1e-5, 0.05])
def test_the_multilabel_fit_converges_to_independent_sklearn_fits_even_at_weak_l2(l2):
    from sklearn.linear_model import LogisticRegression

    generator = torch.Generator().manual_seed(0)
    n, dim, classes = 120, 12, 3
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * torch.logspace(-2, 1, dim)
    features = torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing  # ill-conditioned
    noise = 2 * torch.randn(n, classes, generator=generator, dtype=torch.float64)
    targets = (features @ torch.randn(dim, classes, generator=generator, dtype=torch.float64) + noise > 0).double()
    features = standardize(features)[0]
    problem = LogisticRegressionProblem(features, targets, classes, multilabel=True)
    weight, bias = problem.fit(l2, tolerance=MULTILABEL_TOLERANCE)  # lbfgs_probe's multi-label fits
    assert problem.converged[l2]

    def objective(weight: torch.Tensor, bias: torch.Tensor) -> float:
        logits = features @ weight.T + bias
        return float(
            F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / n + l2 / 2 * weight.square().sum()
        )

    # sklearn minimises C * sum(log-loss) + ||w||^2 / 2 per class, i.e. ours times N with C = 1 / (l2 N)
    references = [
        LogisticRegression(C=1.0 / (l2 * n), tol=1e-12, max_iter=100_000).fit(features.numpy(), targets[:, c].numpy())
        for c in range(classes)
    ]
    theirs = objective(
        torch.tensor(np.stack([r.coef_[0] for r in references])), torch.tensor([r.intercept_[0] for r in references])
    )
    assert objective(weight, bias) == pytest.approx(theirs, abs=1e-7)
    # and a fit stopped by its budget says so
    problem.fit(l2, max_iter=2)
    assert not problem.converged[l2]
