"""The runtime flags `eval`, `watch` and `elevater` share are range-checked by argparse: one line, exit 2."""

from __future__ import annotations

import pytest

from protorkd.cli import main


@pytest.mark.parametrize("command", ["eval", "watch", "elevater"])
@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--batch-size", "0", "argument --batch-size: 0: must be at least 1"),
        ("--workers", "-1", "argument --workers: -1: must be at least 0"),
        ("--batch-size", "many", "argument --batch-size: 'many' is not an integer"),
    ],
)
def test_runtime_flags_out_of_range_exit_2_in_one_line(command, flag, value, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([command, flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
