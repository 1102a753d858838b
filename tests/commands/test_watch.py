"""`protorkd watch` beside a training run: one CSV row per saved epoch, surviving a kill and restart."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from protorkd.cli import main
from tests.conftest import tiny_train_args

ZEROSHOT = ("top1", "top5", "mean_per_class_recall", "prediction_entropy", "top_class_share")
# the representation diagnostics come with every evaluation; the tiny run's text tower is its locked teacher
DIAGNOSTICS = (
    "image_effective_rank",
    "text_effective_rank",
    "alignment",
    "image_uniformity",
    "text_uniformity",
    "teacher_effective_rank",
    "student_teacher_cosine",
)
DATASETS = ("shapes", "shapes_skewed", "shapes_unseen")

REPO = Path(__file__).resolve().parents[2]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _epochs(path: Path) -> list[int]:
    if not path.exists():
        return []
    with open(path) as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_watch_beside_training_survives_a_kill_and_writes_each_epoch_once(tiny_corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    experiment = tmp_path / "run"
    train_args = tiny_train_args(
        tiny_corpus, tmp_path, "run", "--epochs", "3", "--episode-size", "640", "--zeroshot-frequency", "0"
    )
    watch_command = [
        sys.executable,
        "-m",
        "protorkd",
        "watch",
        str(experiment),
        "--interval",
        "0.2",
        "--tasks",
        "zeroshot",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    # the first watch starts before the run has a folder, as docs/watch.md suggests (issue 25: it exited)
    first_log = tmp_path / "first_watch.log"
    with open(first_log, "w") as first_stderr:
        first = subprocess.Popen(watch_command, env=env, stdout=subprocess.DEVNULL, stderr=first_stderr)
    train = None
    try:
        _wait_for(lambda: "waiting for" in first_log.read_text(), 600, "watch to wait for the run's folder")
        command = [sys.executable, "-m", "protorkd", *train_args]
        train = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        csv_path = experiment / "evaluation_metrics_all.csv"
        _wait_for(lambda: len(_epochs(csv_path)) >= 1, 600, "the first evaluated epoch")
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = subprocess.run(watch_command, env=env, capture_output=True, text=True, timeout=900)
        assert second.returncode == 0, second.stderr[-2000:]
    finally:
        first.kill()
        if train is not None:
            train.wait(timeout=900)
    assert train.returncode == 0
    assert _epochs(csv_path) == [1, 2, 3]  # every saved epoch once, in order, nothing lost
    header = csv_path.read_text().splitlines()[0].split(",")
    metrics = [f"zeroshot/{dataset}/{metric}" for dataset in DATASETS for metric in ZEROSHOT]
    metrics += [f"diagnostics/{dataset}/{metric}" for dataset in DATASETS for metric in DIAGNOSTICS]
    assert header == ["epoch", "eval_precision", "linear_protocol", *metrics]  # what ran, then the numbers
    with Image.open(experiment / "evaluation_metrics_all.png") as plot:  # 36 panels of 3.2 x 2.4 in, 4 a row, 90 dpi
        assert plot.format == "PNG" and plot.size == (1152, 1944)
    assert "the last epoch (3) is evaluated" in second.stderr


def test_single_epoch_prompts_and_bad_input(tiny_corpus, tmp_path, capsys, monkeypatch):
    assert main(tiny_train_args(tiny_corpus, tmp_path, "run", "--epochs", "1", "--zeroshot-frequency", "0")) == 0
    experiment = tmp_path / "run"
    assert main(["watch", str(experiment), "--epoch", "1", "--tasks", "zeroshot", "--workers", "0"]) == 0
    single = experiment / "single_evaluation_metrics@epoch_1.csv"
    assert _epochs(single) == [1]
    answers = iter([str(experiment), "latest"])
    questions = []
    monkeypatch.setattr("builtins.input", lambda prompt: questions.append(prompt) or next(answers))
    assert main(["watch", "--tasks", "zeroshot", "--workers", "0"]) == 0
    assert questions == [
        "Please input your experiment dir: ",
        'Specify a checkpoint epoch? (press "enter" to scan and evaluate all checkpoints) ',
    ]
    assert (experiment / "single_evaluation_metrics@epoch_latest.csv").is_file()
    assert main(["watch", str(experiment), "--epoch", "7"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["watch", str(tmp_path / "nowhere"), "--once"]) == 2
    assert "has no params.txt" in capsys.readouterr().err
