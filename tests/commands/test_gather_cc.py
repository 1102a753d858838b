"""`protorkd gather-cc` on the command line: a killed process resumes, bad input is one line, every flag has help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from protorkd.cli import main as cli_main
from protorkd.data.gather_cc import gather_cc
from protorkd.errors import UsageError
from tests.support.gather_server import LOCAL, write_tsv


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["tsv", "webdataset"])
def test_killed_run_resumes_to_the_same_output_as_an_uninterrupted_run(image_server, tmp_path, output_format):
    """The child is killed at a point it cannot pass: row 20's request is held by the server, so every other
    row is finished and recorded, row 20 is in flight, and (webdataset) shards 2 and 4 are unpacked."""
    held = f"kill-{output_format}"
    rows = [(f"photo {i}", f"/jpg/{200 + i}x150") for i in range(40)]
    rows[5] = ("dead", "/status/404")
    rows[20] = ("held", f"/hold/{held}/jpg/220x150")
    rows[23] = ("icon", "/jpg/16x16")
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, rows)
    options = ["--timeout", "600", "--shard-size", "8", "--format", output_format, "--allow-private-hosts"]

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "protorkd", "gather-cc", str(tsv), "--out", str(killed), "--concurrency", "2"]
    process = subprocess.Popen(command + options, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = killed / "state.jsonl"
    expected_done = [row for row in range(40) if row != 20]
    packed = ["00000.tar", "00001.tar", "00003.tar"] if output_format == "webdataset" else []

    def stuck_at_row_20() -> bool:  # every other row recorded, and every shard without row 20 packed
        lines = len(state.read_bytes().splitlines()) if state.exists() else 0
        return lines == 1 + len(expected_done) and all((killed / name).exists() for name in packed)

    deadline = time.monotonic() + 300  # a failsafe only: the child cannot pass row 20, so nothing is raced
    while process.poll() is None and time.monotonic() < deadline and not stuck_at_row_20():
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    image_server.release(held)
    assert not (killed / "train.tsv").exists() and not (killed / "stats.json").exists()
    for path in killed.glob("images/*/*.jpg"):  # staged images are whole: written to .tmp, then renamed
        with Image.open(path) as image:
            image.load()
    done_before = [json.loads(line)["row"] for line in state.read_text().splitlines()[1:]]
    assert sorted(done_before) == expected_done
    assert sorted(p.name for p in killed.glob("*.tar")) == packed

    image_server.hits.clear()
    settings = dict(output_format=output_format, timeout=600.0, shard_size=8, progress=False)
    resumed = gather_cc(tsv, killed, concurrency=8, allow_private_hosts=True, **settings)
    assert dict(image_server.hits) == {f"/hold/{held}/jpg/220x150": 1}  # only the row in flight is fetched again
    assert resumed["this_run"]["rows"] == 1

    whole = gather_cc(tsv, tmp_path / "whole", concurrency=8, allow_private_hosts=True, **settings)
    assert resumed["failures"] == whole["failures"] == {"http_404": 1, "too_small": 1}
    if output_format == "tsv":
        assert (killed / "train.tsv").read_bytes() == (tmp_path / "whole" / "train.tsv").read_bytes()
        outputs = sorted(p.relative_to(killed).as_posix() for p in killed.glob("images/*/*"))
    else:
        outputs = sorted(p.name for p in killed.glob("*.tar")) + ["sizes.json"]
        assert outputs[:-1] == [f"{shard:05d}.tar" for shard in range(5)] and not (killed / "images").exists()
    for name in outputs:  # byte-identical images, or tar shards (fixed member times)
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("a cat\thttp://x/1.jpg\nsecond row\n", "line 2: expected 2 tab-separated fields"),
        ("http://x/1.jpg\ta cat\n", "columns look swapped"),
    ],
)
def test_bad_input_is_a_usage_error_naming_file_and_line(tmp_path, capsys, content, message):
    tsv = tmp_path / "cc.tsv"
    if content is not None:
        tsv.write_text(content)
    with pytest.raises(UsageError, match=message):
        gather_cc(tsv, tmp_path / "out", **LOCAL)
    assert cli_main(["gather-cc", str(tsv), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tsv) in error and message in error


def test_cli_registers_every_flag_with_help(capsys):
    with pytest.raises(SystemExit):
        cli_main(["gather-cc", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--out",
        "--format",
        "--concurrency",
        "--timeout",
        "--retries",
        "--max-bytes",
        "--max-side",
        "--min-side",
        "--max-pixels",
        "--shard-size",
        "--subset",
        "--seed",
        "--retry-failed",
        "--decode-threads",
        "--allow-private-hosts",
        "--allow-private-host",
    ):
        assert flag in text


def test_cli_accepts_human_byte_sizes(image_server, tmp_path):
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, [("photo", "/jpg/300x200"), ("big", "/big/300000")])
    out = str(tmp_path / "out")
    code = cli_main(["gather-cc", str(tsv), "--out", out, "--max-bytes", "100kB", "--allow-private-hosts"])
    assert code == 0
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["failures"] == {"too_large": 1}
    assert os.path.getsize(tmp_path / "out" / "images" / "00000" / "000000000.jpg") > 0
