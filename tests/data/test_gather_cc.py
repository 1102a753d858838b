"""gather-cc against a local server (tests/data/conftest.py): outputs, failure kinds, retries, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from protorkd.cli import main as cli_main
from protorkd.data.gather_cc import gather_cc
from protorkd.data.gather_rows import StateLog
from protorkd.errors import UsageError

FAST = dict(timeout=0.5, max_bytes=100_000, backoff=0.01, max_pixels=2_000_000, progress=False)

# (caption, path on the test server, expected outcome)
MIXED_ROWS = [
    ("a large photo", "/jpg/1024x768", "ok"),
    ("a png drawing", "/png/600x400", "ok"),
    ("a webp picture", "/webp/300x300", "ok"),
    ("a transparent logo", "/rgba/400x300", "ok"),
    ("a dead link", "/status/404", "http_404"),
    ("a slow host", "/slow", "timeout"),
    ("a truncated jpeg", "/truncated", "decode_error"),
    ("an error page", "/html", "not_an_image"),
    ("a huge file", "/big/300000", "too_large"),
    ("an endless stream", "/stream/300000", "too_large"),
    ("a redirect loop", "/loop", "redirect_loop"),
    ("a tracking pixel", "/jpg/8x8", "too_small"),
    ("a panorama", "/jpg/1500x200", "bad_aspect"),
    ("", "/jpg/310x300", "empty_caption"),
    ("a busy server", "/flaky/mixed", "ok"),
    ("a broken server", "/status/500", "http_500"),
    ("a decompression bomb", "/png/2000x2000", "too_many_pixels"),
    ("a tall photo", "/jpg/400x900", "ok"),
    ("an opted-out image", "/optout", "opted_out"),
]


def write_tsv(path: Path, server, rows) -> Path:
    path.write_text("".join(f"{caption}\t{server.url(url)}\n" for caption, url, *_ in rows), encoding="utf-8")
    return path


def read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def mixed_run(image_server, tmp_path_factory):
    image_server.failures["mixed"] = 2  # two 503s, then the image: recovered by the in-run retries
    image_server.hits.clear()
    tmp = tmp_path_factory.mktemp("mixed")
    stats = gather_cc(write_tsv(tmp / "cc.tsv", image_server, MIXED_ROWS), tmp / "out", retries=2, **FAST)
    return tmp / "out", stats, dict(image_server.hits)


def test_train_tsv_lists_exactly_the_good_rows_in_input_order(mixed_run):
    out, _, _ = mixed_run
    expected = [
        [caption, f"images/00000/{index:09d}.jpg"]
        for index, (caption, _, outcome) in enumerate(MIXED_ROWS)
        if outcome == "ok"
    ]
    assert read_tsv(out / "train.tsv") == [["title", "filepath"], *expected]
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("images/*/*.jpg")) == [f for _, f in expected]
    assert not (out / ".tmp").exists()


def test_stored_images_are_rgb_jpegs_shrunk_to_longer_side_512(mixed_run):
    out, _, _ = mixed_run
    sizes = {}
    for path in out.glob("images/*/*.jpg"):
        with Image.open(path) as image:
            image.load()
            assert image.format == "JPEG" and image.mode == "RGB"
            assert max(image.size) <= 512
            sizes[int(path.stem)] = image.size
            if int(path.stem) == 3:  # transparent areas land on white, not black
                assert image.getpixel((0, 0)) == (255, 255, 255)
    assert sizes == {0: (512, 384), 1: (512, 341), 2: (300, 300), 3: (400, 300), 14: (320, 240), 17: (228, 512)}


def test_stats_json_counts_each_failure_kind(mixed_run):
    out, stats, _ = mixed_run
    expected: dict[str, int] = {}
    for _, _, outcome in MIXED_ROWS:
        if outcome != "ok":
            expected[outcome] = expected.get(outcome, 0) + 1
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["failures"] == stats["failures"] == expected
    assert (on_disk["rows"], on_disk["ok"], on_disk["failed"]) == (len(MIXED_ROWS), 6, len(MIXED_ROWS) - 6)


def test_only_transient_failures_are_retried(mixed_run):
    _, _, hits = mixed_run
    assert hits["/flaky/mixed"] == 3  # 503, 503, 200
    assert hits["/status/500"] == 3  # 1 + --retries 2
    assert hits["/status/404"] == 1 and hits["/slow"] == 1 and hits["/jpg/8x8"] == 1


def test_rerun_of_a_finished_run_requests_nothing_and_rewrites_the_same_tsv(image_server, tmp_path):
    rows = [(f"photo {i}", f"/jpg/{300 + i}x200") for i in range(5)] + [("gone", "/status/410")]
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, rows)
    gather_cc(tsv, tmp_path / "out", **FAST)
    first = (tmp_path / "out" / "train.tsv").read_bytes()
    image_server.hits.clear()
    stats = gather_cc(tsv, tmp_path / "out", **FAST)
    assert sum(image_server.hits.values()) == 0
    assert (tmp_path / "out" / "train.tsv").read_bytes() == first
    assert stats["this_run"]["rows"] == 0 and stats["ok"] == 5 and stats["failures"] == {"http_410": 1}


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["tsv", "webdataset"])
def test_killed_run_resumes_to_the_same_output_as_an_uninterrupted_run(image_server, tmp_path, output_format):
    rows = [(f"photo {i}", f"/jpg/{200 + i}x150?delay=0.04") for i in range(40)]
    rows[5] = ("dead", "/status/404?delay=0.04")
    rows[23] = ("icon", "/jpg/16x16?delay=0.04")
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, rows)
    options = ["--timeout", "5", "--shard-size", "8", "--format", output_format]

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "protorkd", "gather-cc", str(tsv), "--out", str(killed), "--concurrency", "2"]
    process = subprocess.Popen(command + options, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = killed / "state.jsonl"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and len(state.read_bytes().splitlines()) > 15:
            break
        time.sleep(0.01)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not (killed / "train.tsv").exists() and not (killed / "stats.json").exists()
    for path in killed.glob("images/*/*.jpg"):  # staged images are whole: written to .tmp, then renamed
        with Image.open(path) as image:
            image.load()
    done_before = [json.loads(line)["row"] for line in state.read_text().splitlines()[1:]]
    assert 15 <= len(done_before) < 40

    image_server.hits.clear()
    settings = dict(output_format=output_format, timeout=5.0, shard_size=8, progress=False)
    resumed = gather_cc(tsv, killed, concurrency=8, **settings)
    assert all(image_server.hits[rows[row][1].split("?")[0]] == 0 for row in done_before)
    assert resumed["this_run"]["rows"] == 40 - len(done_before)

    whole = gather_cc(tsv, tmp_path / "whole", concurrency=8, **settings)
    assert resumed["failures"] == whole["failures"] == {"http_404": 1, "too_small": 1}
    if output_format == "tsv":
        assert (killed / "train.tsv").read_bytes() == (tmp_path / "whole" / "train.tsv").read_bytes()
        outputs = sorted(p.relative_to(killed).as_posix() for p in killed.glob("images/*/*"))
    else:
        outputs = sorted(p.name for p in killed.glob("*.tar")) + ["sizes.json"]
        assert outputs[:-1] == [f"{shard:05d}.tar" for shard in range(5)] and not (killed / "images").exists()
    for name in outputs:  # byte-identical images, or tar shards (fixed member times)
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_retry_failed_reattempts_only_transient_failures(image_server, tmp_path):
    image_server.failures["later"] = 1
    rows = [("comes back", "/flaky/later"), ("really gone", "/status/404"), ("fine", "/jpg/333x222")]
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, rows)
    assert gather_cc(tsv, tmp_path / "out", retries=0, **FAST)["failures"] == {"http_503": 1, "http_404": 1}
    assert gather_cc(tsv, tmp_path / "out", retries=0, **FAST)["failures"] == {"http_503": 1, "http_404": 1}
    image_server.hits.clear()
    stats = gather_cc(tsv, tmp_path / "out", retries=0, retry_failed=True, **FAST)
    assert stats["failures"] == {"http_404": 1} and stats["ok"] == 2
    assert dict(image_server.hits) == {"/flaky/later": 1}
    assert [row[0] for row in read_tsv(tmp_path / "out" / "train.tsv")] == ["title", "comes back", "fine"]


def test_subset_is_a_fixed_random_sample_of_gathered_rows_in_input_order(image_server, tmp_path):
    rows = [(f"photo {i}", f"/jpg/{400 + i}x300") for i in range(12)]
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, rows)
    gather_cc(tsv, tmp_path / "a", subset=5, seed=3, **FAST)
    gather_cc(tsv, tmp_path / "b", subset=5, seed=3, **FAST)
    subset = read_tsv(tmp_path / "a" / "train_subset5_seed3.tsv")
    assert subset == read_tsv(tmp_path / "b" / "train_subset5_seed3.tsv")
    full = read_tsv(tmp_path / "a" / "train.tsv")
    assert subset[0] == ["title", "filepath"] and len(subset) == 6
    assert [full.index(line) for line in subset[1:]] == sorted(full.index(line) for line in subset[1:])
    gather_cc(tsv, tmp_path / "a", subset=5, seed=4, **FAST)
    assert read_tsv(tmp_path / "a" / "train_subset5_seed4.tsv") != subset
    with pytest.raises(UsageError, match="only 12 images"):
        gather_cc(tsv, tmp_path / "a", subset=13, seed=4, **FAST)


def test_captions_with_quotes_round_trip_through_the_csv_reader(image_server, tmp_path):
    from protorkd.data.tsv import read_corpus_table

    caption = 'the "best" view, 100% real'
    gather_cc(write_tsv(tmp_path / "cc.tsv", image_server, [(caption, "/jpg/300x301")]), tmp_path / "out", **FAST)
    images, captions = read_corpus_table(tmp_path / "out" / "train.tsv", "filepath", "title")
    assert captions == [caption] and Path(images[0]).is_file()


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
        gather_cc(tsv, tmp_path / "out", **FAST)
    assert cli_main(["gather-cc", str(tsv), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tsv) in error and message in error


def test_changed_settings_on_resume_are_refused(image_server, tmp_path):
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, [("photo", "/jpg/300x200")])
    gather_cc(tsv, tmp_path / "out", **FAST)
    with pytest.raises(UsageError, match="max_side: 512 -> 256"):
        gather_cc(tsv, tmp_path / "out", max_side=256, **FAST)


def test_torn_last_state_line_is_dropped_before_appending(tmp_path):
    path = tmp_path / "state.jsonl"
    header = {"version": 1}
    path.write_text('{"version": 1}\n{"row": 0, "reason": "ok", "width": 5}\n{"row": 1, "rea')
    state = StateLog(path, header, num_lines=3, blank_lines=[])
    assert state.load(keep_extras=lambda row: True) == {0: {"width": 5}}
    state.open()
    state.record(1, "http_404")
    state.close()
    assert path.read_text().splitlines()[-1] == '{"row": 1, "reason": "http_404"}'
    reloaded = StateLog(path, header, num_lines=3, blank_lines=[])
    reloaded.load()
    assert reloaded.counts() == {"ok": 1, "http_404": 1}


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
    ):
        assert flag in text


def test_cli_accepts_human_byte_sizes(image_server, tmp_path):
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, [("photo", "/jpg/300x200"), ("big", "/big/300000")])
    code = cli_main(["gather-cc", str(tsv), "--out", str(tmp_path / "out"), "--max-bytes", "100kB", "--timeout", "2"])
    assert code == 0
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["failures"] == {"too_large": 1}
    assert os.path.getsize(tmp_path / "out" / "images" / "00000" / "000000000.jpg") > 0
