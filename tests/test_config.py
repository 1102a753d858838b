"""Flags: every one has help, parses back, and params.txt round-trips the config."""

from __future__ import annotations

import argparse

from protorkd.config import (
    Config,
    DataConfig,
    LogConfig,
    add_config_arguments,
    config_from_namespace,
    read_params,
    write_params,
)
from protorkd.models.options import ModelOptions


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
