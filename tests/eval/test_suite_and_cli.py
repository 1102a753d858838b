"""The suite on the demo's held-out data root, and `protorkd eval` on a hand-written experiment."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from protorkd.cli import main
from protorkd.config import Config, ModelConfig, write_params
from protorkd.eval.features import FeatureCache
from protorkd.eval.suite import EvalOptions, evaluate_during_training, run_suite
from protorkd.models.build import build_dual_encoder

TINY = ModelConfig(
    image_model_builder="custom",
    image_model="micro-cnn",
    text_model_builder="custom",
    text_model="tiny-text",
    teacher="none",
)
TINY_FLAGS = [
    "--image-model-builder",
    "custom",
    "--image-model",
    "micro-cnn",
    "--text-model-builder",
    "custom",
    "--text-model",
    "tiny-text",
    "--teacher",
    "none",
]


def test_suite_runs_every_task_with_data_and_skips_the_rest(tiny_model, tiny_corpus, tmp_path):
    root = tiny_corpus / "eval"
    cache = FeatureCache(tmp_path / "cache")
    options = EvalOptions(batch_size=64, cache=cache)
    result = run_suite(tiny_model, root, options=options)
    metrics = result.metrics
    assert {
        "zeroshot/shapes/top1",
        "linear/shapes/top1",
        "retrieval/shapes/mean_recall",
        "analysis/shapes/modality_gap",
    } <= set(metrics)
    assert set(result.skipped) == {"sts"} and "sts" in result.skipped["sts"]
    assert 0.0 <= metrics["zeroshot/shapes/top1"] <= 100.0
    # a second run reuses the cached classifier and linear-probe features and gives the same numbers
    misses = cache.misses
    again = run_suite(tiny_model, root, tasks=["zeroshot", "linear"], options=options).metrics
    assert cache.misses == misses
    assert all(again[k] == metrics[k] for k in again)


def test_a_cached_entry_is_never_served_for_other_weights(tiny_corpus, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    torch.manual_seed(1)
    first = build_dual_encoder(TINY).eval()
    run_suite(first, tiny_corpus / "eval", tasks=["linear"], options=EvalOptions(cache=cache))
    torch.manual_seed(2)
    second = build_dual_encoder(TINY).eval()
    misses = cache.misses
    run_suite(second, tiny_corpus / "eval", tasks=["linear"], options=EvalOptions(cache=cache))
    assert cache.misses == misses + 2  # train and test features recomputed


def test_training_evaluation_runs_only_the_due_tasks(tiny_model, tiny_corpus):
    frequencies = {"zeroshot": 2, "retrieval": 1, "sts": 1}
    odd = evaluate_during_training(
        tiny_model,
        tiny_corpus / "eval",
        epoch=1,
        last_epoch=3,
        frequencies=frequencies,
        device=torch.device("cpu"),
        batch_size=64,
    )
    assert any(k.startswith("retrieval/") for k in odd) and not any(k.startswith("zeroshot/") for k in odd)
    last = evaluate_during_training(
        tiny_model,
        tiny_corpus / "eval",
        epoch=3,
        last_epoch=3,
        frequencies=frequencies,
        device=torch.device("cpu"),
        batch_size=64,
    )
    assert any(k.startswith("zeroshot/") for k in last)
    assert (
        evaluate_during_training(
            tiny_model, None, epoch=1, last_epoch=1, frequencies=frequencies, device=torch.device("cpu")
        )
        == {}
    )


def _experiment(tmp_path, model_config: ModelConfig = TINY, *, params_config: ModelConfig | None = None):
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


def test_eval_of_a_checkpoint_prints_a_table_appends_results_and_writes_clip_benchmark_json(
    tiny_corpus, tmp_path, capsys
):
    experiment = _experiment(tmp_path)
    output = tmp_path / "out" / "results.json"
    code = main(
        [
            "eval",
            "--checkpoint",
            str(experiment / "checkpoints" / "epoch_1.pt"),
            "--eval-data-dir",
            str(tiny_corpus / "eval"),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--output",
            str(output),
        ]
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
    code = main(
        [
            "eval",
            *TINY_FLAGS,
            "--eval-data-dir",
            str(tiny_corpus / "eval"),
            "--tasks",
            "retrieval",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-cache",
        ]
    )
    assert code == 0 and re.search(r"^retrieval +shapes +mean_recall", capsys.readouterr().out, re.M)


def test_a_checkpoint_that_does_not_match_its_params_txt_is_refused(tmp_path, tiny_corpus, capsys):
    other = dataclasses.replace(TINY, image_model="tiny-cnn")
    experiment = _experiment(tmp_path, params_config=other)
    code = main(
        [
            "eval",
            "--checkpoint",
            str(experiment / "checkpoints" / "epoch_1.pt"),
            "--eval-data-dir",
            str(tiny_corpus / "eval"),
            "--device",
            "cpu",
            "--workers",
            "0",
        ]
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
    code = main(
        [
            "eval",
            "--checkpoint",
            str(path),
            "--eval-data-dir",
            str(tiny_corpus / "eval"),
            "--device",
            "cpu",
            "--workers",
            "0",
        ]
    )
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
    code = main(
        ["eval", *TINY_FLAGS, "--eval-data-dir", str(tiny_corpus / "eval"), "--device", "cpu", "--workers", "0", *extra]
    )
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
    code = main(
        [
            "eval",
            "--checkpoint",
            str(experiment / "checkpoints" / "e.pt"),
            "--tasks",
            "zeroshot",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-cache",
        ]
    )
    assert code == 0 and re.search(r"^zeroshot +shapes +top1", capsys.readouterr().out, re.M)
