"""ELEVATER's metrics, as the ELEVATER toolkit computes them from a score matrix [N, C] (all in %).

- accuracy: top-1;
- mean-per-class: the mean over the classes present in the test set of each class's top-1 recall
  (caltech101, fgvc-aircraft, oxford-flowers, oxford-pets);
- roc_auc: ROC-AUC of the class-1 score (hateful-memes, a binary task);
- 11point_mAP: per class, the precision interpolated at recall 1, 0.9, ..., 0 (the best precision at any
  operating point with at least that recall, sklearn's precision-recall curve with its (recall 0,
  precision 1) end point included), averaged over the 11 points, then over the classes that have a positive
  test image (voc2007, multi-label). This is vision-evaluation 0.2.9's `MeanAveragePrecisionNPointsEvaluator`
  (the toolkit pins it), to the bit: its recall thresholds are np.linspace(1, 0, 11), whose 0.7, 0.6, 0.4, 0.3,
  0.2 and 0.1 lie one ulp from np.linspace(0, 1, 11)'s, and a recall of exactly 3/10 passes the threshold 0.3
  only from below (tests/eval/test_elevater_metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from protorkd.registry import Registry

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]

METRICS: Registry[MetricFn] = Registry("ELEVATER metric")


@METRICS.register("accuracy")
def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """scores [N, C], labels [N] -> top-1 accuracy in %."""
    return 100.0 * (scores.argmax(dim=1) == labels).double().mean().item()


@METRICS.register("mean-per-class")
def mean_per_class_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """scores [N, C], labels [N] -> mean over the classes present in `labels` of their top-1 recall, in %."""
    correct = (scores.argmax(dim=1) == labels).double()
    recalls = [correct[labels == c].mean().item() for c in labels.unique().tolist()]
    return 100.0 * float(np.mean(recalls))


@METRICS.register("roc_auc")
def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """scores [N, 2], labels [N] in {0, 1} -> ROC-AUC of the class-1 score, in %."""
    from sklearn.metrics import roc_auc_score

    if scores.shape[1] != 2:
        raise ValueError(f"roc_auc needs a binary task; got {scores.shape[1]} classes")
    return 100.0 * float(roc_auc_score(labels.numpy(), scores[:, 1].double().numpy()))


@METRICS.register("11point_mAP")
def map_11_point(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """scores [N, C], multi-hot targets [N, C] -> 11-point interpolated mAP in % (see the module docstring)."""
    from sklearn.metrics import precision_recall_curve

    thresholds = np.linspace(1, 0, 11).tolist()  # vision-evaluation's, in its order
    per_class = []
    for c in range(targets.shape[1]):
        positives = targets[:, c].numpy() > 0
        if not positives.any():
            continue
        precision, recall, _ = precision_recall_curve(positives, scores[:, c].double().numpy())
        total, index, best = 0.0, 0, 0.0
        for threshold in thresholds:  # recall falls along the curve: walk it once, keeping the best precision
            while index < len(recall) and threshold <= recall[index]:
                best = max(best, precision[index])
                index += 1
            total += best
        per_class.append(total / len(thresholds))
    return 100.0 * float(np.mean(per_class)) if per_class else float("nan")


def extra_metrics(scores: torch.Tensor, labels: torch.Tensor, *, multilabel: bool) -> dict[str, float]:
    """Every metric that applies to the task (the official one is reported as `score` besides)."""
    if multilabel:
        return {"map_11pt": map_11_point(scores, labels)}
    metrics = {"top1": accuracy(scores, labels), "mean_per_class_recall": mean_per_class_accuracy(scores, labels)}
    if scores.shape[1] == 2 and labels.unique().numel() == 2:
        metrics["roc_auc"] = roc_auc(scores, labels)
    return metrics
