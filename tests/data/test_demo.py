"""The built-in demo corpus is generated deterministically in the CC3M layout."""

from __future__ import annotations

import json
from pathlib import Path


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


def test_training_never_draws_a_held_out_pair_and_the_unseen_split_only_draws_them():
    import random

    from protorkd.data.demo import COLOURS, HELD_OUT_COLOURS, SHAPES, UNSEEN, sample_scene

    # one colour per shape, each colour once: every shape and colour keeps 7 of its 8 pairings in training
    assert sorted(HELD_OUT_COLOURS) == sorted(SHAPES) and sorted(HELD_OUT_COLOURS.values()) == sorted(COLOURS)
    assert HELD_OUT_COLOURS["circle"] == "green" and HELD_OUT_COLOURS["cross"] == "red"  # (3 i + 1) mod 8
    rng = random.Random(0)
    seen = [sample_scene(rng) for _ in range(3000)]
    assert not any(scene.colour == HELD_OUT_COLOURS[scene.shape] for scene in seen)
    assert len({(scene.shape, scene.colour) for scene in seen}) == 8 * 7
    unseen = [sample_scene(rng, shape, UNSEEN) for shape in SHAPES for _ in range(5)]
    assert all(scene.colour == HELD_OUT_COLOURS[scene.shape] for scene in unseen)


def test_unseen_phrasings_appear_only_in_the_compositional_split(tmp_path):
    from protorkd.data.demo import write_demo_corpus

    root = write_demo_corpus(tmp_path / "demo", size=300, seed=1, eval_per_class=3, progress=False)
    markers = ("an illustration showing", "each one painted")
    training = (root / "train.tsv").read_text()
    assert not any(marker in training for marker in markers)
    unseen = json.loads((root / "eval" / "shapes_unseen" / "captions_test.json").read_text())
    seen = json.loads((root / "eval" / "shapes" / "captions_test.json").read_text())
    assert len(unseen["images"]) == 8 * 3 and len(unseen["annotations"]) == 2 * 8 * 3
    assert all(any(marker in a["caption"] for marker in markers) for a in unseen["annotations"])
    assert not any(any(marker in a["caption"] for marker in markers) for a in seen["annotations"])
    metadata = json.loads((root / "eval" / "zeroshot_metadata.json").read_text())
    assert metadata["shapes_unseen"] == metadata["shapes"]
    assert not (root / "eval" / "shapes_unseen" / "train").exists()  # test only: no linear probe on unseen pairs


def test_a_smaller_demo_corpus_is_the_first_rows_of_a_larger_one(tmp_path):
    """What lets the README's quick run (--dataset-size 1024) generate 1,024 rows instead of 10,240."""
    from protorkd.data.demo import write_demo_corpus

    small = write_demo_corpus(tmp_path / "small", size=5, seed=3, eval_per_class=1, progress=False)
    large = write_demo_corpus(tmp_path / "large", size=9, seed=3, eval_per_class=1, progress=False)
    small_rows = (small / "train.tsv").read_text().splitlines()
    assert (large / "train.tsv").read_text().splitlines()[:6] == small_rows and len(small_rows) == 6
    for row in small_rows[1:]:
        image = row.split("\t")[0]
        assert (small / image).read_bytes() == (large / image).read_bytes()
    files = sorted(p.relative_to(small) for p in (small / "eval").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(large) for p in (large / "eval").rglob("*") if p.is_file())
    assert all((small / f).read_bytes() == (large / f).read_bytes() for f in files)


def test_a_quick_demo_run_uses_its_own_rows_or_the_whole_corpus_when_it_exists(tmp_path, monkeypatch):
    from protorkd.data.demo import demo_eval_root

    monkeypatch.setenv("PROTORKD_CACHE", str(tmp_path))
    assert demo_eval_root(10240, 1024, 0) == tmp_path / "demo-v2-n1024-seed0" / "eval"
    assert demo_eval_root(10240, None, 0) == demo_eval_root(10240, 20000, 0) == tmp_path / "demo-v2-n10240-seed0/eval"
    (tmp_path / "demo-v2-n10240-seed0").mkdir()
    (tmp_path / "demo-v2-n10240-seed0" / "train.tsv").write_text("filepath\ttitle\n")
    assert demo_eval_root(10240, 1024, 0) == tmp_path / "demo-v2-n10240-seed0" / "eval"  # generated before: reused


def test_the_skewed_split_has_zipf_sized_classes_of_seen_pairs_and_phrasings(tmp_path):
    from protorkd.data.demo import HELD_OUT_COLOURS, write_demo_corpus

    root = write_demo_corpus(tmp_path / "demo", size=20, seed=2, eval_per_class=3, progress=False) / "eval"
    sizes = {folder.name: len(list(folder.iterdir())) for folder in (root / "shapes_skewed" / "test").iterdir()}
    # round(2 * 3 / r) for ranks r = 1..8 in SHAPES order, at least 1
    assert sizes == {
        "circle": 6,
        "square": 3,
        "triangle": 2,
        "diamond": 2,
        "star": 1,
        "cross": 1,
        "ring": 1,
        "hexagon": 1,
    }
    captions = json.loads((root / "shapes_skewed" / "captions_test.json").read_text())
    assert len(captions["images"]) == 17 and len(captions["annotations"]) == 34
    assert not (root / "shapes_skewed" / "train").exists()
    markers = ("an illustration showing", "each one painted")
    assert not any(marker in a["caption"] for a in captions["annotations"] for marker in markers)
    by_image = {image["id"]: image["file_name"].split("/")[0] for image in captions["images"]}
    for annotation in captions["annotations"]:  # a held-out colour never names its shape's images
        shape = by_image[annotation["image_id"]]
        assert f"{HELD_OUT_COLOURS[shape]} {shape}" not in annotation["caption"]
    metadata = json.loads((root / "zeroshot_metadata.json").read_text())
    assert metadata["shapes_skewed"] == metadata["shapes"]


def test_a_corpus_written_before_the_skewed_split_gains_the_same_bytes_in_place(tmp_path):
    import shutil

    from protorkd.data.demo import write_demo_corpus

    fresh = write_demo_corpus(tmp_path / "fresh", size=20, seed=4, eval_per_class=2, progress=False)
    old = tmp_path / "old"
    shutil.copytree(fresh, old)
    shutil.rmtree(old / "eval" / "shapes_skewed")  # what corpus version 2 held
    metadata = json.loads((old / "eval" / "zeroshot_metadata.json").read_text())
    del metadata["shapes_skewed"]
    (old / "eval" / "zeroshot_metadata.json").write_text(json.dumps(metadata, indent=1))
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    write_demo_corpus(old, size=20, seed=4, eval_per_class=2, progress=False)
    after = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    assert after == {p.relative_to(fresh): p.read_bytes() for p in fresh.rglob("*") if p.is_file()}
    changed = {path for path in before if before[path] != after[path]}
    assert changed == {Path("eval/zeroshot_metadata.json")}  # train.tsv, shapes, shapes_unseen untouched
