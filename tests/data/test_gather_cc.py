"""gather-cc against a local server (tests/support/gather_server.py): outputs, failure kinds, retries, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from protorkd.data.gather_cc import STAGING, gather_cc
from protorkd.data.gather_rows import StateLog
from protorkd.errors import UsageError
from tests.support.gather_server import LOCAL, MIXED_ROWS, SHORT_TIMEOUT, read_tsv, write_tsv


@pytest.fixture(scope="module")
def mixed_run(image_server, tmp_path_factory):
    image_server.failures["mixed"] = 2  # two 503s, then the image: recovered by the in-run retries
    image_server.hits.clear()
    tmp = tmp_path_factory.mktemp("mixed")
    stats = gather_cc(write_tsv(tmp / "cc.tsv", image_server, MIXED_ROWS), tmp / "out", retries=2, **LOCAL)
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
    assert not (out / STAGING).exists()  # its staging folder is removed at the end


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
            if int(path.stem) == 5:  # 16-bit gray 32768 is scaled to 128, not clipped to white
                assert image.getpixel((150, 100)) == (128, 128, 128)
    assert sizes == {
        0: (512, 384),
        1: (512, 341),
        2: (300, 300),
        3: (400, 300),
        5: (300, 200),
        14: (320, 240),
        17: (228, 512),
    }


def test_stats_json_counts_each_failure_kind(mixed_run):
    out, stats, _ = mixed_run
    expected: dict[str, int] = {}
    for _, _, outcome in MIXED_ROWS:
        if outcome != "ok":
            expected[outcome] = expected.get(outcome, 0) + 1
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["failures"] == stats["failures"] == expected
    assert (on_disk["rows"], on_disk["ok"], on_disk["failed"]) == (len(MIXED_ROWS), 7, len(MIXED_ROWS) - 7)


def test_only_transient_failures_are_retried(mixed_run):
    _, _, hits = mixed_run
    assert hits["/flaky/mixed"] == 3  # 503, 503, 200
    assert hits["/status/500"] == 3  # 1 + --retries 2
    assert hits["/status/404"] == 1 and hits["/jpg/8x8"] == 1


def test_a_host_slower_than_the_timeout_counts_as_timeout_and_is_not_retried(image_server, tmp_path):
    image_server.hits.clear()
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, [("a slow host", "/slow"), ("fine", "/jpg/321x222")])
    stats = gather_cc(tsv, tmp_path / "out", retries=2, **{**LOCAL, "timeout": SHORT_TIMEOUT})
    assert stats["failures"] == {"timeout": 1} and stats["ok"] == 1
    assert image_server.hits["/slow"] == 1


def test_rerun_of_a_finished_run_requests_nothing_and_rewrites_the_same_tsv(image_server, tmp_path):
    rows = [(f"photo {i}", f"/jpg/{300 + i}x200") for i in range(5)] + [("gone", "/status/410")]
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, rows)
    gather_cc(tsv, tmp_path / "out", **LOCAL)
    first = (tmp_path / "out" / "train.tsv").read_bytes()
    image_server.hits.clear()
    stats = gather_cc(tsv, tmp_path / "out", **LOCAL)
    assert sum(image_server.hits.values()) == 0
    assert (tmp_path / "out" / "train.tsv").read_bytes() == first
    assert stats["this_run"]["rows"] == 0 and stats["ok"] == 5 and stats["failures"] == {"http_410": 1}


def test_retry_failed_reattempts_only_transient_failures(image_server, tmp_path):
    image_server.failures["later"] = 1
    rows = [("comes back", "/flaky/later"), ("really gone", "/status/404"), ("fine", "/jpg/333x222")]
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, rows)
    assert gather_cc(tsv, tmp_path / "out", retries=0, **LOCAL)["failures"] == {"http_503": 1, "http_404": 1}
    assert gather_cc(tsv, tmp_path / "out", retries=0, **LOCAL)["failures"] == {"http_503": 1, "http_404": 1}
    image_server.hits.clear()
    stats = gather_cc(tsv, tmp_path / "out", retries=0, retry_failed=True, **LOCAL)
    assert stats["failures"] == {"http_404": 1} and stats["ok"] == 2
    assert dict(image_server.hits) == {"/flaky/later": 1}
    assert [row[0] for row in read_tsv(tmp_path / "out" / "train.tsv")] == ["title", "comes back", "fine"]


def test_subset_is_a_fixed_random_sample_of_gathered_rows_in_input_order(image_server, tmp_path):
    rows = [(f"photo {i}", f"/jpg/{400 + i}x300") for i in range(12)]
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, rows)
    gather_cc(tsv, tmp_path / "a", subset=5, seed=3, **LOCAL)
    gather_cc(tsv, tmp_path / "b", subset=5, seed=3, **LOCAL)
    subset = read_tsv(tmp_path / "a" / "train_subset5_seed3.tsv")
    assert subset == read_tsv(tmp_path / "b" / "train_subset5_seed3.tsv")
    full = read_tsv(tmp_path / "a" / "train.tsv")
    assert subset[0] == ["title", "filepath"] and len(subset) == 6
    assert [full.index(line) for line in subset[1:]] == sorted(full.index(line) for line in subset[1:])
    gather_cc(tsv, tmp_path / "a", subset=5, seed=4, **LOCAL)
    assert read_tsv(tmp_path / "a" / "train_subset5_seed4.tsv") != subset
    with pytest.raises(UsageError, match="only 12 images"):
        gather_cc(tsv, tmp_path / "a", subset=13, seed=4, **LOCAL)


def test_captions_with_quotes_round_trip_through_the_corpus_reader(image_server, tmp_path):
    from protorkd.data.tsv import read_corpus_table

    captions = ['the "best" view, 100% real', '"an unbalanced leading quote', "a plain caption"]
    rows = [(caption, f"/jpg/{300 + i}x301") for i, caption in enumerate(captions)]
    gather_cc(write_tsv(tmp_path / "cc.tsv", image_server, rows), tmp_path / "out", **LOCAL)
    lines = (tmp_path / "out" / "train.tsv").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == ["title", *captions]  # written as they came, unquoted
    table = read_corpus_table(tmp_path / "out" / "train.tsv", "filepath", "title")
    assert table.captions == captions and all(Path(image).is_file() for image in table.images)
    assert table.problems == {}


def test_changed_settings_on_resume_are_refused(image_server, tmp_path):
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, [("photo", "/jpg/300x200")])
    gather_cc(tsv, tmp_path / "out", **LOCAL)
    with pytest.raises(UsageError, match="max_side: 512 -> 256"):
        gather_cc(tsv, tmp_path / "out", max_side=256, **LOCAL)


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


def test_gather_cc_never_deletes_a_folder_it_did_not_create(image_server, tmp_path):
    """Issue 25: a pre-existing DIR/.tmp/ was deleted. gather-cc stages in its own, marked folder; an unmarked
    folder of that name stops the run instead of being deleted."""
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, [("fine", "/jpg/321x222")])
    out = tmp_path / "out"
    (out / ".tmp").mkdir(parents=True)
    (out / ".tmp" / "mine.txt").write_text("the user's")
    assert gather_cc(tsv, out, **LOCAL)["ok"] == 1
    assert (out / ".tmp" / "mine.txt").read_text() == "the user's" and not (out / STAGING).exists()
    (out / STAGING).mkdir()
    (out / STAGING / "notes.txt").write_text("not gather-cc's")
    with pytest.raises(UsageError, match=f"{out / STAGING} exists but was not created by gather-cc; move it away"):
        gather_cc(tsv, out, **LOCAL)
    assert (out / STAGING / "notes.txt").read_text() == "not gather-cc's"


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0.0])
def test_a_timeout_that_is_not_a_positive_finite_number_is_refused(tmp_path, timeout):
    """Issue 25: --timeout nan counted every row as a timeout."""
    (tmp_path / "cc.tsv").write_text("a caption\thttp://example.com/a.jpg\n")
    with pytest.raises(UsageError, match=r"--timeout .*: must be a positive, finite number of seconds"):
        gather_cc(tmp_path / "cc.tsv", tmp_path / "out", timeout=timeout)
    assert not (tmp_path / "out").exists()


def test_decode_threads_default_to_what_the_memory_allows():
    """Each thread may decode an image of --max-pixels at 4 bytes a pixel (+10 %): 89,478,485 px -> 393,705,334
    bytes; a quarter of 16 GiB holds 10 of them, of 1 GiB none (still 1 thread); never more than the CPUs."""
    from protorkd.data.gather_cc import default_decode_threads
    from protorkd.data.gather_image import DEFAULT_MAX_PIXELS, decode_bytes_at_most

    assert decode_bytes_at_most(DEFAULT_MAX_PIXELS) == 393_705_334
    assert default_decode_threads(DEFAULT_MAX_PIXELS, memory_bytes=16 * 2**30, cpus=64) == 10
    assert default_decode_threads(DEFAULT_MAX_PIXELS, memory_bytes=16 * 2**30, cpus=4) == 4
    assert default_decode_threads(DEFAULT_MAX_PIXELS, memory_bytes=2**30, cpus=4) == 1
    assert default_decode_threads(1_000_000, memory_bytes=16 * 2**30, cpus=64) == 64
