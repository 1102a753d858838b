"""The built-in demo corpus is generated deterministically in the CC3M layout."""

from __future__ import annotations

import json


def test_demo_corpus_is_deterministic(tmp_path):
    from protorkd.data.demo import write_demo_corpus

    a = write_demo_corpus(tmp_path / "a", size=20, seed=5, eval_per_class=1, progress=False)
    b = write_demo_corpus(tmp_path / "b", size=20, seed=5, eval_per_class=1, progress=False)
    assert (a / "train.tsv").read_text() == (b / "train.tsv").read_text()
    assert (a / "images/000/000007.jpg").read_bytes() == (b / "images/000/000007.jpg").read_bytes()
    header, *rows = (a / "train.tsv").read_text().splitlines()
    assert header == "filepath\ttitle" and len(rows) == 20 and len({r.split("\t")[1] for r in rows}) > 10
    assert (
        sorted(p.name for p in (a / "eval" / "shapes" / "test").iterdir())
        == json.loads((a / "eval" / "zeroshot_metadata.json").read_text())["shapes"]["classes"]
    )
