"""The teacher feature cache: deduplicated, reused, resumed, refused for another teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from protorkd.errors import UsageError
from protorkd.teachers.cache import build_teacher_cache


def _encode_counting(calls):
    def encode(texts):
        calls.append(len(texts))
        return torch.tensor([[len(t), t.count("a")] for t in texts], dtype=torch.float32)

    return encode


def test_teacher_cache_dedupes_reuses_and_resumes(tmp_path, monkeypatch):
    import protorkd.teachers.cache as tc

    keys = ["a cat", "a dog", "a cat", "banana", "x"]
    spec = {"model": "toy"}
    calls: list[int] = []
    cache = build_teacher_cache(
        tmp_path / "c", modality="text", keys=keys, spec=spec, encode=_encode_counting(calls), dim=2, progress=False
    )
    assert sum(calls) == 4  # the duplicate caption is encoded once
    assert cache.lookup(torch.tensor([2, 3])).tolist() == [[5.0, 2.0], [6.0, 3.0]]
    calls.clear()
    build_teacher_cache(
        tmp_path / "c", modality="text", keys=keys, spec=spec, encode=_encode_counting(calls), dim=2, progress=False
    )
    assert calls == []  # complete cache reused

    # interrupted after the first chunk: resumes at the recorded position
    monkeypatch.setattr(tc, "CHUNK", 2)
    failing_calls: list[int] = []

    def failing(texts):
        if failing_calls:
            raise KeyboardInterrupt
        return _encode_counting(failing_calls)(texts)

    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(
            tmp_path / "d", modality="text", keys=keys, spec=spec, encode=failing, dim=2, progress=False
        )
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["done"] == 2
    calls.clear()
    resumed = build_teacher_cache(
        tmp_path / "d", modality="text", keys=keys, spec=spec, encode=_encode_counting(calls), dim=2, progress=False
    )
    assert sum(calls) == 2
    assert torch.equal(resumed.lookup(torch.arange(5)), cache.lookup(torch.arange(5)))


def test_teacher_cache_for_another_teacher_is_refused(tmp_path):
    build_teacher_cache(
        tmp_path, modality="text", keys=["a"], spec={"model": "one"}, encode=_encode_counting([]), dim=2, progress=False
    )
    with pytest.raises(UsageError, match="does not match this run.*teacher"):
        build_teacher_cache(
            tmp_path,
            modality="text",
            keys=["a"],
            spec={"model": "two"},
            encode=_encode_counting([]),
            dim=2,
            progress=False,
        )


def _image_cache(folder, keys, load, calls=None, chunk=2):
    def encode(images):
        if calls is not None:
            calls.append(len(images))
        return torch.tensor([[float(i), 1.0] for i in images])

    spec = {"model": "toy-image"}
    return build_teacher_cache(
        folder, modality="image", keys=keys, spec=spec, encode=encode, dim=2, load=load, progress=False, chunk=chunk
    )


def test_an_unreadable_first_chunk_cannot_set_the_feature_width(tmp_path):
    """Every image of the first chunk fails to load: the width still comes from the teacher (dim=2)."""
    keys = ["bad-0", "bad-1", "2", "3", "bad-4"]

    def load(key):
        if key.startswith("bad"):
            raise OSError(f"cannot identify image file {key!r}")
        return int(key)

    cache = _image_cache(tmp_path / "c", keys, load)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["dim"] == 2 and manifest["complete"] and manifest["bad_unique"] == [0, 1, 4]
    assert cache.bad_rows == {0, 1, 4}
    assert cache.lookup(torch.tensor([0, 2, 3])).tolist() == [[0.0, 0.0], [2.0, 1.0], [3.0, 1.0]]
    calls: list[int] = []
    again = _image_cache(tmp_path / "c", keys, load, calls)  # reused as it is
    assert calls == [] and again.bad_rows == {0, 1, 4}


def _complete_cache(folder):
    _image_cache(folder, ["0", "1", "2"], int)
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda folder, manifest: {**manifest, "dim": 0}, "feature width 0"),
        (lambda folder, manifest: {**manifest, "done": 2}, "complete=True with 2 of 3 done"),
        (lambda folder, manifest: {**manifest, "done": 7, "complete": False}, "7 of 3 features done"),
        (lambda folder, manifest: {**manifest, "bad_unique": [5]}, "bad_unique"),
        (lambda folder, manifest: np.save(folder / "features.npy", np.zeros((3, 5), np.float16)), "float16[3, 5]"),
        (lambda folder, manifest: (folder / "features.npy").write_bytes(b"\x93NUMPY garbage"), "cannot be read"),
        (lambda folder, manifest: (folder / "features.npy").unlink(), "cannot be read"),
        (lambda folder, manifest: (folder / "manifest.json").write_text('{"dim": 2, "done'), "cannot be read"),
        (lambda folder, manifest: (folder / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
    ],
)
def test_a_cache_with_a_bad_manifest_is_refused_with_the_folder_to_delete(tmp_path, damage, problem):
    folder = tmp_path / "c"
    manifest = _complete_cache(folder)
    changed = damage(folder, manifest)
    if isinstance(changed, dict):
        (folder / "manifest.json").write_text(json.dumps(changed))
    with pytest.raises(UsageError) as error:
        _image_cache(folder, ["0", "1", "2"], int)
    message = str(error.value)
    assert problem in message and f"teacher cache {folder} is unusable" in message
    assert "delete that folder and rerun" in message and "\n" not in message


def test_features_reach_the_disk_before_the_manifest_records_them(tmp_path, monkeypatch):
    import protorkd.teachers.cache as tc

    events: list[str] = []
    monkeypatch.setattr(tc, "fsync_file", lambda path: events.append(f"fsync {path.name}"))
    real_write = tc.write_manifest
    monkeypatch.setattr(
        tc,
        "write_manifest",
        lambda folder, manifest: (events.append(f"manifest {manifest['done']}"), real_write(folder, manifest)),
    )
    _image_cache(tmp_path / "c", ["0", "1", "2"], int)
    assert events == ["fsync features.npy", "manifest 2", "fsync features.npy", "manifest 3"]


def test_a_complete_cache_reads_its_row_map_instead_of_indexing_the_corpus(tmp_path, monkeypatch):
    import protorkd.teachers.cache as tc
    from protorkd.data.columns import StringColumn

    keys = StringColumn.of(["a cat", "a dog", "a cat", "banana"])
    spec = {"model": "toy"}
    first = build_teacher_cache(tmp_path, modality="text", keys=keys, spec=spec, encode=_encode_counting([]), dim=2,
                                progress=False)  # fmt: skip
    assert first.rows.tolist() == [0, 1, 0, 2]

    def never(keys):
        raise AssertionError("a complete cache indexed the corpus again")

    monkeypatch.setattr(tc, "distinct_keys", never)
    again = build_teacher_cache(tmp_path, modality="text", keys=keys, spec=spec, encode=never, dim=2, progress=False)
    assert isinstance(again.rows, np.memmap) and again.rows.tolist() == [0, 1, 0, 2]
    assert torch.equal(again.lookup(torch.arange(4)), first.lookup(torch.arange(4)))

    monkeypatch.undo()
    other = StringColumn.of(["a cat", "a dog", "a cat", "cherry"])  # another corpus: its hash is refused, not reused
    with pytest.raises(UsageError, match="corpus_sha256"):
        build_teacher_cache(
            tmp_path, modality="text", keys=other, spec=spec, encode=_encode_counting([]), dim=2, progress=False
        )
    (tmp_path / "rows.npy").unlink()  # killed between the last chunk and the row map: indexed again, map written
    calls: list[int] = []
    rebuilt = build_teacher_cache(tmp_path, modality="text", keys=keys, spec=spec, encode=_encode_counting(calls),
                                  dim=2, progress=False)  # fmt: skip
    assert calls == [] and rebuilt.rows.tolist() == [0, 1, 0, 2] and (tmp_path / "rows.npy").is_file()
