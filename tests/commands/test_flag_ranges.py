"""The other commands' flags (issue 25's cases outside `train`): a NaN, an infinity or a value out of range is one
line and exit 2, before anything is created; `train`'s are in test_train.py::test_bad_input_exits_2_and_...."""

from __future__ import annotations

import dataclasses
import math

import pytest

from protorkd.cli import main
from protorkd.config import GROUPS, Config, _field_types, validate_config
from protorkd.errors import UsageError
from protorkd.options import base_type as _base_type


@pytest.mark.parametrize(
    "argv, message",
    [
        (["watch", "{run}", "--interval", "-1"], "argument --interval: -1: must be a finite number, greater than 0"),
        (["watch", "{run}", "--interval", "nan"], "argument --interval: nan: must be a finite number"),
        (["watch", "{garbage}"], "cannot read {garbage}/params.txt"),
        (["gather-cc", "{tsv}", "--out", "{out}", "--max-bytes", "inf"], "argument --max-bytes: 'inf' is not a size"),
        (["gather-cc", "{tsv}", "--out", "{out}", "--max-bytes", "5GB"], "5GB: must be at least 1 byte and at most 10"),
        (["gather-cc", "{tsv}", "--out", "{out}", "--timeout", "nan"], "argument --timeout: nan: must be a finite"),
        (["gather-cc", "{tsv}", "--out", "{out}", "--concurrency", "0"], "argument --concurrency: 0: must be at"),
        (["demo-data", "--out", "{file}"], "--out {file} is a file, not a folder"),
        (["demo-data", "--out", "{out}", "--size", "0"], "argument --size: 0: must be at least 1"),
        (["eval", "--analysis-clusters", "0"], "argument --analysis-clusters: 0: must be at least 2"),
        (["cache-teacher", "--pca-dim", "-1"], "argument --pca-dim: -1: must be at least 0"),
        (["cache-teacher", "--teacher-cache", "{out}", "--lr", "inf"], "--lr inf: must be a finite number"),
    ],
)
def test_a_bad_number_for_any_command_is_one_line_and_creates_nothing(argv, message, tmp_path, capsys):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "params.txt").write_text("epochs: many\n")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "cc.tsv").write_text("a caption\thttp://example.com/a.jpg\n")
    names = {"run": "run", "garbage": "garbage", "file": "file", "tsv": "cc.tsv", "out": "out"}
    fill = {key: str(tmp_path / name) for key, name in names.items()}
    try:
        code = main([part.format(**fill) for part in argv])
    except SystemExit as exit_info:  # argparse's own one-line error
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message.format(**fill) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def _numeric_fields(kind: type) -> list[str]:
    return [
        f.name
        for group in GROUPS.values()
        for f in dataclasses.fields(group)
        if _base_type(_field_types(group)[f.name])[0] is kind
    ]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_flag_of_train_refuses_nan_and_infinity(value):
    names = _numeric_fields(float)
    assert len(names) == 40 and "target_temperature" in names  # even the one without a range
    for name in names:
        values = {**Config().to_flat_dict(), name: value}
        with pytest.raises(UsageError, match=r": must be a finite number$"):
            validate_config(Config.from_flat_dict(values))


def test_the_flags_that_size_memory_have_an_upper_bound():
    """The issue's huge values (each a crash or a fork bomb before) and every width, count and size the run's
    memory grows with."""
    sized = {
        "episode_size": 10**8,
        "workers": 256,
        "image_size": 2048,
        "head_hidden_dim": 16384,
        "projection_hidden_dim": 16384,
        "max_member_bytes": 10**9,
        "max_image_pixels": 178_956_970,
        "queue_size": 2**20,
        "n_prototypes": 2**18,
        "k": 10**6,
        "batch_size": 2**20,
        "seed": 10**6,
        "max_caption_bytes": 10**6,
    }
    for name, maximum in sized.items():
        defaults = Config().to_flat_dict()
        validate_config(Config.from_flat_dict({**defaults, name: maximum}))
        with pytest.raises(UsageError, match=rf"at most {maximum}"):
            validate_config(Config.from_flat_dict({**defaults, name: maximum + 1}))


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_eval_and_cache_teacher_help_list_only_the_flags_that_apply(capsys):
    eval_help = _help("eval", capsys)
    assert "--image-model-builder" in eval_help and "--image-head-n-layers" in eval_help
    for flag in ("--lock-image-model", "--clip-teacher-model", "--adapter", "--add-projection-head", "--teacher "):
        assert flag not in eval_help, flag
    cache_help = _help("cache-teacher", capsys)
    assert "--train-data" in cache_help and "--teacher-cache" in cache_help and "--clip-teacher-model" in cache_help
    for flag in ("--lr ", "--loss ", "--zeroshot-frequency", "--epochs", "--mixup-alpha", "--precision"):
        assert flag not in cache_help, flag


def test_cache_teacher_still_accepts_the_training_flags_it_ignores(tmp_path):
    """One command line (or @file) serves `cache-teacher` and `train`: the flags --help leaves out are parsed."""
    from protorkd.cli import build_parser

    argv = ["cache-teacher", "--teacher-cache", str(tmp_path), "--lr", "0.5", "--epochs", "3", "--loss", "RKD"]
    args = build_parser(argv).parse_args(argv)
    assert (args.lr, args.epochs, args.loss) == (0.5, 3, "RKD")


def test_a_recipe_of_configs_is_found_outside_the_clone(tmp_path, monkeypatch):
    """`protorkd train @configs/NAME.args` from any folder reads the recipe shipped inside the package."""
    from pathlib import Path

    import protorkd
    from protorkd.cli import packaged_recipe

    monkeypatch.chdir(tmp_path)
    shipped = Path(protorkd.__file__).parent / "configs" / "protoclip-cc2.5m-1gpu.args"
    assert packaged_recipe("@configs/protoclip-cc2.5m-1gpu.args") == f"@{shipped}" and shipped.is_file()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "protoclip-cc2.5m-1gpu.args").write_text("--epochs 1\n")
    assert packaged_recipe("@configs/protoclip-cc2.5m-1gpu.args") == "@configs/protoclip-cc2.5m-1gpu.args"  # yours
    package_data = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text().split("package-data]")[1]
    assert '"configs/*.args"' in package_data.split("\n\n")[0]  # shipped in the wheel
