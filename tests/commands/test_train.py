"""End-to-end behaviour of `protorkd train` on a tiny corpus with tiny towers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protorkd.cli import main
from protorkd.params import read_params
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
    assert set(checkpoint) == {
        "epoch",
        "name",
        "config",
        "version",
        "state_dict",
        "locked_towers",
        "logit_scale",
        "tensors_sha256",
    }
    latest = torch.load(root / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert set(latest) == {*checkpoint, "loss_state", "optimizer"}  # + what a resume needs
    assert checkpoint["config"]["batch_size"] == 16
    lines = (root / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"epoch": 2' in lines[1] and "zeroshot/shapes/top1" in lines[1]
    for line in map(json.loads, lines):  # the diagnostics at every evaluation, in results.jsonl and tensorboard
        assert {"diagnostics/shapes_skewed/image_effective_rank", "zeroshot/shapes_skewed/top_class_share"} <= set(line)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "tensorboard")).Reload()
    steps = events.Scalars("eval/diagnostics/shapes/teacher_effective_rank")
    assert [event.value for event in steps] == pytest.approx(
        [json.loads(line)["diagnostics/shapes/teacher_effective_rank"] for line in lines]
    )
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


def _assert_same_weights(path: Path, reference: Path) -> None:
    """The same weights (and, in an epoch_latest.pt, the same loss state and optimizer step)."""
    mine, theirs = _state(path), _state(reference)
    assert mine["epoch"] == theirs["epoch"] and mine.keys() == theirs.keys()
    for part in ("state_dict", "loss_state"):
        if part not in theirs:  # epoch_N.pt holds weights only
            continue
        assert mine[part].keys() == theirs[part].keys()
        for key, value in theirs[part].items():
            assert torch.equal(value, mine[part][key]), f"{path.name} {part} {key}"
    if "optimizer" in theirs:
        assert mine["optimizer"]["state"][0]["step"] == theirs["optimizer"]["state"][0]["step"]


@pytest.fixture(scope="module")
def unique_caption_corpus(tiny_corpus, tmp_path_factory) -> Path:
    """2100 rows over the 96 demo images, every caption different, so the text teacher's cache (2048
    captions a chunk) fills in two chunks and a kill can land between them."""
    lines = (tiny_corpus / "train.tsv").read_text().splitlines()[1:]
    root = tmp_path_factory.mktemp("unique")
    rows = []
    for i in range(2100):
        image, caption = lines[i % len(lines)].split("\t")
        rows.append(f"{tiny_corpus / image}\t{caption} number {i}\n")
    (root / "train.tsv").write_text("filepath\ttitle\n" + "".join(rows))
    (root / "eval").symlink_to(tiny_corpus / "eval")
    return root


def _killed_at(point: str, args: list[str], returncode: int = -signal.SIGKILL) -> str:
    """Run `protorkd <args>` in a child that SIGKILLs itself at failpoint `point` (NAME=N; NAME=N:SIGTERM sends
    itself that signal instead); returns its stderr."""
    # the same thread count as this process (no OMP_NUM_THREADS override): float sums must add up identically
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PROTORKD_FAILPOINTS": point}
    command = [sys.executable, "-m", "protorkd", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == returncode, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_a_run_killed_at_any_point_continues_with_resume_latest_to_the_uninterrupted_weights(
    unique_caption_corpus, tmp_path
):
    """Kills at deterministic points (failpoints, docs/reliability.md): during the teacher-cache fill,
    mid-epoch 1 (no checkpoint yet), and between epoch_latest.pt and epoch_2.pt. Each time the same command
    plus --resume latest continues; the end is bit-identical to a run never interrupted."""
    common = ["--epochs", "3", "--episode-size", "96", "--zeroshot-frequency", "0"]
    assert main(train_args(unique_caption_corpus, tmp_path, "full", *common)) == 0
    args = train_args(unique_caption_corpus, tmp_path, "killed", *common)
    root = tmp_path / "killed"

    _killed_at("teacher-cache-chunk=1", args)  # 2048 of 2100 captions cached
    params = (root / "params.txt").read_bytes()
    (manifest,) = root.glob("cache/teacher-text-*/manifest.json")
    assert json.loads(manifest.read_text())["done"] == 2048 and not any((root / "checkpoints").iterdir())
    assert main(args) == 2  # a plain rerun is refused, pointing at --resume latest

    _killed_at("train-step=3", [*args, "--resume", "latest"])  # mid-epoch 1: no checkpoint yet
    log_text = (root / "out.log").read_text()
    assert "resuming teacher cache" in log_text and "at 2048 / 2100" in log_text
    assert json.loads(manifest.read_text())["complete"] and not any((root / "checkpoints").iterdir())
    cached = manifest.stat().st_mtime_ns

    _killed_at("checkpoint-latest=2", [*args, "--resume", "latest"])  # epoch 2's latest written, epoch_2.pt not
    assert "starting from scratch in the same folder, keeping its teacher cache" in (root / "out.log").read_text()
    assert manifest.stat().st_mtime_ns == cached  # the complete cache was reused, not recomputed
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_latest.pt"]
    assert _state(root / "checkpoints" / "epoch_latest.pt")["epoch"] == 2

    # SIGTERM mid-epoch 3 (a preemption): handled like Ctrl-C, one line, exit 143, the folder resumable
    stderr = _killed_at("train-step=2:SIGTERM", [*args, "--resume", "latest"], returncode=128 + signal.SIGTERM)
    assert stderr.strip().splitlines()[-1] == "protorkd train: terminated (SIGTERM)" and "Traceback" not in stderr
    assert "stopped by SIGTERM; every finished epoch is saved in" in (root / "out.log").read_text()
    assert "restored" in (root / "out.log").read_text()  # that run restored epoch_2.pt before training epoch 3

    assert main([*args, "--resume", "latest"]) == 0
    assert (root / "params.txt").read_bytes() == params  # the same flags: params.txt never rewritten
    for name in ("epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_latest.pt"):
        _assert_same_weights(root / "checkpoints" / name, tmp_path / "full/checkpoints" / name)


def test_a_failure_after_the_folder_exists_leaves_it_resumable(tiny_corpus, tmp_path, capsys):
    from protorkd import failpoints

    args = train_args(tiny_corpus, tmp_path, "run", "--epochs", "1", "--zeroshot-frequency", "0")
    failpoints.arm("experiment-created=1:raise")
    try:
        with pytest.raises(RuntimeError, match="failpoint experiment-created"):
            main(args)
    finally:
        failpoints.arm("")
    assert (tmp_path / "run" / "params.txt").is_file()
    assert main(args) == 2 and "continue it with --resume latest" in capsys.readouterr().err
    assert main([*args, "--resume", "latest"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "epoch_1.pt").is_file()
    assert "starting from scratch in the same folder" in (tmp_path / "run" / "out.log").read_text()


def test_an_evaluation_a_kill_interrupted_runs_when_the_run_resumes(tiny_corpus, tmp_path):
    from protorkd import failpoints

    args = train_args(tiny_corpus, tmp_path, "run", "--epochs", "1")
    failpoints.arm("checkpoint-saved=1:raise")  # after epoch 1's checkpoints, before its evaluation
    try:
        with pytest.raises(RuntimeError):
            main(args)
    finally:
        failpoints.arm("")
    assert not (tmp_path / "run" / "results.jsonl").exists()
    assert main([*args, "--resume", "latest"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1] and "zeroshot/shapes/top1" in lines[0]


def test_a_resume_with_other_flags_stops_in_one_line_and_changes_nothing(tiny_corpus, tmp_path, capsys):
    args = train_args(tiny_corpus, tmp_path, "run", "--epochs", "1", "--zeroshot-frequency", "0")
    assert main(args) == 0
    root = tmp_path / "run"
    before = {
        p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file() and "tensorboard" not in p.parts
    }
    capsys.readouterr()
    assert main([*args, "--resume", "latest", "--lr", "0.1", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--batch-size 16 -> 8" in err and "--lr 0.002 -> 0.1" in err and str(root / "params.txt") in err
    after = {
        p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file() and "tensorboard" not in p.parts
    }
    assert after == before  # params.txt, checkpoints, out.log... untouched

    # flags that change neither the model, the loss, the data nor the steps taken may change
    assert main([*args, "--resume", "latest", "--epochs", "2", "--save-frequency", "2", "--workers", "1"]) == 0
    assert read_params(root / "params.txt").optim.epochs == 2
    changed = "flags changed on resume: --workers 0 -> 1, --epochs 1 -> 2, --save-frequency 1 -> 2"
    assert changed in (root / "out.log").read_text()
    assert _state(root / "checkpoints" / "epoch_2.pt")["epoch"] == 2


def test_resume_latest_starts_an_experiment_that_does_not_exist_yet(tiny_corpus, tmp_path):
    """One command for the first launch and every requeue of a preemptible job (open_clip's convention)."""
    args = train_args(tiny_corpus, tmp_path, "run", "--epochs", "1", "--zeroshot-frequency", "0", "--resume", "latest")
    assert main(args) == 0 and main(args) == 0  # the second call finds the run finished: nothing to train
    log_text = (tmp_path / "run" / "out.log").read_text()
    assert "no experiment" in log_text and "starting it" in log_text and "nothing left to train" in log_text


def test_resume_latest_adopts_a_folder_an_earlier_version_left_without_params_txt(tiny_corpus, tmp_path, capsys):
    """Earlier versions wrote params.txt after the teacher cache, so a kill during the fill left no params.txt."""
    args = train_args(tiny_corpus, tmp_path, "run", "--epochs", "1", "--zeroshot-frequency", "0")
    for folder in ("checkpoints", "cache"):
        (tmp_path / "run" / folder).mkdir(parents=True)
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, "--resume", "latest"]) == 0
    assert read_params(tmp_path / "run" / "params.txt").optim.epochs == 1
    assert (tmp_path / "run" / "checkpoints" / "epoch_1.pt").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not an experiment")
    other = train_args(tiny_corpus, tmp_path, "other", "--epochs", "1", "--resume", "latest")
    assert main(other) == 2 and "is not a protorkd experiment" in capsys.readouterr().err


def test_resume_latest_needs_the_experiment_name(tiny_corpus, tmp_path, capsys):
    args = [a for a in train_args(tiny_corpus, tmp_path, "run") if a not in ("--name", "run")]
    assert main([*args, "--resume", "latest"]) == 2
    assert "--resume latest needs --name" in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


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


def _bad_checkpoints(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    truncated, pickled = folder / "truncated.pt", folder / "pickled.pt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(100)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    torch.save({"epoch": 1, "state_dict": {}, "bad": _Pickled()}, pickled)
    return {"{truncated}": truncated, "{pickled}": pickled}


class _Pickled:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.fixture(scope="module")
def two_caption_corpus(tiny_corpus, tmp_path_factory) -> Path:
    """Every demo image in two rows: its caption, and the same caption behind "a picture:"."""
    lines = (tiny_corpus / "train.tsv").read_text().splitlines()[1:]
    root = tmp_path_factory.mktemp("two_captions")
    rows = []
    for line in lines:
        image, caption = line.split("\t")
        rows += [f"{tiny_corpus / image}\t{caption}\n", f"{tiny_corpus / image}\ta picture: {caption}\n"]
    (root / "train.tsv").write_text("filepath\ttitle\n" + "".join(rows))
    return root


def test_mixup_and_caption_ensembles_train_and_a_killed_run_resumes_to_the_uninterrupted_weights(
    two_caption_corpus, tmp_path
):
    common = ["--epochs", "2", "--episode-size", "96", "--zeroshot-frequency", "0", "--caption-ensemble"]
    mixed = [*common, "--mixup-alpha", "1", "--mixup-prob", "0.5"]
    assert main(train_args(two_caption_corpus, tmp_path, "full", *mixed, eval_data=False)) == 0
    log_text = (tmp_path / "full" / "out.log").read_text()
    assert "caption ensemble: the 192 rows train towards the targets of 96 images" in log_text
    assert "no evaluation: give --eval-data-dir ROOT" in log_text  # no --eval-data-dir: said, not silently skipped
    args = train_args(two_caption_corpus, tmp_path, "killed", *mixed, eval_data=False)
    # Ctrl-C while epoch 1's checkpoints are written: honoured right after both writes, not lost, not mid-write
    stderr = _killed_at("checkpoint-latest=1:SIGINT", args, returncode=130)
    assert stderr.strip().splitlines()[-1] == "protorkd train: interrupted"
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_1.pt", "epoch_latest.pt"]
    assert "stopped by Ctrl-C (SIGINT)" in (tmp_path / "killed" / "out.log").read_text()
    assert main([*args, "--resume", "latest"]) == 0
    for name in ("epoch_1.pt", "epoch_2.pt", "epoch_latest.pt"):
        _assert_same_weights(tmp_path / "killed/checkpoints" / name, tmp_path / "full/checkpoints" / name)
    assert main(train_args(two_caption_corpus, tmp_path, "unmixed", *common, eval_data=False)) == 0
    unmixed = _state(tmp_path / "unmixed/checkpoints/epoch_2.pt")["state_dict"]
    full = _state(tmp_path / "full/checkpoints/epoch_2.pt")["state_dict"]
    assert any(not torch.equal(value, full[key]) for key, value in unmixed.items())  # the mixing reached training


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lrr", "0.1"], "unrecognized arguments: --lrr"),
        (["--loss", "NoSuchLoss"], "valid names: "),
        (["--image-model", "no-such-net"], "unknown custom image architecture"),
        (["--train-data", "/nonexistent/train.tsv"], "no such file"),
        (["--resume", "/nonexistent/epoch_3.pt"], "no checkpoint at /nonexistent/epoch_3.pt"),
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
        (["--loss", "RKD", "--mixup-alpha", "1"], "--loss RKD cannot take mixed images"),
        (["--mixup-prob", "1.5"], "--mixup-prob 1.5: must be at least 0.0 and at most 1.0"),
        (["--teacher", "none", "--caption-ensemble"], "--caption-ensemble averages a locked text teacher"),
        # every numeric and choice flag is checked against its range before anything is created
        (["--epochs", "0"], "--epochs 0: must be at least 1"),
        (["--epochs", "-1"], "--epochs -1: must be at least 1"),
        (["--save-frequency", "0"], "--save-frequency 0: must be at least 1"),
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--workers", "-1"], "--workers -1: must be at least 0"),
        (["--accum-freq", "0"], "--accum-freq 0: must be at least 1"),
        (["--log-every-n-steps", "0"], "--log-every-n-steps 0: must be at least 1"),
        (["--max-bad-fraction", "-0.5"], "--max-bad-fraction -0.5: must be at least 0.0 and at most 1.0"),
        (["--max-bad-fraction", "1.5"], "--max-bad-fraction 1.5: must be at least 0.0 and at most 1.0"),
        (["--report-to", "foo"], "--report-to 'foo': must be a comma-separated list of tensorboard, wandb, all"),
        (["--report-to", "tensorboard,foo"], "--report-to 'tensorboard,foo': must be"),
        (["--temperature", "0"], "--temperature 0.0: must be greater than 0"),
        (["--lora-r", "0"], "--lora-r 0: must be at least 1"),
        (["--k", "0"], "--k 0: must be at least 1"),
        (["--clustering-frequency", "0"], "--clustering-frequency 0: must be -1 (never) or at least 1"),
        (["--joint-projection-dim", "0"], "--joint-projection-dim 0: must be -1 (automatic) or at least 1"),
        (["--beta2", "1.0"], "--beta2 1.0: must be at least 0 and less than 1"),
        (["--dist-timeout-minutes", "0"], "--dist-timeout-minutes 0.0: must be greater than 0"),
        (["--max-image-pixels", "0"], "--max-image-pixels 0: must be at least 1"),
        (["--csv-separator", "ab"], "--csv-separator 'ab': must be one character"),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (["--csv-quoting", "all"], "argument --csv-quoting: invalid choice: 'all'"),
        (["--eval-precision", "bf16"], "argument --eval-precision: invalid choice: 'bf16'"),
        (["--zeroshot-metadata", "/nonexistent/names.json"], "--zeroshot-metadata /nonexistent/names.json: no such"),
        # a bad --resume file with a new --name: refused before the folder exists
        (["--resume", "{truncated}"], "it is truncated or not a torch checkpoint"),
        (["--resume", "{pickled}"], "it holds a pickled object (print)"),
        # issue 25: NaN, infinite and memory-sized flags, each once a traceback (most after the folder existed)
        (["--lr", "inf"], "--lr inf: must be a finite number"),
        (["--lr", "nan"], "--lr nan: must be a finite number"),
        (["--lr", "1e30"], "--lr 1e+30: must be at least 0.0 and at most 10.0"),
        (["--wd", "inf"], "--wd inf: must be a finite number"),
        (["--w-distill", "inf"], "--w-distill inf: must be a finite number"),
        (["--mixup-alpha", "inf"], "--mixup-alpha inf: must be a finite number"),
        (["--temperature", "inf"], "--temperature inf: must be a finite number"),
        (["--image-size", "1"], "--image-size 1: the image tower custom:micro-cnn cannot take 1x1 images"),
        (["--image-model", "tiny-cnn", "--image-size", "8"], "the image tower custom:tiny-cnn cannot take 8x8 images"),
        (["--image-size", "100000"], "--image-size 100000: must be at least 1 and at most 2048"),
        (["--episode-size", "10000000000"], "--episode-size 10000000000: must be at least 0 and at most 100000000"),
        (["--joint-projection-dim", "1000000"], "--joint-projection-dim 1000000: must be -1 (automatic) or at least"),
        (["--head-hidden-dim", "1000000000"], "--head-hidden-dim 1000000000: must be at least 1 and at most 16384"),
        (["--n-prototypes", "100000000"], "--n-prototypes 100000000: must be at least 1 and at most 262144"),
        (["--queue-size", "1000000000"], "--queue-size 1000000000: must be at least 1 and at most 1048576"),
        (["--seed", "1e23"], "argument --seed: invalid int value: '1e23'"),
        (["--seed", str(10**23)], f"--seed {10**23}: must be at least 0 and at most 1000000"),
        (["--workers", "100000"], "--workers 100000: must be at least 0 and at most 256"),
        (["--accum-freq", "100"], "an epoch has 6 batches per process, fewer than --accum-freq 100"),
        # issue 25: refusals that used to come after the teacher cache was filled (and deleted with the folder)
        (["--loss", "SimReg", "--mixup-alpha", "1"], "--loss SimReg cannot take mixed images"),
        (["--teacher", "image", "--caption-ensemble"], "--caption-ensemble averages a locked text teacher"),
        (["--lit-start-epoch", "9"], "--lit-start-epoch 9: the run has only 4 epochs"),
        (["--loss", "ProtoCLIP", "--teacher", "none", "--k", "1000"], "--k 1000: an episode clusters only 96 samples"),
        (["--add-projection-head"], "--add-projection-head: --loss InfoNCE does not use projection heads"),
    ],
)
def test_bad_input_exits_2_and_leaves_nothing_behind(tiny_corpus, tmp_path, capsys, extra, message):
    logs = tmp_path / "logs"
    args = train_args(tiny_corpus, logs, "run")
    if "--train-data" in extra:
        index = args.index("--train-data")
        del args[index : index + 2]
    files = _bad_checkpoints(tmp_path / "checkpoints")
    extra = [str(files.get(value, value)) for value in extra]
    try:
        code = main([*args, *extra])
    except SystemExit as exit_info:  # argparse's own errors (unknown flag, invalid choice)
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not logs.exists() or list(logs.iterdir()) == []  # no folder, not even a hidden temporary one
    assert "unpickled!" not in capsys.readouterr().out


def test_every_numeric_flag_has_a_range_in_its_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in (
        "(default: 4; at least 1 and at most 100000)",  # --epochs
        "(default: 0.01; at least 0.0 and at most 1.0; finite)",  # --max-bad-fraction
        "input resolution in pixels (default: the tower's own); a size the image tower cannot take is refused "
        "before anything is created (at least 1 and at most 2048)",  # --image-size: its default said once
        "at least 0 and less than 1",  # --beta1, --beta2
        "a comma-separated list of tensorboard, wandb, all",  # --report-to
    ):
        assert fragment in text, fragment


def test_existing_experiment_is_refused(tiny_corpus, tmp_path, capsys):
    assert main(train_args(tiny_corpus, tmp_path, "run", "--epochs", "1", "--zeroshot-frequency", "0")) == 0
    assert main(train_args(tiny_corpus, tmp_path, "run", "--epochs", "1")) == 2
    assert "already exists" in capsys.readouterr().err


def test_bf16_weights_train_and_evaluate(tiny_corpus, tmp_path):
    assert main(train_args(tiny_corpus, tmp_path, "bf16", "--epochs", "1", "--precision", "bf16")) == 0
    checkpoint = torch.load(tmp_path / "bf16" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert checkpoint["state_dict"]["image_head.weight"].dtype == torch.bfloat16
    assert "zeroshot/shapes/top1" in (tmp_path / "bf16" / "results.jsonl").read_text()


def _wait_until_stopped(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until `process` is stopped (state T: a SIGSTOP failpoint); fails if it ends or the time runs out."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the first run never reached its failpoint"
        time.sleep(0.05)


def test_an_experiment_in_use_is_refused_and_its_next_resume_tidies_what_a_kill_left(tiny_corpus, tmp_path, capsys):
    """Issue 25: two `--resume latest` on one folder both trained; the same --name started twice ended in an
    OSError traceback. The folder's holder is a real training process, frozen mid-epoch (SIGSTOP failpoint)."""
    from protorkd.errors import UsageError
    from protorkd.train.experiment import Experiment, ExperimentPaths, open_experiment

    args = train_args(tiny_corpus, tmp_path, "run", "--epochs", "1", "--zeroshot-frequency", "0")
    root, log = tmp_path / "run", tmp_path / "holder.log"
    failpoint = {"PROTORKD_FAILPOINTS": "train-step=1:SIGSTOP"}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **failpoint}
    with open(log, "w") as stderr:
        holder = subprocess.Popen([sys.executable, "-m", "protorkd", *args], env=env, stderr=stderr)
    try:
        _wait_until_stopped(holder, log)
        assert main([*args, "--resume", "latest"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"experiment {root} is in use by process {holder.pid}" in err[0]
        # the same --name launched twice at once: this process creates its folder after the holder did
        racing = Experiment(ExperimentPaths(root), exists=False)
        with pytest.raises(UsageError, match=f"was created meanwhile by process {holder.pid}"):
            open_experiment(racing, read_params(root / "params.txt"), {}, is_master=True)
        assert (root / "params.txt").is_file() and not list(tmp_path.glob(".run.*"))  # nothing of the loser's
    finally:
        holder.kill()
        holder.wait(timeout=60)
    # what a kill can leave: a checkpoint write's hidden temporary and a torn last line of results.jsonl
    (root / "checkpoints" / ".epoch_latest.pt.99999.tmp.pt").write_bytes(bytes(4096))
    (root / "results.jsonl").write_text('{"epoch": 0, "step": 0, "zeroshot/sha')
    assert main([*args, "--resume", "latest"]) == 0  # the holder's death released the lock
    log_text = (root / "out.log").read_text()
    removed = "removed 1 temporary files (0.0 MB) of interrupted writes: checkpoints/.epoch_latest.pt.99999.tmp.pt"
    assert removed in log_text
    assert f"{root / 'results.jsonl'}: removed a torn last line that an interrupted write left (37 bytes" in log_text
    assert (root / "results.jsonl").read_text() == "" and sorted(p.name for p in (root / "checkpoints").iterdir()) == [
        "epoch_1.pt",
        "epoch_latest.pt",
    ]
