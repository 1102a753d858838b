"""What the `Task` hands the loss: fp32 features, autocast off, whatever precision the towers ran in."""

from __future__ import annotations

import math

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


def _five_captions_per_image(tiny_corpus, root):
    """COCO's shape: every image listed 5 times with different captions, so batches hold repeated images."""
    lines = (tiny_corpus / "train.tsv").read_text().splitlines()[1:]
    rows = [
        f"{tiny_corpus / image}\tcaption {k} of {caption}\n"
        for image, caption in (line.split("\t") for line in lines[:48])
        for k in range(5)
    ]
    root.mkdir()
    (root / "train.tsv").write_text("filepath\ttitle\n" + "".join(rows))
    return root


def _step_losses(log_text: str) -> list[float]:
    return [float(line.split("  loss ")[1].split()[0]) for line in log_text.splitlines() if "  loss " in line]


def test_infonce_plus_rkd_on_repeated_images_trains_finitely_under_bf16_within_2x_of_fp32(tiny_corpus, tmp_path):
    """The issue's case: `--loss InfoNCE+RKD --loss-weights 1,0.5` on five captions per image under bf16 autocast
    once sent the RKD angle term to thousands (near-duplicate student rows) and ended at chance without a word."""
    corpus = _five_captions_per_image(tiny_corpus, tmp_path / "coco-like")
    common = ["--loss", "InfoNCE+RKD", "--loss-weights", "1,0.5", "--epochs", "2", "--zeroshot-frequency", "0"]
    common += ["--log-every-n-steps", "1", "--teacher", "none", "--batch-size", "24", "--lr", "5e-3"]
    losses = {}
    for precision in ("fp32", "amp_bf16"):
        args = tiny_train_args(corpus, tmp_path, precision, *common, "--precision", precision, eval_data=False)
        assert main(args) == 0
        losses[precision] = _step_losses((tmp_path / precision / "out.log").read_text())
    assert len(losses["fp32"]) == len(losses["amp_bf16"]) == 20  # 240 rows / 24: 10 steps an epoch
    assert all(math.isfinite(value) for value in losses["amp_bf16"])
    for step, (bf16, fp32) in enumerate(zip(losses["amp_bf16"], losses["fp32"])):
        assert bf16 <= 2 * fp32, f"step {step + 1}: bf16 loss {bf16} > 2 x fp32's {fp32}"
