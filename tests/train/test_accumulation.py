"""--accum-freq as open_clip's: the gradient of an accumulated group is one big batch's, state moves once."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from protorkd.config import add_config_arguments, config_from_namespace
from protorkd.distributed import DistState
from protorkd.losses.contrastive import clip_loss
from protorkd.train.loop import accumulated_step, train_step
from protorkd.train.run import build_run


def tiny_run(corpus, logs, name: str, *flags: str):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    # tiny-vit has no BatchNorm; the model is put in eval mode below, so tiny-text's dropout is off too
    args = ["--image-model-builder", "custom", "--image-model", "tiny-vit", "--text-model-builder", "custom"]
    args += ["--text-model", "tiny-text", "--teacher", "none", "--precision", "fp32", "--workers", "0"]
    args += ["--report-to", "", "--train-data", str(corpus / "train.tsv"), "--logs", str(logs), "--name", name]
    args += ["--batch-size", "12", "--warmup", "1", "--lr", "1e-3", "--zeroshot-frequency", "0", *flags]
    return build_run(config_from_namespace(parser.parse_args(args)), DistState(), torch.device("cpu"))


def split(batch: dict, sizes: list[int]) -> list[dict]:
    parts, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        parts.append({key: value[rows] for key, value in batch.items() if key != "bad"})
        start += size
    return parts


def recorded_step(run, step_function) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The gradients at the optimizer step (the step itself is skipped) and the loss's buffers after it."""
    grads = {}

    def record(*args, **kwargs):
        named = [*run.task.model.named_parameters(), *(("loss." + n, p) for n, p in run.task.loss.named_parameters())]
        grads.update({name: p.grad.clone() for name, p in named if p.grad is not None})

    run.optimizer.step = record
    run.task.model.eval()
    step_function()
    return grads, {name: buffer.clone() for name, buffer in run.task.loss.named_buffers()}


@pytest.mark.parametrize("loss", ["InfoNCE", "CompRess-2q"])
def test_an_accumulated_group_has_the_gradient_and_state_of_one_big_batch(tiny_corpus, tmp_path, loss):
    big = tiny_run(tiny_corpus, tmp_path, "big", "--loss", loss, "--queue-size", "64")
    accumulated = tiny_run(tiny_corpus, tmp_path, "accumulated", "--loss", loss, "--queue-size", "64")
    try:
        big.batches.set_epoch(0)
        batch = next(iter(big.batches))
        reference, reference_buffers = recorded_step(big, lambda: train_step(big, batch, 0, 0, None, batch_number=0))

        def accumulate():
            group = [accumulated.task.encode_micro_batch(part, batch_number=0) for part in split(batch, [5, 4, 3])]
            accumulated_step(accumulated, group, 0, 0, None)

        grads, buffers = recorded_step(accumulated, accumulate)
    finally:
        big.close()
        accumulated.close()
    assert grads.keys() == reference.keys() and any(name.startswith("loss.") for name in grads) == (loss == "InfoNCE")
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    for name, buffer in reference_buffers.items():  # the queues took the 12 rows once, not three times
        torch.testing.assert_close(buffers[name], buffer, rtol=1e-5, atol=1e-6)
    if loss == "CompRess-2q":
        assert int(buffers["teacher_queue.count"]) in (12, 64)  # 12 rows pushed (64: a queue started full)


def test_micro_batches_mixed_separately_pair_each_row_with_its_mirror_in_its_own_micro_batch():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 3), dim=1), F.normalize(torch.randn(5, 3), dim=1)
    lams = torch.tensor([0.7, 0.7, 0.4, 0.4, 0.4])  # micro-batches of 2 and 3 rows, each with its own lam
    scale = torch.tensor(10.0)
    loss = clip_loss(image, text, scale, mixup_lams=lams, mixup_groups=[2, 3])
    partner = [1, 0, 4, 3, 2]  # the mirror within rows 0-1 and within rows 2-4
    targets = torch.zeros(5, 5)
    for row in range(5):
        targets[row, row] += lams[row]
        targets[row, partner[row]] += 1 - lams[row]
    logits = scale * image @ text.T
    by_hand = 0.5 * (
        -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
        - (targets.T * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    )
    torch.testing.assert_close(loss, by_hand)
