"""`protorkd eval` on a hand-written experiment: tables, records, refusals, default data roots."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from protorkd.cli import main
from protorkd.config import Config
from protorkd.models.build import build_dual_encoder
from protorkd.models.options import ModelOptions
from protorkd.params import write_params
from tests.conftest import TINY_TOWER_FLAGS, TINY_TOWERS

TINY = TINY_TOWERS
TINY_FLAGS = [*TINY_TOWER_FLAGS, "--teacher", "none"]


def _experiment(tmp_path, model_config: ModelOptions = TINY, *, params_config: ModelOptions | None = None):
    """An experiment folder as training writes it: params.txt and checkpoints/epoch_1.pt."""
    experiment = tmp_path / "exp"
    (experiment / "checkpoints").mkdir(parents=True)
    config = Config(model=model_config)
    write_params(dataclasses.replace(config, model=params_config or model_config), experiment / "params.txt")
    torch.manual_seed(0)
    model = build_dual_encoder(model_config)
    torch.save(
        {"epoch": 1, "name": "exp", "state_dict": model.state_dict(), "config": config.to_flat_dict()},
        experiment / "checkpoints" / "epoch_1.pt",
    )
    return experiment


def eval_cli(*args: str) -> int:
    """`protorkd eval ARGS` on the CPU, without data-loading workers."""
    return main(["eval", *args, "--device", "cpu", "--workers", "0"])


def test_eval_of_a_checkpoint_prints_a_table_appends_results_and_writes_clip_benchmark_files(
    tiny_corpus, tmp_path, capsys
):
    experiment = _experiment(tmp_path)
    output = tmp_path / "out"
    code = eval_cli(
        "--checkpoint",
        str(experiment / "checkpoints" / "epoch_1.pt"),
        "--eval-data-dir",
        str(tiny_corpus / "eval"),
        "--output",
        str(output),
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"^zeroshot +shapes +top1 +[0-9.]+ +\[[0-9.]+, [0-9.]+\]$", printed, re.M)
    assert "skipped sts" in printed
    line = json.loads((experiment / "results.jsonl").read_text().splitlines()[-1])
    assert line["epoch"] == 1 and "zeroshot/shapes/top1" in line and "linear_clip_benchmark_joint/shapes/top1" in line
    assert line["eval_precision"] == "fp32" and line["linear_protocol"] == "clip_benchmark"
    # one CLIP_benchmark file per (dataset, task), named as `clip_benchmark eval` names them
    # (shapes_unseen, the compositional split, and shapes_skewed are test-only: no linear probe)
    TEST_ONLY = ("feature_analysis", "representation_diagnostics", "zeroshot_classification", "zeroshot_retrieval")
    assert sorted(p.name for p in output.iterdir()) == [
        f"{dataset}_epoch_1.pt_protorkd_exp_en_{task}.json"
        for dataset, tasks in (
            ("shapes", sorted(("linear_probe", *TEST_ONLY))),
            ("shapes_skewed", TEST_ONLY),
            ("shapes_unseen", TEST_ONLY),
        )
        for task in tasks
    ]
    zeroshot = json.loads((output / "shapes_epoch_1.pt_protorkd_exp_en_zeroshot_classification.json").read_text())
    assert set(zeroshot) == {"dataset", "model", "pretrained", "task", "metrics", "language", "precision"}
    assert zeroshot["precision"] == "fp32"
    metrics = {key: value for key, value in zeroshot["metrics"].items() if "_ci95_" not in key}
    assert metrics == {
        "acc1": pytest.approx(line["zeroshot/shapes/top1"] / 100, abs=1e-12),
        "acc5": pytest.approx(line["zeroshot/shapes/top5"] / 100, abs=1e-12),
        "mean_per_class_recall": pytest.approx(line["zeroshot/shapes/mean_per_class_recall"] / 100, abs=1e-12),
        "prediction_entropy": pytest.approx(line["zeroshot/shapes/prediction_entropy"], abs=1e-12),
        "top_class_share": pytest.approx(line["zeroshot/shapes/top_class_share"] / 100, abs=1e-12),
    }
    # the 95 % Wilson interval of acc1 (80 test images), beside it
    low, high = zeroshot["metrics"]["acc1_ci95_low"], zeroshot["metrics"]["acc1_ci95_high"]
    assert low < zeroshot["metrics"]["acc1"] < high or zeroshot["metrics"]["acc1"] in (low, high)
    assert (experiment / "cache" / "eval").is_dir()


def test_clip_benchmarks_own_build_command_reads_our_files_into_its_csv(tiny_corpus, tmp_path):
    """`clip_benchmark build DIR` (its `main_build`, skipped without the compare extra) over `--output DIR`."""
    cli = pytest.importorskip("clip_benchmark.cli")
    experiment = _experiment(tmp_path)
    output = tmp_path / "out"
    checkpoint = str(experiment / "checkpoints" / "epoch_1.pt")
    eval_cli("--checkpoint", checkpoint, "--eval-data-dir", str(tiny_corpus / "eval"), "--output", str(output))
    line = json.loads((experiment / "results.jsonl").read_text().splitlines()[-1])
    cli.main_build(argparse.Namespace(files=[str(output)], output=str(tmp_path / "benchmark.csv")))
    with open(tmp_path / "benchmark.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert {row["dataset"] for row in table} == {"shapes", "shapes_skewed", "shapes_unseen"}
    rows = {row["task"]: row for row in table if row["dataset"] == "shapes"}
    assert set(rows) == {
        "zeroshot_classification",
        "linear_probe",
        "zeroshot_retrieval",
        "feature_analysis",
        "representation_diagnostics",
    }
    rows = {task: row for task, row in rows.items() if row["dataset"] == "shapes"}  # shapes_unseen's rows aside
    assert rows["zeroshot_classification"]["model_fullname"] == f"protorkd:exp {checkpoint}"
    expected = {
        ("zeroshot_classification", "acc1"): line["zeroshot/shapes/top1"] / 100,
        ("zeroshot_classification", "mean_per_class_recall"): line["zeroshot/shapes/mean_per_class_recall"] / 100,
        ("linear_probe", "lp_acc1"): line["linear_clip_benchmark_joint/shapes/top1"] / 100,
        ("linear_probe", "lp_acc5"): line["linear_clip_benchmark_joint/shapes/top5"] / 100,
        ("linear_probe", "weight_decay"): line["linear_clip_benchmark_joint/shapes/weight_decay"],
        ("zeroshot_retrieval", "image_retrieval_recall@5"): line["retrieval/shapes/text_to_image_R@5"] / 100,
        ("zeroshot_retrieval", "text_retrieval_recall@1"): line["retrieval/shapes/image_to_text_R@1"] / 100,
        ("feature_analysis", "image_text_cluster_ari"): line["analysis/shapes/image_text_cluster_ari"] / 100,
        ("feature_analysis", "modality_gap"): line["analysis/shapes/modality_gap"],
        ("representation_diagnostics", "image_effective_rank"): line["diagnostics/shapes/image_effective_rank"],
    }
    assert {key: float(rows[key[0]][key[1]]) for key in expected} == pytest.approx(expected, abs=1e-12)
    assert rows["linear_probe"]["normalized"] == "True"


def test_probe_files_are_named_by_protocol_and_features_and_never_overwrite_each_other(tiny_corpus, tmp_path):
    output = tmp_path / "out"
    root = str(tiny_corpus / "eval")
    common = (*TINY_FLAGS, "--eval-data-dir", root, "--tasks", "linear", "--datasets", "shapes", "--no-cache")
    for protocol in ("clip_benchmark", "cv"):
        for features in ("joint", "backbone"):
            args = ("--linear-protocol", protocol, "--linear-features", features, "--output", str(output))
            assert eval_cli(*common, *args) == 0
    records = {p.name.split("_en_")[1]: json.loads(p.read_text()) for p in output.iterdir() if "linear" in p.name}
    assert set(records) == {
        "linear_probe.json",
        "linear_probe_backbone.json",
        "linear_probe_cv.json",
        "linear_probe_cv_backbone.json",
    }
    # only CLIP_benchmark's own protocol on joint features writes CLIP_benchmark's lp_acc1
    assert [name for name, r in records.items() if "lp_acc1" in r["metrics"]] == ["linear_probe.json"]
    assert "lp_cv_acc1" in records["linear_probe_cv.json"]["metrics"]
    assert "lp_cv_backbone_acc1" in records["linear_probe_cv_backbone.json"]["metrics"]
    assert records["linear_probe.json"]["metrics"]["normalized"] is True
    assert records["linear_probe_backbone.json"]["metrics"]["normalized"] is False


def test_per_class_csv_holds_each_class_recall_and_they_average_to_the_mean_per_class_recall(tiny_corpus, tmp_path):
    output = tmp_path / "out"
    root = str(tiny_corpus / "eval")
    args = ("--eval-data-dir", root, "--tasks", "zeroshot", "--datasets", "shapes", "--output", str(output))
    assert eval_cli(*TINY_FLAGS, *args, "--per-class", "--no-cache") == 0
    [table] = list(output.glob("*.per_class.csv"))
    record = json.loads(table.with_name(table.name.replace(".per_class.csv", ".json")).read_text())
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and sum(int(row["images"]) for row in rows) == 80  # 8 classes x 10 test images
    recalls = [float(row["top1_recall"]) for row in rows]
    assert np.mean(recalls) / 100 == pytest.approx(record["metrics"]["mean_per_class_recall"], abs=1e-6)
    hits = sum(float(row["top1_hits"]) for row in rows)
    assert hits / 80 == pytest.approx(record["metrics"]["acc1"], abs=1e-9)


@pytest.mark.parametrize(("asked", "recorded"), [("amp", "fp32"), ("amp_bf16", "amp_bf16"), ("fp32", "fp32")])
def test_the_precision_that_ran_is_recorded(tiny_corpus, tmp_path, asked, recorded):
    output = tmp_path / "out"
    args = ("--eval-data-dir", str(tiny_corpus / "eval"), "--tasks", "zeroshot", "--datasets", "shapes")
    assert eval_cli(*TINY_FLAGS, *args, "--eval-precision", asked, "--output", str(output), "--no-cache") == 0
    records = [json.loads(p.read_text()) for p in output.iterdir()]  # zero-shot's, and the diagnostics beside it
    assert {r["task"] for r in records} == {"zeroshot_classification", "representation_diagnostics"}
    assert all(r["precision"] == recorded for r in records)  # amp on the CPU: fp32 ran (no fp16 autocast)


def test_tower_flags_evaluate_a_model_without_training(tiny_corpus, capsys):
    code = eval_cli(*TINY_FLAGS, "--eval-data-dir", str(tiny_corpus / "eval"), "--tasks", "retrieval", "--no-cache")
    assert code == 0 and re.search(r"^retrieval +shapes +mean_recall", capsys.readouterr().out, re.M)


def test_a_checkpoint_that_does_not_match_its_params_txt_is_refused(tmp_path, tiny_corpus, capsys):
    other = dataclasses.replace(TINY, image_model="tiny-cnn")
    experiment = _experiment(tmp_path, params_config=other)
    code = eval_cli(
        "--checkpoint", str(experiment / "checkpoints" / "epoch_1.pt"), "--eval-data-dir", str(tiny_corpus / "eval")
    )
    error = capsys.readouterr().err
    assert code == 2 and "params.txt" in error and "image_model: 'micro-cnn' vs 'tiny-cnn'" in error


def test_weights_that_do_not_fit_the_described_model_are_refused(tmp_path, tiny_corpus, capsys):
    experiment = _experiment(tmp_path)
    path = experiment / "checkpoints" / "epoch_1.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["image_model"] = "tiny-cnn"
    (experiment / "params.txt").unlink()
    torch.save(checkpoint, path)
    code = eval_cli("--checkpoint", str(path), "--eval-data-dir", str(tiny_corpus / "eval"))
    error = capsys.readouterr().err
    assert code == 2 and "does not fit the model" in error and str(path) in error


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "zeroshot,bogus"], "unknown bogus"),
        (["--datasets", "imagenet"], "imagenet/test"),
        (["--zeroshot-metadata", "/nonexistent.json"], "/nonexistent.json"),
        (["--per-class"], "--per-class writes its CSV files beside the result files"),
    ],
)
def test_bad_eval_input_is_one_clear_line(tiny_corpus, capsys, extra, message):
    code = eval_cli(*TINY_FLAGS, "--eval-data-dir", str(tiny_corpus / "eval"), *extra)
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1


def test_an_output_that_is_a_file_is_refused_naming_it(tiny_corpus, tmp_path, capsys):
    existing = tmp_path / "results.json"
    existing.write_text("[]")
    code = eval_cli(*TINY_FLAGS, "--eval-data-dir", str(tiny_corpus / "eval"), "--output", str(existing))
    error = capsys.readouterr().err
    assert code == 2 and f"--output {existing}: not a folder" in error and len(error.strip().splitlines()) == 1


def test_checkpoint_and_tower_flags_together_are_refused(tmp_path, tiny_corpus, capsys):
    experiment = _experiment(tmp_path)
    code = main(
        [
            "eval",
            "--checkpoint",
            str(experiment / "checkpoints" / "epoch_1.pt"),
            "--image-model",
            "tiny-cnn",
            "--eval-data-dir",
            str(tiny_corpus / "eval"),
        ]
    )
    assert code == 2 and "drop the tower flags (--image-model)" in capsys.readouterr().err


def test_a_checkpoint_is_evaluated_on_its_training_runs_data_root_by_default(tmp_path, tiny_corpus, capsys):
    from protorkd.config import EvalConfig

    experiment = tmp_path / "exp"
    (experiment / "checkpoints").mkdir(parents=True)
    config = Config(model=TINY, eval=EvalConfig(eval_data_dir=str(tiny_corpus / "eval")))
    write_params(config, experiment / "params.txt")
    state = build_dual_encoder(TINY).state_dict()
    torch.save({"epoch": 2, "state_dict": state, "config": config.to_flat_dict()}, experiment / "checkpoints" / "e.pt")
    code = eval_cli("--checkpoint", str(experiment / "checkpoints" / "e.pt"), "--tasks", "zeroshot", "--no-cache")
    assert code == 0 and re.search(r"^zeroshot +shapes +top1", capsys.readouterr().out, re.M)


def _root_with_classes(root, train_classes, test_classes):
    """ROOT/things/{train,test}/<class>/ with two small images per class (issue 25's mislabelled probe)."""
    from PIL import Image

    for split, classes in (("train", train_classes), ("test", test_classes)):
        for index, name in enumerate(classes):
            folder = root / "things" / split / name
            folder.mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (32, 32), (40 * index, 10 * k, 200)).save(folder / f"{k}.png")
    return root


@pytest.mark.parametrize("missing", ["train", "test"])
def test_a_probe_on_splits_that_disagree_on_classes_is_refused_in_one_line(tmp_path, capsys, missing):
    """Issue 25: a test split without one class scored 33.33 and a train split without one 25.00, exit 0."""
    full, fewer = ["ant", "bee", "cat", "dog"], ["ant", "bee", "cat"]
    train, test = (fewer, full) if missing == "train" else (full, fewer)
    root = _root_with_classes(tmp_path / "root", train, test)
    code = eval_cli(*TINY_FLAGS, "--eval-data-dir", str(root), "--tasks", "linear", "--no-cache")
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1
    assert error[0] == (
        "protorkd eval: error: things: its train and test splits have different class folders (dog); give both the "
        "same classes"
    )


def test_zero_shot_names_that_do_not_fit_the_class_folders_are_refused_in_one_line(tmp_path, capsys):
    root = _root_with_classes(tmp_path / "root", ["ant", "bee", "cat", "dog"], ["ant", "bee", "cat"])
    (root / "zeroshot_metadata.json").write_text(
        json.dumps({"things": {"classes": ["ant", "bee", "cat", "dog"], "templates": ["a photo of a {}."]}})
    )
    code = eval_cli(*TINY_FLAGS, "--eval-data-dir", str(root), "--tasks", "zeroshot", "--no-cache")
    error = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2
        and error[-1].startswith("protorkd eval: error: ")
        and "lists 4 classes but the dataset has 3" in error[-1]
    )
