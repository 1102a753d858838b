"""End-to-end behaviour of `protorkd train` on a tiny corpus with tiny towers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protorkd.cli import main
from protorkd.config import read_params
from tests.conftest import TINY_MODEL_ARGS, tiny_train_args

train_args = tiny_train_args


def test_training_writes_the_experiment_layout(tiny_corpus, tmp_path, capsys):
    code = main(
        train_args(tiny_corpus, tmp_path, "run", "--epochs", "2", "--save-frequency", "2", "--report-to", "tensorboard")
    )
    assert code == 0
    root = tmp_path / "run"
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch_2.pt", "epoch_latest.pt"]
    for name in ("out.log", "params.txt", "results.jsonl"):
        assert (root / name).is_file()
    assert any((root / "tensorboard").iterdir())
    assert any(p.name.startswith("teacher-text-") for p in (root / "cache").iterdir())
    checkpoint = torch.load(root / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["name"] == "run"
    assert {"state_dict", "optimizer", "version", "config", "loss_state"} <= set(checkpoint)
    assert checkpoint["config"]["batch_size"] == 16
    lines = (root / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"epoch": 2' in lines[1] and "zeroshot/shapes/top1" in lines[1]
    assert "experiment:" in capsys.readouterr().out


def test_params_txt_reads_back_to_the_run_config(tiny_corpus, tmp_path):
    assert (
        main(
            train_args(
                tiny_corpus,
                tmp_path,
                "run",
                "--epochs",
                "1",
                "--csv-separator",
                "\t",
                "--zeroshot-frequency",
                "0",
                "--episode-size",
                "48",
            )
        )
        == 0
    )
    cfg = read_params(tmp_path / "run" / "params.txt")
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert cfg.to_flat_dict() == checkpoint["config"]
    assert cfg.data.episode_size == 48 and cfg.data.csv_separator == "\t" and cfg.model.adapter is None


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_resumed_run_after_sigkill_matches_uninterrupted_run(tiny_corpus, tmp_path):
    common = ["--epochs", "3", "--episode-size", "960", "--zeroshot-frequency", "0"]
    assert main(train_args(tiny_corpus, tmp_path, "full", *common)) == 0

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen(
        [sys.executable, "-m", "protorkd", *train_args(tiny_corpus, tmp_path, "killed", *common)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = tmp_path / "killed" / "checkpoints" / "epoch_1.pt"
    deadline = time.time() + 120
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists()
    assert not (tmp_path / "killed" / "checkpoints" / "epoch_3.pt").exists(), "the run finished before the kill"

    assert main(train_args(tiny_corpus, tmp_path, "killed", *common, "--resume", "latest")) == 0
    full, resumed = _state(tmp_path / "full/checkpoints/epoch_3.pt"), _state(tmp_path / "killed/checkpoints/epoch_3.pt")
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key, value in full["loss_state"].items():
        assert torch.equal(value, resumed["loss_state"][key]), key
    assert full["optimizer"]["state"][0]["step"] == resumed["optimizer"]["state"][0]["step"]


def test_bad_rows_are_skipped_counted_and_named(tiny_corpus, tmp_path):
    lines = (tiny_corpus / "train.tsv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((tiny_corpus / rows[0].split("\t")[0]).read_bytes()[:300])
    absolute = lambda r: str(tiny_corpus / r.split("\t")[0])  # noqa: E731
    rows = [f"{absolute(r)}\t{r.split(chr(9))[1]}" for r in rows]
    rows[3] = f"{tmp_path / 'missing.jpg'}\ta red circle"
    rows[5] = f"{corrupt}\ta blue square"
    rows[7] = f"{truncated}\ta green star"
    rows[9] = rows[9].split("\t")[0] + "\t"
    csv = tmp_path / "bad.tsv"
    csv.write_text("\n".join([header, *rows]) + "\n")

    args = [
        "train",
        "--train-data",
        str(csv),
        "--logs",
        str(tmp_path),
        "--batch-size",
        "16",
        *TINY_MODEL_ARGS,
        "--epochs",
        "1",
        "--zeroshot-frequency",
        "0",
    ]
    assert main([*args, "--name", "tolerant", "--max-bad-fraction", "0.1"]) == 0
    log_text = (tmp_path / "tolerant" / "out.log").read_text()
    assert "skipped 4 unreadable samples" in log_text
    assert "missing.jpg: missing image" in log_text and "corrupt.jpg: unreadable image" in log_text
    assert "truncated.jpg: unreadable image" in log_text and "row 10 (line 11)" in log_text

    assert main([*args, "--name", "strict", "--max-bad-fraction", "0.01"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lrr", "0.1"], "unrecognized arguments: --lrr"),
        (["--loss", "NoSuchLoss"], "valid names: "),
        (["--image-model", "no-such-net"], "unknown custom image architecture"),
        (["--train-data", "/nonexistent/train.tsv"], "no such file"),
        (["--resume", "latest"], "no checkpoint"),
        (["--csv-caption-key", "caption"], "no column 'caption'"),
        (
            [
                "--teacher",
                "text",
                "--image-head-n-layers",
                "0",
                "--lock-image-model",
                "--joint-projection-dim",
                "16",
                "--text-head-n-layers",
                "0",
            ],
            "identity head",
        ),
        (["--epochs", "1", "--batch-size", "4096"], "lower --batch-size"),
    ],
)
def test_bad_input_exits_2_and_leaves_nothing_behind(tiny_corpus, tmp_path, capsys, extra, message):
    logs = tmp_path / "logs"
    args = train_args(tiny_corpus, logs, "run")
    if "--train-data" in extra:
        args = [a for a in args]
        index = args.index("--train-data")
        del args[index : index + 2]
    with pytest.raises(SystemExit) if extra[0] == "--lrr" else _no_raise() as exit_info:
        code = main([*args, *extra])
    if extra[0] == "--lrr":
        code = exit_info.value.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (logs / "run").exists()


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_existing_experiment_is_refused(tiny_corpus, tmp_path, capsys):
    assert main(train_args(tiny_corpus, tmp_path, "run", "--epochs", "1", "--zeroshot-frequency", "0")) == 0
    assert main(train_args(tiny_corpus, tmp_path, "run", "--epochs", "1")) == 2
    assert "already exists" in capsys.readouterr().err


def test_bf16_weights_train_and_evaluate(tiny_corpus, tmp_path):
    assert main(train_args(tiny_corpus, tmp_path, "bf16", "--epochs", "1", "--precision", "bf16")) == 0
    checkpoint = torch.load(tmp_path / "bf16" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert checkpoint["state_dict"]["image_head.weight"].dtype == torch.bfloat16
    assert "zeroshot/shapes/top1" in (tmp_path / "bf16" / "results.jsonl").read_text()
