"""`protorkd eval` on a hand-written experiment: tables, records, refusals, default data roots."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from protorkd.cli import main
from protorkd.config import Config, write_params
from protorkd.models.build import build_dual_encoder
from protorkd.models.options import ModelOptions
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


def test_eval_of_a_checkpoint_prints_a_table_appends_results_and_writes_clip_benchmark_json(
    tiny_corpus, tmp_path, capsys
):
    experiment = _experiment(tmp_path)
    output = tmp_path / "out" / "results.json"
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
    assert re.search(r"^zeroshot +shapes +top1 +[0-9.]+$", printed, re.M) and "skipped sts" in printed
    line = json.loads((experiment / "results.jsonl").read_text().splitlines()[-1])
    assert line["epoch"] == 1 and "zeroshot/shapes/top1" in line
    records = json.loads(output.read_text())
    zeroshot = next(r for r in records if r["task"] == "zeroshot_classification")
    assert set(zeroshot) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert zeroshot["metrics"]["acc1"] == pytest.approx(line["zeroshot/shapes/top1"] / 100)
    retrieval = next(r for r in records if r["task"] == "zeroshot_retrieval")
    assert retrieval["metrics"]["image_retrieval_recall@5"] == pytest.approx(
        line["retrieval/shapes/text_to_image_R@5"] / 100
    )
    assert (experiment / "cache" / "eval").is_dir()


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
    ],
)
def test_bad_eval_input_is_one_clear_line(tiny_corpus, capsys, extra, message):
    code = eval_cli(*TINY_FLAGS, "--eval-data-dir", str(tiny_corpus / "eval"), *extra)
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1


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
