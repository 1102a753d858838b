"""What the `Task` hands the loss: fp32 features, autocast off, whatever precision the towers ran in."""

from __future__ import annotations

import torch

from protorkd.cli import main
from tests.conftest import tiny_train_args


def test_the_loss_runs_in_fp32_without_autocast_under_bf16_autocast(tiny_corpus, tmp_path, monkeypatch):
    from protorkd.losses.auxiliary import SimCSE
    from protorkd.losses.contrastive import InfoNCE

    seen = []

    def spy(forward):
        def recorded(self, inputs):
            tensors = [inputs.image_features, inputs.text_features, inputs.text_features_dropout]
            seen.append((torch.is_autocast_enabled("cpu"), {t.dtype for t in tensors if t is not None}))
            return forward(self, inputs)

        return recorded

    monkeypatch.setattr(InfoNCE, "forward", spy(InfoNCE.forward))
    monkeypatch.setattr(SimCSE, "forward", spy(SimCSE.forward))
    towers_autocast = []
    from protorkd.models.dual_encoder import DualEncoder

    model_forward = DualEncoder.forward

    def model_spy(self, *args, **kwargs):
        towers_autocast.append(torch.is_autocast_enabled("cpu"))
        return model_forward(self, *args, **kwargs)

    monkeypatch.setattr(DualEncoder, "forward", model_spy)
    args = ["--epochs", "1", "--zeroshot-frequency", "0", "--precision", "amp_bf16", "--teacher", "none"]
    assert main(tiny_train_args(tiny_corpus, tmp_path, "run", *args, "--w-simcse", "0.5")) == 0
    assert towers_autocast and all(towers_autocast)  # the towers ran under bf16 autocast
    assert len(seen) == 2 * len(towers_autocast)  # InfoNCE and SimCSE, every step
    assert all(not autocast and dtypes == {torch.float32} for autocast, dtypes in seen)
