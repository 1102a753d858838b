"""`protorkd elevater` end to end on tiny datasets and a tiny checkpoint: both modes, files written, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from protorkd.cli import main

DATASETS = ["caltech101", "cifar10", "hateful-memes", "voc2007"]


def elevater(checkpoint: Path, root: Path, *extra: str) -> int:
    return main(
        [
            "elevater",
            "--checkpoint",
            str(checkpoint),
            "--dataset-root",
            str(root),
            "--workers",
            "0",
            "--device",
            "cpu",
            *extra,
        ]
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_zeroshot_writes_per_dataset_results_summary_and_clip_benchmark_json(
    elevater_root, tiny_checkpoint, tmp_path, capsys
):
    output = tmp_path / "out" / "zeroshot.json"
    assert elevater(tiny_checkpoint, elevater_root, "--mode", "zeroshot", "--output", str(output)) == 0
    folder = tiny_checkpoint.parents[1] / "ELEVATER_evaluation" / "zeroshot"
    rows = read_csv(folder / "summary.csv")
    assert [row["dataset"] for row in rows] == [*DATASETS, "Average"]
    assert [row["metric"] for row in rows[:4]] == ["mean-per-class", "accuracy", "roc_auc", "11point_mAP"]
    scores = [float(row["score"]) for row in rows]
    assert all(0.0 <= s <= 100.0 for s in scores) and scores[-1] == pytest.approx(sum(scores[:4]) / 4, abs=0.01)

    records = json.loads(output.read_text())
    assert records == json.loads((folder / "results.json").read_text())
    assert [r["dataset"] for r in records] == [f"elevater/{name}" for name in DATASETS]
    for record in records:
        assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(record)
        assert record["task"] == "zeroshot_classification" and record["pretrained"] == str(tiny_checkpoint)
        assert 0.0 <= record["metrics"]["elevater_score"] <= 1.0  # CLIP_benchmark keeps fractions
    assert "mean_average_precision_11pt" in records[3]["metrics"] and "roc_auc" in records[2]["metrics"]

    cifar = json.loads((folder / "cifar10.json").read_text())
    assert cifar["test_images"] == 6 and cifar["classes"] == 3 and cifar["prompts_from"] == "label map"
    assert cifar["metrics"]["score"] == cifar["metrics"]["top1"]
    assert (folder / "log.txt").read_text().count("cifar10: accuracy") == 1
    assert "Average" in capsys.readouterr().out


def test_few_shot_linear_probe_averages_seeds_and_separates_colours(elevater_root, tiny_checkpoint, tmp_path):
    results = tmp_path / "probe"
    assert (
        elevater(
            tiny_checkpoint,
            elevater_root,
            "--mode",
            "linear_probe",
            "--num-shots",
            "2",
            "--seeds",
            "0,1",
            "--results-dir",
            str(results),
        )
        == 0
    )
    rows = {row["dataset"]: row for row in read_csv(results / "summary.csv")}
    assert [rows[name]["seeds"] for name in DATASETS] == ["2"] * 4
    # one colour per class: frozen random CNN features are linearly separable, so every metric is perfect
    assert [float(rows[name]["score"]) for name in DATASETS] == [100.0] * 4
    voc = json.loads((results / "voc2007.json").read_text())
    assert voc["num_shots"] == 2 and voc["seeds"] == [0, 1] and {"seed0/score", "seed1/score"} <= set(voc["metrics"])
    records = json.loads((results / "results.json").read_text())
    assert {r["task"] for r in records} == {"linear_probe"} and records[1]["metrics"]["lp_acc1"] == 1.0
    assert records[0]["num_shots"] == 2 and "elevater_score_std" in records[0]["metrics"]


def test_full_linear_probe_lands_in_the_linear_probe_folder(elevater_root, tiny_checkpoint):
    assert elevater(tiny_checkpoint, elevater_root, "--mode", "linear_probe", "--datasets", "cifar10") == 0
    rows = read_csv(tiny_checkpoint.parents[1] / "ELEVATER_evaluation" / "linear_probe" / "summary.csv")
    assert [row["dataset"] for row in rows] == ["cifar10", "Average"] and rows[0]["seeds"] == "1"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "zeroshot", "--datasets", "dtd"], "dtd is not under"),
        (["--mode", "zeroshot", "--num-shots", "5"], "--num-shots applies to --mode linear_probe only"),
        (["--mode", "linear_probe", "--num-shots", "0"], "--num-shots 0"),
        (["--mode", "zeroshot", "--datasets", "imagenet"], "unknown ELEVATER dataset 'imagenet'"),
        (["--datasets", "cifar10"], "--mode required"),
    ],
)
def test_user_errors_end_with_one_line_and_exit_code_2(elevater_root, tiny_checkpoint, capsys, extra, message):
    assert elevater(tiny_checkpoint, elevater_root, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
