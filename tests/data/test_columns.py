"""Columns of strings held as bytes: they read back as the strings the list held, and hash as the list did."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from protorkd.data.columns import StringColumn, StringColumnBuilder
from protorkd.data.tsv import read_corpus_table

STRINGS = ["a cat", "", "naïve café ☕", "a\0b", "x" * 70_000, "€" * 3]


def _list_hash(strings: list[str]) -> str:  # the definition, by hand: every string's UTF-8, then a NUL
    return hashlib.sha256(b"".join(s.encode("utf-8") + b"\0" for s in strings)).hexdigest()


def test_a_column_reads_back_what_the_list_held():
    column = StringColumn.of(STRINGS)
    assert len(column) == len(STRINGS)
    assert [column[i] for i in range(len(STRINGS))] == STRINGS  # by index
    assert list(column) == STRINGS  # by iteration (decoded in blocks)
    assert column[-1] == STRINGS[-1] and column[1:4] == STRINGS[1:4]
    assert column == STRINGS and column != STRINGS[:-1] and column != "a cat"
    with pytest.raises(IndexError):
        column[len(STRINGS)]
    assert column.nbytes == sum(len(s.encode()) + 1 for s in STRINGS) + 8 * len(STRINGS)


def test_iteration_crosses_block_boundaries(monkeypatch):
    import protorkd.data.columns as columns

    monkeypatch.setattr(columns, "_BLOCK", 4)
    strings = [f"caption {i} " * (i % 3) for i in range(11)]
    assert list(StringColumn.of(strings)) == strings


def test_the_hash_is_the_lists_hash_with_and_without_a_prefix():
    assert StringColumn.of(STRINGS).sha256() == _list_hash(STRINGS)
    paths = ["/data/cc3m/img/1.jpg", "/elsewhere/2.jpg", "/data/cc3m/3.jpg"]
    builder = StringColumnBuilder(prefix="/data/cc3m/")
    for path in paths:
        builder.append(path)
    column = builder.build()
    assert list(column) == paths and column[1] == "/elsewhere/2.jpg"
    assert column.data.tobytes() == b"img/1.jpg\0/elsewhere/2.jpg\0003.jpg\0"  # the folder stored once
    assert column.sha256() == _list_hash(paths)


@pytest.mark.parametrize("relative", ["train.tsv", "sub/train.tsv"])
def test_the_reader_resolves_image_paths_as_pathlib_does(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    images = ["img/a.jpg", "./img/b.jpg", "img//c.jpg", "/abs/d.jpg", "../e.jpg", "f.jpg/"]
    Path(relative).parent.mkdir(exist_ok=True)
    Path(relative).write_text(
        "filepath\ttitle\n" + "".join(f"{image}\tcaption {i}\n" for i, image in enumerate(images))
    )
    table = read_corpus_table(Path(relative), "filepath", "title")
    root = Path(relative).parent
    expected = [str(root / image) if not Path(image).is_absolute() else image for image in images]
    assert list(table.images) == expected  # what the list of `str(folder / path)` held
    assert table.images.sha256() == _list_hash(expected)
    assert table.captions == [f"caption {i}" for i in range(len(images))]
