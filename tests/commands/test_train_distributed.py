"""A 2-process gloo run under torchrun: exits 0 and both ranks hold identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    # 96 rows / (8 per process x 2 processes) = 6 steps per epoch
    assert checkpoint["optimizer"]["state"][0]["step"] == 12
