"""Flags: every one has help, parses back, and params.txt round-trips the config."""

from __future__ import annotations

import argparse

from protorkd.config import Config, DataConfig, LogConfig, add_config_arguments, config_from_namespace
from protorkd.models.options import ModelOptions
from protorkd.params import read_params, write_params


def test_params_round_trip_keeps_types_and_odd_strings(tmp_path):
    cfg = Config(
        data=DataConfig(csv_separator="\t", dataset_size=None, episode_size=7),
        model=ModelOptions(lock_image_model=True, adapter="lora", text_model="a: b"),
        log=LogConfig(name="x y", report_to=""),
    )
    write_params(cfg, tmp_path / "params.txt", resolved={"world_size": 2, "experiment": "x y"})
    assert read_params(tmp_path / "params.txt") == cfg
    user, resolved = (tmp_path / "params.txt").read_text().split("# resolved")
    assert "world_size: 2" in resolved and "world_size" not in user and "name: 'x y'" in user


def test_every_flag_has_help_and_parses_back():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and "default:" in action.help, action.dest
    cfg = config_from_namespace(parser.parse_args(["--no-lock-text-model", "--dataset-size", "None", "--lr", "3"]))
    assert (
        cfg.data.dataset_size is None
        and cfg.optim.lr == 3.0
        and cfg == config_from_namespace(parser.parse_args(["--lr", "3"]))
    )


def test_every_numeric_flag_has_an_allowed_range():
    import dataclasses

    from protorkd.config import GROUPS, _field_types
    from protorkd.options import base_type

    unbounded = {"target_temperature"}  # any real: <= 0 means hard labels
    missing = []
    for group in GROUPS.values():
        hints = _field_types(group)
        for f in dataclasses.fields(group):
            if base_type(hints[f.name])[0] in (int, float) and f.metadata.get("rule") is None:
                missing.append(f.name)
    assert sorted(missing) == sorted(unbounded)


def test_validate_config_names_the_flag_and_its_range():
    import pytest

    from protorkd.config import OptimConfig, validate_config
    from protorkd.errors import UsageError

    validate_config(Config())  # the defaults are valid
    with pytest.raises(UsageError, match=r"^--epochs 0: must be at least 1 and at most 100000$"):
        validate_config(Config(optim=OptimConfig(epochs=0)))
    with pytest.raises(UsageError, match=r"^--precision 'fp8': must be one of auto, fp32, amp, amp_bf16, bf16$"):
        validate_config(Config(optim=OptimConfig(precision="fp8")))
    with pytest.raises(UsageError, match=r"^--dataset-type 'zip': must be one of auto, csv, webdataset$"):
        validate_config(Config(data=DataConfig(dataset_type="zip")))
    validate_config(Config(data=DataConfig(dataset_size=None, augmentation=None)))  # None passes for optional flags


def test_the_flags_a_resume_may_change_are_exactly_the_documented_ones():
    from protorkd.params import resumable_flags

    assert resumable_flags() == {
        "max_bad_fraction",
        "workers",
        "epochs",
        "device",
        "torchcompile",
        "malloc_mmap_threshold_mb",
        "dist_timeout_minutes",
        "eval_data_dir",
        "eval_precision",
        "linear_protocol",
        "zeroshot_metadata",
        "zeroshot_frequency",
        "linear_frequency",
        "retrieval_frequency",
        "nlp_eval_frequency",
        "logs",
        "name",
        "resume",
        "save_frequency",
        "keep_checkpoints",
        "report_to",
        "wandb_project",
        "log_every_n_steps",
        "teacher_cache",
    }
