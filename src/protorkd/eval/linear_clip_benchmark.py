"""The `clip_benchmark` linear probe: CLIP_benchmark 1.6.2's own `linear_probe` protocol, on cached features.

Transcribed from `clip_benchmark/metrics/linear_probe.py` (and `cli.py`, which seeds and splits), so that a
number named `lp_acc1` means what it means in a CLIP_benchmark table:

- features: as given (CLIP_benchmark's `Featurizer(normalize=True)`: normalised `encode_image`); no
  standardisation;
- classifier: `torch.nn.Linear(D, C)` (torch's default initialisation) trained with AdamW (lr 0.1, its
  default weight decay 0 unless searched), cross-entropy, batch 64, 10 epochs, a cosine learning-rate schedule
  over all steps without warm-up, in the evaluation's autocast (CLIP_benchmark's `--amp`, default on);
- validation: none by default (CLIP_benchmark's CLI passes no validation set unless `--val_proportion` or
  `--val_split` is given), and then the weight decay is 0. With `val_proportion` p, `random_split` takes p of
  train for validation, the weight decay is searched over np.logspace(-6, 2, 97) by `find_peak` (the 7 coarse
  values, then [left, peak, right] at spans 8, 4, 2, 1; validation top-1; the first best wins), and the final
  layer is trained on train + validation (few-shot: train only);
- `fewshot_k` > 0: the first k images of each class in a seeded random order;
- randomness: streams seeded with `seed`, consumed in CLIP_benchmark's order (the split and the few-shot
  permutation; then per training run the layer's initialisation and a DataLoader's shuffles, on the global
  stream as CLIP_benchmark's `train` reseeds it), so the same features give the same numbers as
  CLIP_benchmark's code on the same device and torch (tests/eval/test_clip_benchmark_reference.py runs both).

The global random state is forked, never changed. Memory: the probe indexes the caller's feature tensors
batch by batch and copies none of them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader

from protorkd.eval.logistic import cpu_threads_for
from protorkd.eval.ranking import accuracy_metrics
from protorkd.precision import Precision

LR = 0.1  # CLIP_benchmark's --fewshot_lr default
EPOCHS = 10  # --fewshot_epochs
BATCH_SIZE = 64  # --batch_size
WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()  # find_peak's grid
COARSE = np.logspace(-6, 2, num=7).tolist()


def train_linear_layer(
    features: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    n_classes: int,
    *,
    weight_decay: float,
    lr: float = LR,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    precision: Precision = Precision.FP32,
    device: torch.device | str = "cpu",
) -> torch.nn.Linear:
    """CLIP_benchmark's `train`: a linear layer on features[rows] [n, D] (labels[rows]), on `device`."""
    device = torch.device(device)
    steps = epochs * math.ceil(len(rows) / batch_size)
    step = 0
    # the global stream, seeded as CLIP_benchmark's `train` seeds it, inside a fork that restores it after:
    # nn.Linear's initialisation, then the shuffle of a DataLoader (over row numbers) at every epoch
    with torch.random.fork_rng(devices=[]), cpu_threads_for(features):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(features.shape[1], n_classes).to(device)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
        loader = DataLoader(range(len(rows)), batch_size=batch_size, shuffle=True)
        for _ in range(epochs):
            for batch in loader:
                picked = rows[batch]
                x, y = features[picked].to(device), labels[picked].to(device)
                for group in optimizer.param_groups:  # cosine_lr(optimizer, lr, 0, steps): no warm-up
                    group["lr"] = 0.5 * (1 + np.cos(np.pi * step / steps)) * lr
                optimizer.zero_grad()
                with precision.autocast(device):
                    loss = torch.nn.functional.cross_entropy(layer(x), y)
                loss.backward()
                optimizer.step()
                step += 1
    return layer


@torch.no_grad()
def layer_logits(
    layer: torch.nn.Linear,
    features: torch.Tensor,
    *,
    precision: Precision = Precision.FP32,
    batch_size: int = 4096,
) -> torch.Tensor:
    """[M, C] float32 logits on the CPU, under the same autocast as training (CLIP_benchmark's `infer`)."""
    device = layer.weight.device
    out = []
    for start in range(0, features.shape[0], batch_size):
        with precision.autocast(device):
            out.append(layer(features[start : start + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, layer.out_features)


def fewshot_rows(labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """CLIP_benchmark's selection: a random permutation of the rows, keeping a row while its class has fewer
    than k (k < 0: every row, in the permuted order)."""
    counts: dict[int, int] = {}
    kept = []
    for row in torch.randperm(len(labels), generator=generator).tolist():
        label = int(labels[row])
        counts.setdefault(label, 0)
        if k < 0 or counts[label] < k:
            counts[label] += 1
            kept.append(row)
    if k > 0 and any(count != k for count in counts.values()):
        raise ValueError(f"fewshot_k={k}: some class has fewer training images (CLIP_benchmark gives up here)")
    return torch.tensor(kept, dtype=torch.long)


def top1_fraction(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """CLIP_benchmark's `accuracy(..., topk=(1,))`: the share of rows whose `topk` first class is the label."""
    return float((logits.topk(1, dim=1).indices[:, 0] == labels).float().sum()) / len(labels)


def clip_benchmark_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    val_proportion: float | None = None,
    fewshot_k: int = -1,
    lr: float = LR,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    precision: Precision = Precision.FP32,
    device: torch.device | str = "cpu",
):
    """CLIP_benchmark's linear probe (module docstring): a `linear_probe.ProbeResult` whose metrics are
    `ranking.accuracy_metrics` of the test logits and the chosen `weight_decay`, its settings `epochs`, `seed`,
    `fewshot_k`."""
    from protorkd.eval.linear_probe import ProbeResult

    train_labels, test_labels = train_labels.long(), test_labels.long()
    generator = torch.Generator().manual_seed(seed)  # cli.run: torch.manual_seed(args.seed)
    all_rows = torch.arange(len(train_labels))
    val_rows = None
    if val_proportion is not None:  # cli.run: random_split(train, [1 - p, p]) with the global stream
        train_part, val_part = torch.utils.data.random_split(
            range(len(train_labels)), [1 - val_proportion, val_proportion], generator=generator
        )
        all_rows, val_rows = torch.tensor(train_part.indices), torch.tensor(val_part.indices)
    rows = all_rows[fewshot_rows(train_labels[all_rows], fewshot_k, generator)]
    n_classes = int(train_labels[all_rows].max()) + 1  # CLIP_benchmark: targets.max() + 1 of its train features

    def train(rows: torch.Tensor, weight_decay: float) -> torch.nn.Linear:
        return train_linear_layer(
            train_features,
            train_labels,
            rows,
            n_classes,
            weight_decay=weight_decay,
            lr=lr,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            precision=precision,
            device=device,
        )

    weight_decay = 0.0
    final_rows = rows
    if val_rows is not None:
        accuracy: dict[int, float] = {}  # each training run is deterministic: run each value once

        def val_top1(index: int) -> float:
            if index not in accuracy:
                layer = train(rows, WEIGHT_DECAYS[index])
                logits = layer_logits(layer, train_features[val_rows], precision=precision)
                accuracy[index] = top1_fraction(logits, train_labels[val_rows])
            return accuracy[index]

        def find_peak(indices: list[int]) -> int:
            best, best_accuracy = 0, 0.0  # CLIP_benchmark's find_peak: the first strictly best, else index 0
            for index in indices:
                if best_accuracy < val_top1(index):
                    best, best_accuracy = index, val_top1(index)
            return best

        peak = find_peak([i for i, value in enumerate(WEIGHT_DECAYS) if value in COARSE])
        span = 8
        while span > 0:
            peak = find_peak([max(peak - span, 0), peak, min(peak + span, len(WEIGHT_DECAYS) - 1)])
            span //= 2
        weight_decay = WEIGHT_DECAYS[peak]
        if fewshot_k < 0:  # full training: train + validation
            final_rows = torch.cat([rows, val_rows])
    layer = train(final_rows, weight_decay)
    test_logits = layer_logits(layer, test_features, precision=precision)
    if int(test_labels.max()) >= n_classes:  # a class seen only in test: it can never be predicted
        missing = int(test_labels.max()) + 1 - n_classes
        test_logits = torch.cat([test_logits, torch.full((len(test_logits), missing), -math.inf)], dim=1)
    metrics = {**accuracy_metrics(test_logits, test_labels), "weight_decay": weight_decay}
    return ProbeResult(metrics, test_logits, {"epochs": epochs, "seed": seed, "fewshot_k": fewshot_k})
