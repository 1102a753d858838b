"""The training TSV is read one line per row, without quoting: quotes are text, a stray quote spoils nothing."""

from __future__ import annotations

import csv

import pytest

from protorkd.data.corpus import open_corpus
from protorkd.data.tsv import CsvCorpus, read_corpus_table
from protorkd.errors import UsageError

QUOTED_CAPTIONS = [
    'the "best" view of the bay',
    '"an unbalanced leading quote',
    'a caption that ends with a quote"',
    '""',
    "it's a dog's life",
    '"a fully quoted caption"',
]


def _write(path, lines: list[bytes]) -> None:
    path.write_bytes(b"filepath\ttitle\n" + b"".join(lines))


def test_ninety_five_rows_stay_ninety_five_rows_whatever_their_quotes(tmp_path):
    """Issue 11: with csv.QUOTE_MINIMAL an unbalanced leading quote swallowed the rest of the file (96 lines
    became 21 rows, rc 0). Every line is now its own row; Python's csv.reader with QUOTE_NONE reads the same table."""
    captions = [f"photo {i}" for i in range(95)]
    captions[20] = '"a flash of lightning over the bay'
    captions[40:46] = QUOTED_CAPTIONS
    path = tmp_path / "train.tsv"
    _write(path, [f"images/{i:03d}.jpg\t{caption}\n".encode() for i, caption in enumerate(captions)])
    table = read_corpus_table(path, "filepath", "title")
    assert len(table.captions) == 95 and table.captions == captions and table.problems == {}
    assert table.lines.tolist() == list(range(2, 97))
    with open(path, newline="", encoding="utf-8") as handle:
        reference = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    assert table.captions == [caption for _, caption in reference]
    assert table.images == [str(tmp_path / image) for image, _ in reference]


def test_bad_rows_are_kept_with_their_reason_and_line(tmp_path):
    path = tmp_path / "train.tsv"
    _write(
        path,
        [
            b"a.jpg\ta cat\n",
            b"\n",  # blank: skipped, but line numbers stay those of the file
            b"b.jpg\ta caption with a\ttab inside\n",
            b"c.jpg\tcaf\xe9 in latin-1\n",
            b"d.jpg\ta dog\r\n",  # CRLF
            b"e.jpg\n",  # one field
            b"f.jpg\tthe last row without a newline",
        ],
    )
    table = read_corpus_table(path, "filepath", "title")
    assert table.captions[0] == "a cat" and table.captions[3] == "a dog" and table.captions[5].endswith("newline")
    assert table.lines.tolist() == [2, 4, 5, 6, 7, 8]
    assert table.problems == {
        1: "3 '\\t'-separated fields where the header has 2 (a separator inside a caption?)",
        2: "not UTF-8 (byte 0xe9 at column 10)",
        4: "1 '\\t'-separated fields where the header has 2 (a separator inside a caption?)",
    }
    corpus = CsvCorpus(table.images, table.captions, None, load_images=False, source=str(path),
                       problems=table.problems, lines=table.lines)  # fmt: skip
    assert corpus[2]["bad"] == "not UTF-8 (byte 0xe9 at column 10)"
    assert corpus.describe(2) == f"{path} row 3 (line 5): {tmp_path / 'c.jpg'}"
    assert corpus[3]["bad"] is None and corpus[3]["caption"] == "a dog"


def test_too_many_unreadable_rows_stop_before_training(tmp_path):
    path = tmp_path / "train.tsv"
    _write(path, [b"a.jpg\tfine\n"] * 8 + [b"b.jpg\tbad\xff\n", b"c.jpg\tone\ttoo many\n"])
    with pytest.raises(UsageError) as error:
        open_corpus(str(path), max_bad_fraction=0.1)
    message = str(error.value)
    assert message.startswith(f"{path}: 2 of 10 rows cannot be read (more than --max-bad-fraction 0.1)")
    assert f"{path} row 9 (line 10): not UTF-8 (byte 0xff at column 10)" in message
    assert len(open_corpus(str(path), max_bad_fraction=0.2).problems) == 2  # within the fraction: counted, kept


def test_minimal_quoting_parses_each_line_as_csv_on_its_own(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('filepath,title\na.jpg,"a cat, a dog"\nb.jpg,"unbalanced, quote\nc.jpg,"the ""best"" view"\n')
    table = read_corpus_table(path, "filepath", "title", separator=",", quoting="minimal")
    assert table.captions[0] == "a cat, a dog" and table.captions[2] == 'the "best" view'
    assert list(table.problems) == [1] and table.problems[1].startswith("bad quoting")
    assert table.lines.tolist() == [2, 3, 4]


def test_a_header_that_is_not_utf8_is_a_usage_error(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"filepath\tt\xeftle\na.jpg\tx\n")
    with pytest.raises(UsageError, match="line 1 \\(the header\\): not UTF-8"):
        read_corpus_table(path, "filepath", "title")


def test_a_caption_over_the_byte_limit_is_cut_at_a_character_and_counted(tmp_path, caplog):
    """Issue 25: one 100 MB caption line made the tokenizer abort at 11.6 GB. Captions are cut as they are read:
    2-byte "é" x 3000 (6000 bytes) -> 2048 of them (4096 bytes); 3-byte "€" x 2000 -> 1365 (4095 bytes: the
    1366th would end past the limit)."""
    import logging

    long_two, long_three = "é" * 3000, "€" * 2000
    lines = [f"a.jpg\t{long_two}\n", "b.jpg\ta short caption\n", f"c.jpg\t{long_three}\n"]
    _write(tmp_path / "train.tsv", [line.encode() for line in lines])
    with caplog.at_level(logging.WARNING):
        table = read_corpus_table(tmp_path / "train.tsv", "filepath", "title")
    assert table.captions == ["é" * 2048, "a short caption", "€" * 1365]
    assert "2 captions longer than 4096 bytes were cut to that length before tokenizing" in caplog.text
    assert "row 1 (line 2)" in caplog.text
    narrow = read_corpus_table(tmp_path / "train.tsv", "filepath", "title", max_caption_bytes=7)
    assert narrow.captions == ["é" * 3, "a short", "€" * 2]
