"""The divergence guard: a non-finite loss stops the run in one line; a jump of 100x its median warns once."""

from __future__ import annotations

import logging

import pytest
import torch

from protorkd.cli import main
from protorkd.errors import TrainingDiverged
from protorkd.train.guard import DivergenceGuard
from tests.conftest import tiny_train_args


def test_a_non_finite_term_is_named_with_the_step_and_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "epoch_latest.pt"
    guard = DivergenceGuard(checkpoint)
    terms = {"infonce_loss": torch.tensor(1.5), "rkd_angle_loss": torch.tensor(float("inf"))}
    guard.check_loss({"infonce_loss": torch.tensor(1.5)}, torch.tensor(1.5), epoch=0, step=3)  # finite: nothing
    with pytest.raises(
        TrainingDiverged, match=r"loss term rkd_angle_loss = inf at epoch 2 \(global step 8\); no checkpoint"
    ):
        guard.check_loss(terms, terms["infonce_loss"] + terms["rkd_angle_loss"], epoch=1, step=7)
    checkpoint.write_bytes(b"x")
    with pytest.raises(TrainingDiverged, match=f"the last good checkpoint is {checkpoint}"):
        guard.check_loss(terms, torch.tensor(float("nan")), epoch=1, step=7)
    with pytest.raises(TrainingDiverged, match="the gradient norm = nan"):
        guard.check_grad_norm(torch.tensor(float("nan")), scaled=False, epoch=0, step=0)
    guard.check_grad_norm(torch.tensor(float("inf")), scaled=True, epoch=0, step=0)  # fp16's scaler skips the step


def test_a_jump_over_100x_the_running_median_warns_once_per_excursion(caplog):
    guard = DivergenceGuard(window=5, min_history=3)
    with caplog.at_level(logging.WARNING, logger="protorkd.train.guard"):
        for step, value in enumerate([1.0, 2.0, 3.0]):  # median 2 once 3 values are known
            guard.observe({"grad_norm": value}, step)
        guard.observe({"grad_norm": 200.0}, 3)  # 100x the median exactly: not above it
        guard.observe({"grad_norm": -250.1}, 4)  # history [1, 2, 3, 200]: median 2.5, |-250.1| > 250
        guard.observe({"grad_norm": 10_000.0}, 5)  # still in the same excursion: no second warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("global step 5: grad_norm = -250.1 is 100x the median")
    caplog.clear()
    guard = DivergenceGuard(window=3, min_history=3)
    with caplog.at_level(logging.WARNING, logger="protorkd.train.guard"):
        for step, value in enumerate([1.0, 1.0, 1.0, 500.0, 1.0, 1.0, 1.0, 1.0, 500.0]):
            guard.observe({"rkd_angle_loss": value}, step)
    steps = [
        r.getMessage().split(":")[0].removeprefix("global ") for r in caplog.records if r.levelno == logging.WARNING
    ]
    assert steps == ["step 4", "step 9"]  # back under the threshold in between: a new excursion warns again


def test_a_run_whose_loss_turns_nan_stops_with_one_line(tiny_corpus, tmp_path, capsys, monkeypatch):
    from protorkd.losses.contrastive import InfoNCE

    forward, calls = InfoNCE.forward, []

    def nan_from_the_ninth_step(self, inputs):
        calls.append(1)
        terms = forward(self, inputs)
        return {k: v * float("nan") for k, v in terms.items()} if len(calls) >= 9 else terms

    monkeypatch.setattr(InfoNCE, "forward", nan_from_the_ninth_step)
    code = main(tiny_train_args(tiny_corpus, tmp_path, "run", "--epochs", "2", "--zeroshot-frequency", "0"))
    err = capsys.readouterr().err.strip().splitlines()
    latest = tmp_path / "run" / "checkpoints" / "epoch_latest.pt"
    assert code == 1  # 96 rows / batch 16: 6 steps an epoch, so the 9th is epoch 2's third
    assert err[-1] == (
        "protorkd train: error: training diverged: loss term infonce_loss = nan at epoch 2 (global step 9); the last "
        f"good checkpoint is {latest} (lower --lr, set --max-grad-norm, or train with --precision fp32, then "
        "--resume latest)"
    )
    assert torch.load(latest, weights_only=True)["epoch"] == 1
