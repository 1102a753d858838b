"""ELEVATER's linear probe against a transcription of the toolkit's code (Elevater_Toolkit_IC @ 00d0af7).

The transcriptions below keep the toolkit's own code (`evaluation/full_model_finetune.py`: `Classifier`,
`train_task`, `train_one`, `validate`, `hyperparameter_sweep`, `hyperparameter_sweep_lr`,
`full_model_finetune`; `evaluation/feature.py`: `create_dataloader`, `get_dataloader`;
`commands/linear_probe.py`: the 1-shot and PatchCamelyon rules), with its image backbone replaced by the
identity on features and its CUDA calls dropped. Ours (`protorkd.eval.elevater_probe`) trains on features
directly, without data loaders; both must give the same numbers.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

from protorkd.eval.elevater import probe_subsets
from protorkd.eval.elevater_format import ELEVATER_DATASETS, sample_few_shot
from protorkd.eval.elevater_metrics import METRICS
from protorkd.eval.elevater_probe import (
    LEARNING_RATES,
    WEIGHT_DECAYS,
    ProbeData,
    toolkit_probe,
    toolkit_search,
    train_toolkit_head,
)

# --------------------------------------------------------------------------------------------- the toolkit


class FeatureData(Dataset):  # evaluation/feature.py
    def __init__(self, X, y):
        self.X = X
        self.y = y

    def __len__(self):
        return self.X.shape[0]

    def __getitem__(self, idx):
        return self.X[idx, :], self.y[idx]


def create_dataloader(dataset, batch_size, shuffle=True, num_workers=0, pin_memory=False):  # feature.py
    generator = torch.Generator()
    generator.manual_seed(0)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        sampler=None,
        drop_last=False,
        generator=generator if shuffle else None,
    )


def get_dataloader(dataset, labels, val_split=0.2, batch_size_per_gpu=64):  # feature.py, labels fetched quickly
    labels = np.asarray(labels)
    if len(labels.shape) == 1:
        cls_to_count = Counter(labels)
        val_indices = []
        for label in cls_to_count:
            n_samples = math.ceil(cls_to_count[label] * val_split)
            samples = np.where(labels == label)[0][:n_samples]
            val_indices.append(samples)
        val_idx = set(np.concatenate(val_indices).tolist())
        train_idx = set(list(range(len(dataset)))) - val_idx
        train_idx, val_idx = list(train_idx), list(val_idx)
    else:
        raise NotImplementedError
    train_loader = create_dataloader(Subset(dataset, train_idx), batch_size=batch_size_per_gpu, shuffle=True)
    val_loader = create_dataloader(Subset(dataset, val_idx), batch_size=batch_size_per_gpu, shuffle=False)
    return train_loader, val_loader


class Classifier(torch.nn.Module):  # full_model_finetune.py, backbone = identity on features
    def __init__(self, input_dim, output_dim, zeroshot_weights):
        super().__init__()
        self.channel_bn = torch.nn.BatchNorm1d(input_dim, affine=False)
        self.layers = torch.nn.Sequential(torch.nn.Linear(input_dim, output_dim))
        self.layers[0].weight.data = zeroshot_weights.T.to(self.layers[0].weight.dtype).contiguous()
        self.layers[0].bias.data.fill_(0.0)
        self.logit_scale = torch.nn.Parameter(torch.ones([]))
        self.logit_scale.requires_grad = False
        self.logit_scale.data *= 0  # LOGIT_SCALE_INIT 'none'

    def forward(self, img):
        outputs = self.channel_bn(img)
        return self.logit_scale.exp() * self.layers(outputs)


def train_one(train_loader, model, criterion, optimizer):
    model.train()
    for batch in train_loader:
        images, target = batch[:2]
        if images.shape[0] == 1:
            continue
        if target.shape[-1] == 1:
            target = target[:, 0]
        optimizer.zero_grad()
        output = model.forward(images)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def validate(val_loader, model, metric):
    outputs, targets = [], []
    model.eval()
    for batch in val_loader:
        images, target = batch[:2]
        if target.shape[-1] == 1:
            target = target[:, 0]
        outputs.append(model(images))
        targets.append(target)
    logits = torch.cat(outputs, dim=0).softmax(-1)
    labels = torch.cat(targets, dim=0)
    try:
        metric_result = METRICS.get(metric)(logits, labels)  # 100. * metric(labels, logits)
    except Exception:
        metric_result = 0.0
    return metric_result, logits


def train_task(train_dataloader, test_dataloader, lr, wd, epochs, zeroshot_weights, metric, sweep_run=False):
    best_acc1 = 0
    model = Classifier(zeroshot_weights.shape[0], zeroshot_weights.shape[1], zeroshot_weights)
    train_dataloader = create_dataloader(train_dataloader.dataset, batch_size=train_dataloader.batch_size)  # clone
    criterion = torch.nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]  # _set_wd: all in the decayed group
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, nesterov=False)
    epoch_scores, best_logits = [], None
    for _ in range(epochs):
        for param_group in optimizer.param_groups:  # adjust_learning_rate, SCHEDULE []
            param_group["lr"] = lr
        train_one(train_dataloader, model, criterion, optimizer)
        acc1, logits = validate(test_dataloader, model, metric)
        epoch_scores.append(acc1)
        if acc1 > best_acc1:
            best_logits = logits
        best_acc1 = max(acc1, best_acc1)
    if sweep_run:
        return best_acc1
    return best_acc1, epoch_scores, logits, best_logits


def hyperparameter_sweep(score_of_wd):
    l2_lambda_list = np.logspace(-6, 6, num=97).tolist()
    l2_lambda_init_idx = [i for i, val in enumerate(l2_lambda_list) if val in set(np.logspace(-6, 6, num=7))]
    peak_idx = -1
    peak_score = 0
    for idx in l2_lambda_init_idx:
        best_score_ = score_of_wd(l2_lambda_list[idx])
        if best_score_ > peak_score:
            peak_idx = idx
            peak_score = best_score_
    step_span = 8
    while step_span > 0:
        left, right = max(peak_idx - step_span, 0), min(peak_idx + step_span, len(l2_lambda_list) - 1)
        search_idx = []
        if left != peak_idx:
            search_idx.append(left)
        if right != peak_idx:
            search_idx.append(right)
        for idx in search_idx:
            best_score_ = score_of_wd(l2_lambda_list[idx])
            if best_score_ > peak_score:
                peak_idx = idx
                peak_score = best_score_
        step_span //= 2
    return l2_lambda_list[peak_idx], peak_score


def hyperparameter_sweep_lr(score_of):
    learning_rate_list = np.logspace(-6, -1, num=6).tolist()
    best_score = 0
    best_lr = 0
    best_l2_lambda = 0
    for lr_one in learning_rate_list:
        l2_lambda, best_score_one = hyperparameter_sweep(lambda wd, lr_one=lr_one: score_of(lr_one, wd))
        if best_score < best_score_one:
            best_score = best_score_one
            best_lr = lr_one
            best_l2_lambda = l2_lambda
    return best_lr, best_l2_lambda


# --------------------------------------------------------------------------------------------- the cases


def _blobs(per_class: int, classes: int, dim: int, seed: int, spread: float = 1.5):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def _text_head(classes: int, dim: int) -> torch.Tensor:
    """[D, C] unit columns, as the toolkit's zeroshot_weights."""
    return torch.nn.functional.normalize(torch.randn(dim, classes, generator=torch.Generator().manual_seed(5)), dim=0)


def test_the_text_initialised_head_trains_as_the_toolkits_train_task():
    # 70 training images: batches 64 and 6 in a shuffled order; 65 would leave a batch of one, skipped
    for n_train in (70, 65):
        x, y = _blobs(n_train // 5 + 1, 5, 8, 0)
        x, y = x[:n_train], y[:n_train]
        x_eval, y_eval = _blobs(6, 5, 8, 1)
        head = _text_head(5, 8)
        train = create_dataloader(FeatureData(x, y), batch_size=64)
        evaluation = create_dataloader(FeatureData(x_eval, y_eval), batch_size=64, shuffle=False)
        best, scores, last_logits, _ = train_task(train, evaluation, 0.01, 1e-3, 6, head, "accuracy")
        ours = train_toolkit_head(
            x,
            y,
            x_eval,
            y_eval,
            lr=0.01,
            weight_decay=1e-3,
            epochs=6,
            metric="accuracy",
            multilabel=False,
            num_classes=5,
            text_head=head.T,
        )
        assert ours.scores == scores and ours.best == best
        torch.testing.assert_close(ours.last_probabilities, last_logits, rtol=1e-5, atol=1e-6)
        assert 20 < best < 100  # the case is not trivial


@pytest.mark.parametrize("case", ["peaked", "ties", "nothing"])
def test_the_search_picks_what_the_toolkits_two_sweeps_pick(case):
    def score(lr: float, wd: float) -> float:
        i, j = LEARNING_RATES.index(lr), WEIGHT_DECAYS.index(wd)
        if case == "peaked":
            return 90.0 - abs(j - 37) - 3 * abs(i - 2)
        if case == "ties":  # 10 validation images (5 shots, 10 classes): scores are multiples of 10
            return 10.0 * min(6, (j // 20) + (i % 2))
        return 0.0  # nothing learns: the toolkit ends at index -1 (1e6) and learning rate 0

    lr, wd, _ = toolkit_search(score)
    assert (lr, wd) == hyperparameter_sweep_lr(score)
    if case == "nothing":
        assert (lr, wd) == (0, 0)


def test_a_five_shot_probe_runs_the_toolkits_search_and_final_run():
    # 5 shots of 4 classes: 1 validation image per class, so validation accuracy moves in steps of 25 and ties
    # decide; the final run trains 50 epochs on all 20 images and is scored on test
    x, y = _blobs(5, 4, 6, 2, spread=2.0)
    x_test, y_test = _blobs(8, 4, 6, 3, spread=2.0)
    head = _text_head(4, 6)
    # the toolkit
    dataset = FeatureData(x, y)
    train_loader, val_loader = get_dataloader(dataset, y.numpy())
    test_loader = create_dataloader(FeatureData(x_test, y_test), batch_size=64, shuffle=False)
    best_lr, best_wd = hyperparameter_sweep_lr(
        lambda lr, wd: train_task(train_loader, val_loader, lr, wd, 10, head, "accuracy", sweep_run=True)
    )
    trainval = create_dataloader(dataset, batch_size=64)  # merge_trainval_loader
    _, scores, last, _ = train_task(trainval, test_loader, best_lr, best_wd, 50, head, "accuracy")
    # ours
    outcome = toolkit_probe(
        ProbeData(x, y, x, y, x_test, y_test), metric="accuracy", multilabel=False, num_classes=4, text_head=head.T
    )
    assert (outcome.info["lr"], outcome.info["l2"]) == (best_lr, best_wd)
    torch.testing.assert_close(outcome.test_probabilities, last, rtol=1e-5, atol=1e-6)
    assert outcome.info["toolkit_test_selected_score"] == max(scores)  # the toolkit's own (test-picked) number


def _toolkit_shots(num_samples_per_class: int, dataset: str) -> tuple[int, int, bool]:
    """commands/linear_probe.py + full_model_finetune: (shots of the search, shots of the final run, merge)."""
    merge = True
    if num_samples_per_class == 1:
        num_samples_per_class = 2
        merge = False
    search = num_samples_per_class
    if dataset == "patch-camelyon" and num_samples_per_class == -1:
        search = 10000
    final = num_samples_per_class
    if dataset == "patch-camelyon" and search == 10000:
        final = -1
    return search, final, merge


@pytest.mark.parametrize(
    ("name", "shots"), [("cifar10", 1), ("cifar10", 5), ("cifar10", -1), ("patchcamelyon", -1), ("patchcamelyon", 5)]
)
def test_the_subsets_follow_the_toolkits_one_shot_and_patchcamelyon_rules(name, shots):
    spec = ELEVATER_DATASETS.get(name)
    rng = random.Random(0)
    labels = [(rng.randrange(3),) for _ in range(30_000)]
    search, final, merge = probe_subsets(labels, 3, shots, 7, full_search_shots=spec.full_search_shots)
    search_shots, final_shots, toolkit_merge = _toolkit_shots(shots, spec.hub_name)

    def subset(k: int) -> list[int]:
        return list(range(len(labels))) if k < 0 else sample_few_shot(labels, 3, k, 7)

    assert (search, final, merge) == (subset(search_shots), subset(final_shots), toolkit_merge)


@pytest.fixture(autouse=True)
def one_thread():
    """Batches of a few images: thread-pool synchronisation would cost more than the work (both sides)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
