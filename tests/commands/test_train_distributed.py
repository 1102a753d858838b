"""A 2-process gloo run under torchrun: exits 0 and both ranks hold identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL_ARGS


def test_two_process_gloo_run_exits_0_with_identical_weights(tiny_corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "protorkd",
        "train",
        "--train-data",
        str(tiny_corpus / "train.tsv"),
        "--eval-data-dir",
        str(tiny_corpus / "eval"),
        "--logs-dir",
        str(tmp_path),
        "--name",
        "ddp",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        *TINY_MODEL_ARGS,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = (tmp_path / "ddp" / "out.log").read_text()
    assert "world size 2" in log_text
    assert "model parameters identical on all 2 ranks" in log_text
    params = (tmp_path / "ddp" / "params.txt").read_text()
    assert "world_size: 2" in params
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    # 96 rows / (8 per process x 2 processes) = 6 steps per epoch
    assert checkpoint["optimizer"]["state"][0]["step"] == 12


# --- the training step under DDP with unequal and empty local batches -----------------------------------------------
# Rows of rank 0 and rank 1 per batch: rank 1 has no readable image in the first batch, nobody in the second.
RANK_ROWS = (([0, 1, 2], []), ([], []), ([3, 4], [5, 6, 7]))


def step_config(corpus: Path, logs: Path, name: str, local_loss: bool):
    import argparse

    from protorkd.config import add_config_arguments, config_from_namespace

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    # tiny-vit has no BatchNorm and no dropout, so each rank computes exactly what one process computes on its rows
    flags = ["--image-model-builder", "custom", "--image-model", "tiny-vit", "--text-model-builder", "custom"]
    flags += ["--text-model", "tiny-text", "--teacher", "text", "--precision", "fp32", "--workers", "0"]
    flags += ["--report-to", "", "--train-data", str(corpus / "train.tsv"), "--logs", str(logs), "--name", name]
    flags += ["--batch-size", "4", "--warmup", "1", "--lr", "1e-3", "--local-loss" if local_loss else "--no-local-loss"]
    flags += ["--gather-with-grad"]  # N processes then compute exactly one process's gradient (not 1/N of it)
    return config_from_namespace(parser.parse_args(flags))


def handmade_batches(dataset, rank_rows, world: int, rank: int) -> list[dict]:
    """The loader's batch dicts; with world 1 each batch concatenates both ranks' rows."""
    batches = []
    for rows_per_rank in rank_rows:
        rows = [row for rows in rows_per_rank for row in rows] if world == 1 else rows_per_rank[rank]
        samples = [dataset[(0, row, row)] for row in rows]
        batch = {
            "indices": torch.tensor(rows, dtype=torch.long),
            "positions": torch.tensor(rows, dtype=torch.long),
            "captions": [s["caption"] for s in samples],
            "bad": [] if rows else [(99, "missing image")],
        }
        if samples:
            batch["images"] = torch.stack([s["image"] for s in samples])
        batches.append(batch)
    return batches


def recorded_gradients(cfg, state) -> list[dict[str, torch.Tensor]]:
    """Train one epoch of the handmade batches through the loop; the gradient of each optimizer step (the step itself
    is skipped, so that every batch is measured at the same weights)."""
    from protorkd.data.tsv import BadSampleCounter
    from protorkd.train.loop import _train_epoch
    from protorkd.train.run import build_run

    run = build_run(cfg, state, torch.device("cpu"))
    try:
        run.batches = handmade_batches(run.batches.loader.dataset, RANK_ROWS, state.world_size, state.rank)
        run.steps_per_epoch = len(RANK_ROWS)
        recorded = []

        def recording_step(*args, **kwargs):
            model, loss = run.task.model, run.task.loss
            named = [*model.named_parameters(), *(("loss." + n, p) for n, p in loss.named_parameters())]
            recorded.append({name: p.grad.clone() for name, p in named if p.grad is not None})

        run.optimizer.step = recording_step
        run.task.model.train()
        _train_epoch(run, 0, BadSampleCounter(1.0, str), None)
        return recorded
    finally:
        run.close()


def _step_worker(rank: int, init_file: str, corpus: str, logs: str, out: str) -> None:
    import torch.distributed as dist

    from protorkd import distributed
    from protorkd.distributed import DistState

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for local in (False, True):
            cfg = step_config(Path(corpus), Path(logs), f"ddp-{local}", local)
            results[local] = recorded_gradients(cfg, DistState(rank, rank, 2))
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        distributed.shutdown()


def test_ddp_step_with_unequal_and_empty_batches_has_the_one_process_gradient(tiny_corpus, tmp_path):
    import torch.multiprocessing as mp

    from protorkd.distributed import DistState

    args = (str(tmp_path / "init"), str(tiny_corpus), str(tmp_path / "logs"), str(tmp_path))
    context = mp.start_processes(_step_worker, args=args, nprocs=2, start_method="fork", join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:  # a rank waiting in a collective the other never entered
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process step hung")
    got = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for local in (False, True):
        single = recorded_gradients(step_config(tiny_corpus, tmp_path / "single", f"one-{local}", local), DistState())
        assert len(single) == 2  # the batch with no rows anywhere is skipped
        for rank in range(2):
            assert len(got[rank][local]) == len(single)
            for step, (mine, reference) in enumerate(zip(got[rank][local], single)):
                assert mine.keys() == reference.keys()
                for name, grad in reference.items():
                    where = f"local_loss={local} rank {rank} step {step} {name}"
                    torch.testing.assert_close(
                        mine[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, where=where: where + m
                    )
