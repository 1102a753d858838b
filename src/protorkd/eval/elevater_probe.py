"""ELEVATER's linear probe on cached features: the toolkit's own head training, or a converged L-BFGS solve.

Transcribed from the ELEVATER toolkit (Elevater_Toolkit_IC @ 00d0af7) with its `run.sh` settings for a CLIP
model (`vitb32_CLIP.yaml`, `config/default.py`), so the steps and their order are the toolkit's:

- the validation split (`validation_split`, `get_dataloader` in `evaluation/feature.py`): the first
  ceil(20 %) of each class's images in the training manifest's order (a greedy pass for multi-label);
- the search (`toolkit_search`, `hyperparameter_sweep_lr` / `hyperparameter_sweep` in
  `evaluation/full_model_finetune.py`): for each learning rate in 1e-6 ... 1e-1, the weight decay over
  np.logspace(-6, 6, 97), the 7 coarse values then [left, right] of the peak at spans 8, 4, 2, 1; a value
  replaces the peak only when strictly better, the peak starts at (-1, score 0), so a search where nothing
  scores above 0 ends at index -1 (1e6) and learning rate 0, as the toolkit's does;
- the head (`train_toolkit_head`, its `Classifier` and `train_task`): `BatchNorm1d(affine=False)` on the
  features, then a linear layer initialised with the text encoder's class embeddings (`run.sh`:
  `init_head_with_text_encoder=True`; bias 0; logit scale exp(0) = 1), trained by SGD (momentum 0.9, no
  Nesterov, the weight decay on weight and bias, a constant learning rate), batches of 64 shuffled by a
  loader seeded 0 at every run, a batch of one image skipped, cross-entropy (BCE for multi-label);
  10 epochs in the search, each scored on validation by the dataset's metric of the softmax of the logits,
  the best epoch counting; 50 in the final run (10 + `EXTRA_FINAL_TRAIN_EPOCH` 40) on train + validation;
- the 1-shot rule (`commands/linear_probe.py`): 1 shot samples 2 per class (one for validation) and the
  final run trains on the training half only;
- PatchCamelyon with all shots: the search runs on a 10,000-shot subset, the final run on the whole set.

Where we differ, and why (docs/elevater.md): the test score is that of the final run's last epoch; the
toolkit reports the best test score over the final run's epochs, which picks the epoch on the test set. That
test-selected number is kept, named `toolkit_test_selected_score`, so a run can be compared with the
toolkit's published numbers.

`lbfgs_probe` is the alternative (`--probe lbfgs`): the same split, search rule and final-run data, each
value a multinomial logistic regression (one sigmoid classifier per class for multi-label) solved to
convergence on standardised features, no learning rate, no text initialisation (a convex problem has one
optimum); a fit that does not converge is reported.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from protorkd.eval.elevater_metrics import METRICS
from protorkd.eval.logistic import LogisticRegressionProblem, Params, Standardizer, cpu_threads_for

log = logging.getLogger(__name__)
VAL_SPLIT = 0.2  # the toolkit's `val_split` in `construct_dataloader`
LEARNING_RATES = np.logspace(-6, -1, num=6).tolist()  # hyperparameter_sweep_lr
WEIGHT_DECAYS = np.logspace(-6, 6, num=97).tolist()  # SEARCH_WD_LOG_LOWER / _UPPER
COARSE_INDICES = [i for i, value in enumerate(WEIGHT_DECAYS) if value in set(np.logspace(-6, 6, num=7))]
SEARCH_EPOCHS = 10  # TRAIN.END_EPOCH of vitb32_CLIP.yaml
FINAL_EPOCHS = 50  # + TRAIN.EXTRA_FINAL_TRAIN_EPOCH 40
BATCH_SIZE = 64  # TRAIN.BATCH_SIZE_PER_GPU
MOMENTUM = 0.9
MULTILABEL_TOLERANCE = 1e-6  # L-BFGS gradient tolerance of the multi-label fits: 1e-4 stops short of sklearn's optimum


def validation_split(targets: torch.Tensor, *, fraction: float = VAL_SPLIT) -> tuple[list[int], list[int]]:
    """(fit indices, validation indices) of a training set: the toolkit's split (`get_dataloader` in its
    `evaluation/feature.py`), deterministic; both in increasing order (the toolkit's sets of indices).

    Multi-class targets [N]: per class, its first ceil(fraction * count) images in dataset order (a class
    with one image gives it to validation, as in the toolkit). Multi-label targets [N, C]: while some class
    still needs validation images (ceil of fraction * its count), the first remaining image of the lowest
    such class goes to validation and counts for each of its classes.
    """
    if targets.dim() == 1:
        labels = targets.tolist()
        val = []
        for label, count in Counter(labels).items():
            members = [i for i, x in enumerate(labels) if x == label]
            val += members[: math.ceil(count * fraction)]
    else:
        labels = targets.cpu().numpy().astype(np.float64).copy()
        needed = np.ceil(np.sum(labels, axis=0) * fraction)
        val = []
        while (needed > 0).any():
            target_class = np.where(needed > 0)[0][0]
            sample = int(np.where(labels[:, target_class] > 0)[0][0])
            val.append(sample)
            needed -= labels[sample]
            labels[sample] = 0
    chosen = set(val)
    return [i for i in range(len(targets)) if i not in chosen], sorted(chosen)


def toolkit_weight_decay_search(score: Callable[[int], float]) -> tuple[int, float]:
    """`hyperparameter_sweep`: (the peak's index into WEIGHT_DECAYS, its score); -1 when nothing scored above 0."""
    peak, peak_score = -1, 0.0
    for index in COARSE_INDICES:
        value = score(index)
        if value > peak_score:
            peak, peak_score = index, value
    span = 8
    while span > 0:
        left, right = max(peak - span, 0), min(peak + span, len(WEIGHT_DECAYS) - 1)
        for index in [i for i in (left, right) if i != peak]:
            value = score(index)
            if value > peak_score:
                peak, peak_score = index, value
        span //= 2
    return peak, peak_score


def toolkit_search(score: Callable[[float, float], float]) -> tuple[float, float, float]:
    """`hyperparameter_sweep_lr`: (learning rate, weight decay, validation score) of the first strictly best
    pair; (0, 0, 0) when no pair scored above 0. `score(lr, weight_decay)` is called once per pair."""
    best_score, best_lr, best_weight_decay = 0.0, 0.0, 0.0
    for lr in LEARNING_RATES:
        memo: dict[int, float] = {}

        def by_index(index: int, lr: float = lr, memo: dict[int, float] = memo) -> float:
            if index not in memo:
                memo[index] = score(lr, WEIGHT_DECAYS[index])
            return memo[index]

        peak, lr_score = toolkit_weight_decay_search(by_index)
        if best_score < lr_score:
            best_score, best_lr, best_weight_decay = lr_score, lr, WEIGHT_DECAYS[peak]
    return best_lr, best_weight_decay, best_score


def metric_score(metric: str, probabilities: torch.Tensor, targets: torch.Tensor) -> float:
    """The dataset's metric (%) of softmax scores, 0 where it cannot be computed (the toolkit's try/except:
    e.g. ROC-AUC on a split holding one class, or a NaN)."""
    try:
        value = METRICS.get(metric)(probabilities, targets)
    except ValueError:
        return 0.0
    return 0.0 if math.isnan(value) else value


@functools.lru_cache(maxsize=4)
def toolkit_epochs(rows: int, batch_size: int, epochs: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The batches of row numbers of each epoch of a toolkit run: `create_dataloader` makes a fresh loader per
    run, shuffling with a generator seeded 0, so every run sees the same orders; they come from a DataLoader
    itself, so they are the toolkit's on this torch whatever draws its sampler makes."""
    loader = DataLoader(range(rows), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    return tuple(tuple(loader) for _ in range(epochs))


@dataclass
class HeadRun:
    """One `train_task`: the evaluation split's score after each epoch, and its softmax scores after the last."""

    scores: list[float] = field(default_factory=list)
    last_probabilities: torch.Tensor | None = None

    @property
    def best(self) -> float:
        """The toolkit's `best_acc1`: the best epoch's score, 0 when none scored above 0."""
        return max([0.0, *self.scores])


def train_toolkit_head(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    metric: str,
    multilabel: bool,
    num_classes: int,
    text_head: torch.Tensor | None = None,
    batch_size: int = BATCH_SIZE,
) -> HeadRun:
    """The toolkit's `train_task` on features: train_x [N, D], train_y [N] or multi-hot [N, C]; eval_x [M, D].

    text_head [C, D]: the initial weight (`init_head_with_text_encoder`), else nn.Linear's own initialisation
    drawn from a stream seeded 0 (the toolkit draws it from its global stream)."""
    device = train_x.device
    norm = torch.nn.BatchNorm1d(train_x.shape[1], affine=False).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = torch.nn.Linear(train_x.shape[1], num_classes).to(device)
    if text_head is not None:
        with torch.no_grad():
            layer.weight.copy_(text_head.to(layer.weight))
            layer.bias.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay, nesterov=False)
    y = train_y.float() if multilabel else train_y.long()
    run = HeadRun()
    for batches in toolkit_epochs(len(train_x), batch_size, epochs):
        norm.train()
        for batch in batches:
            if len(batch) == 1:  # train_one: `if images.shape[0] == 1: continue`
                continue
            batch = batch.to(device)
            logits = layer(norm(train_x[batch]))
            if multilabel:
                loss = F.binary_cross_entropy_with_logits(logits, y[batch])
            else:
                loss = F.cross_entropy(logits, y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        norm.eval()
        with torch.no_grad():
            probabilities = layer(norm(eval_x)).softmax(dim=-1).cpu()  # validate: softmax for every task
        run.scores.append(metric_score(metric, probabilities, eval_y.cpu()))
        run.last_probabilities = probabilities
    if run.last_probabilities is None:
        with torch.no_grad():
            run.last_probabilities = layer(norm.eval()(eval_x)).softmax(dim=-1).cpu()
    return run


@dataclass
class ProbeOutcome:
    """Test scores [M, C] (softmax of the logits) and what the search chose."""

    test_probabilities: torch.Tensor
    info: dict[str, float]


@dataclass(frozen=True)
class ProbeData:
    """One seed's data: the search's training rows and the final run's, as features and targets."""

    search_x: torch.Tensor  # [N, D] in the (few-shot) training manifest's order
    search_y: torch.Tensor
    final_x: torch.Tensor  # the final run's training set (PatchCamelyon: the whole train split)
    final_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    merge_validation: bool = True  # the final run trains on train + validation (False for 1-shot)


def _final_rows(data: ProbeData) -> tuple[torch.Tensor, torch.Tensor]:
    """The final run's training rows: the whole (few-shot) set, or its training half (1-shot)."""
    if data.merge_validation:
        return data.final_x, data.final_y
    fit, _ = validation_split(data.final_y.cpu())
    return data.final_x[fit], data.final_y[fit]


def toolkit_probe(
    data: ProbeData,
    *,
    metric: str,
    multilabel: bool,
    num_classes: int,
    text_head: torch.Tensor | None,
) -> ProbeOutcome:
    """The toolkit's search and final run (module docstring) with its text-initialised, SGD-trained head."""
    fit, val = validation_split(data.search_y.cpu())
    fit_x, fit_y, val_x, val_y = data.search_x[fit], data.search_y[fit], data.search_x[val], data.search_y[val]

    def run(x, y, eval_x, eval_y, lr, weight_decay, epochs) -> HeadRun:
        return train_toolkit_head(
            x,
            y,
            eval_x,
            eval_y,
            lr=lr,
            weight_decay=weight_decay,
            epochs=epochs,
            metric=metric,
            multilabel=multilabel,
            num_classes=num_classes,
            text_head=text_head,
        )

    with cpu_threads_for(data.search_x):
        lr, weight_decay, val_score = toolkit_search(
            lambda lr, wd: run(fit_x, fit_y, val_x, val_y, lr, wd, SEARCH_EPOCHS).best if val else 0.0
        )
        final_x, final_y = _final_rows(data)
        final = run(final_x, final_y, data.test_x, data.test_y, lr, weight_decay, FINAL_EPOCHS)
    info = {
        "lr": lr,
        "l2": weight_decay,
        "val_score": val_score,
        "toolkit_test_selected_score": final.best,
    }
    return ProbeOutcome(final.last_probabilities, info)


def lbfgs_probe(data: ProbeData, *, metric: str, multilabel: bool, num_classes: int) -> ProbeOutcome:
    """The same split, search rule and final-run data, each weight decay a converged logistic regression on
    features standardised with the search set's statistics (no learning rate: the search is over L2 only)."""
    scaler = Standardizer.fit(data.search_x.float())
    search_x = scaler(data.search_x.float())
    fit, val = validation_split(data.search_y.cpu())
    targets = data.search_y.float() if multilabel else data.search_y.long()
    problem = LogisticRegressionProblem(search_x[fit], targets[fit], num_classes, multilabel=multilabel)
    unconverged: list[float] = []

    def probabilities(x: torch.Tensor, params: Params) -> torch.Tensor:
        return (x @ params[0].T + params[1]).softmax(dim=1).cpu()  # the toolkit's `validate`: softmax, always

    def fit_at(problem: LogisticRegressionProblem, l2: float) -> Params:
        params = problem.fit(l2, tolerance=MULTILABEL_TOLERANCE) if multilabel else problem.fit(l2)
        if not problem.converged[l2]:
            unconverged.append(l2)
        return params

    with cpu_threads_for(search_x):
        index, val_score = (
            toolkit_weight_decay_search(
                lambda i: metric_score(
                    metric, probabilities(search_x[val], fit_at(problem, WEIGHT_DECAYS[i])), data.search_y[val].cpu()
                )
            )
            if val and fit
            else (-1, 0.0)
        )
        l2 = WEIGHT_DECAYS[index]
        final_x, final_y = _final_rows(data)
        final_targets = final_y.float() if multilabel else final_y.long()
        final = LogisticRegressionProblem(scaler(final_x.float()), final_targets, num_classes, multilabel=multilabel)
        params = fit_at(final, l2)
    if unconverged:
        log.warning(
            "the L-BFGS probe stopped unconverged at %d of its fits (L2 %s): its iteration budget ran out",
            len(unconverged),
            ", ".join(f"{v:.1e}" for v in sorted(set(unconverged))),
        )
    info = {"l2": l2, "val_score": val_score, "converged": float(not unconverged)}
    return ProbeOutcome(probabilities(scaler(data.test_x.float()), params), info)
