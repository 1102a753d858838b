"""Reading ELEVATER's on-disk format: label maps, iris index files, COCO json, zips, few-shot sampling.

Torch-free on purpose (like the module under test), so the cross-checks against the `vision-datasets`
package can run in a venv that has only that package.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections import Counter

import pytest

from protorkd.errors import UsageError
from protorkd.eval.elevater_format import (
    ELEVATER_DATASETS,
    load_definitions,
    locate,
    read_split,
    sample_few_shot,
)
from tests.support.elevater_data import balanced, write_coco_dataset, write_iris_dataset


def test_registry_holds_the_twenty_datasets_with_their_official_metrics():
    names = ELEVATER_DATASETS.names()
    assert len(names) == 20
    metrics = {name: ELEVATER_DATASETS.get(name).metric for name in names}
    assert {n for n, m in metrics.items() if m == "mean-per-class"} == {
        "caltech101",
        "fgvc-aircraft",
        "oxford-flowers",
        "oxford-pets",
    }
    assert metrics["hateful-memes"] == "roc_auc" and metrics["voc2007"] == "11point_mAP"
    assert sum(m == "accuracy" for m in metrics.values()) == 14
    assert [n for n in names if ELEVATER_DATASETS.get(n).multilabel] == ["voc2007"]
    with pytest.raises(UsageError, match="valid names: caltech101"):
        ELEVATER_DATASETS.get("imagenet")


def test_iris_index_with_spaces_in_paths_and_multi_labels_reads_back(tmp_path):
    folder = write_iris_dataset(
        tmp_path / "classification" / "voc2007_20211007",
        ["a", "b", "c"],
        {"test": ("test_ic.txt", "test.zip", [(0,), (1, 2), (0, 2)])},
    )
    spec = ELEVATER_DATASETS.get("voc2007")
    split = read_split(locate(tmp_path, spec), spec, "test")
    assert split.folder == folder and split.classnames == ["a", "b", "c"] and split.multilabel
    assert split.labels == [(0,), (1, 2), (0, 2)]
    assert split.locations[1] == "test.zip@test images/001.png"


def test_newest_dated_download_folder_is_used(tmp_path):
    spec = ELEVATER_DATASETS.get("cifar10")
    for date in ("20200101", "20211007"):
        write_iris_dataset(
            tmp_path / "classification" / f"cifar_10_{date}",
            ["x", "y"],
            {"test": ("test.txt", "val.zip", balanced(2, 1))},
        )
    write_iris_dataset(
        tmp_path / "classification" / "cifar100_20200721", ["x"], {"test": ("test_images.txt", "t.zip", balanced(1, 1))}
    )
    assert locate(tmp_path, spec).folder.name == "cifar_10_20211007"
    assert locate(tmp_path, ELEVATER_DATASETS.get("mnist")) is None


def test_definitions_file_overrides_folder_and_index_names(tmp_path):
    write_iris_dataset(tmp_path / "elsewhere", ["x", "y"], {"test": ("my_test.txt", "t.zip", balanced(2, 2))})
    definitions = tmp_path / "vision_datasets.json"
    definitions.write_text(
        json.dumps(
            [
                {
                    "name": "mnist",
                    "type": "classification_multiclass",
                    "root_folder": "elsewhere",
                    "labelmap": "labels.txt",
                    "train": {"index_path": "my_train.txt"},
                    "test": {"index_path": "my_test.txt"},
                }
            ]
        )
    )
    spec = ELEVATER_DATASETS.get("mnist")
    layout = locate(tmp_path, spec, load_definitions(definitions))
    assert layout.folder == tmp_path / "elsewhere" and layout.train_index == "my_train.txt"
    assert len(read_split(layout, spec, "test")) == 4


def test_coco_classification_json_maps_category_ids_in_order(tmp_path):
    write_coco_dataset(
        tmp_path / "hateful_memes_20211014",
        {7: "hateful", 3: "benign"},
        {"train_meta.json": [3, 7], "test_meta.json": [7, 3, 3]},
    )
    spec = ELEVATER_DATASETS.get("hateful-memes")
    split = read_split(locate(tmp_path, spec), spec, "test")
    assert split.classnames == ["benign", "hateful"]  # sorted by category id, not by file order
    assert split.labels == [(1,), (0,), (0,)]
    assert split.locations[0] == "img.zip@img/test_meta_000.png"


def test_label_outside_the_label_map_names_file_and_line(tmp_path):
    folder = write_iris_dataset(tmp_path / "dtd", ["x", "y"], {"test": ("test.txt", "t.zip", balanced(2, 1))})
    (folder / "test.txt").write_text("t.zip@a.png 0\nt.zip@b.png 2\n")
    spec = ELEVATER_DATASETS.get("dtd")
    with pytest.raises(UsageError, match=r"test\.txt:2: label 2 is outside 0\.\.1"):
        read_split(locate(tmp_path, spec), spec, "test")


def test_missing_zip_and_missing_train_index_are_named(tmp_path):
    folder = write_iris_dataset(tmp_path / "dtd", ["x", "y"], {"test": ("test.txt", "t.zip", balanced(2, 1))})
    spec = ELEVATER_DATASETS.get("dtd")
    layout = locate(tmp_path, spec)
    with pytest.raises(UsageError, match=r"index file .*train\.txt does not exist"):
        read_split(layout, spec, "train")
    (folder / "t.zip").unlink()
    with pytest.raises(UsageError, match=r"points into .*t\.zip, which does not exist"):
        read_split(layout, spec, "test")


def test_multiple_labels_on_a_single_label_dataset_are_refused(tmp_path):
    write_iris_dataset(tmp_path / "dtd", ["x", "y"], {"test": ("test.txt", "t.zip", [(0, 1)])})
    spec = ELEVATER_DATASETS.get("dtd")
    with pytest.raises(UsageError, match="single-label dataset"):
        read_split(locate(tmp_path, spec), spec, "test")


def test_few_shot_subset_has_k_per_class_and_depends_only_on_the_seed():
    labels = [(c,) for c in range(4) for _ in range(10)]
    subset = sample_few_shot(labels, 4, 3, seed=0)
    assert Counter(labels[i][0] for i in subset) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert subset == sample_few_shot(labels, 4, 3, seed=0)
    assert set(subset) != set(sample_few_shot(labels, 4, 3, seed=1))


def test_few_shot_keeps_every_image_of_a_short_class_and_warns(caplog):
    labels = [(0,)] * 6 + [(1,)] * 2
    with caplog.at_level(logging.WARNING):
        subset = sample_few_shot(labels, 2, 5, seed=0)
    assert Counter(labels[i][0] for i in subset) == {0: 5, 1: 2}
    assert "fewer than 5 training images" in caplog.text


def test_few_shot_multilabel_skips_images_whose_classes_are_full_and_keeps_k_negatives():
    labels = [(0, 1)] * 6 + [(0,)] * 6 + [(2,)] * 6 + [()] * 6
    subset = sample_few_shot(labels, 3, 2, seed=0)
    # vision-datasets 0.2.17's DatasetManifest.sample_few_shot_subset(2, random_seed=0) on these labels
    assert subset == [14, 0, 17, 7, 22, 21, 4]
    counts = Counter(label for i in subset for label in labels[i])
    assert counts == {0: 3, 1: 2, 2: 2}  # class 0 reaches 1.5 k through an image that class 1 still needed
    assert [i for i in subset if not labels[i]] == [22, 21]  # k negatives


# Cross-checks against the vision-datasets package (0.2.x, the version ELEVATER pins, or 1.x), when importable.


def _their_manifest(root, definition, usage):
    """(class names, labels per image, image paths) as vision-datasets reads them, and the manifest."""
    import vision_datasets

    if hasattr(vision_datasets, "DatasetManifest") and hasattr(
        vision_datasets.DatasetManifest, "sample_few_shot_subset"
    ):  # 0.2.x
        manifest = vision_datasets.DatasetManifest.create_dataset_manifest(
            vision_datasets.DatasetInfo(definition), usage, str(root)
        )
        return manifest.labelmap, [tuple(image.labels) for image in manifest.images], manifest
    from vision_datasets.common import DatasetInfoFactory, Usages
    from vision_datasets.common.factory import DataManifestFactory

    manifest = DataManifestFactory.create(
        DatasetInfoFactory.create(definition), getattr(Usages, usage.upper()), str(root)
    )
    labels = [tuple(label.category_id for label in image.labels) for image in manifest.images]
    return [c.name for c in manifest.categories], labels, manifest


def test_reader_agrees_with_the_vision_datasets_package(tmp_path):
    pytest.importorskip("vision_datasets")
    multi = [(0,), (1, 2), (2,), (0, 1), (1,)]
    write_iris_dataset(
        tmp_path / "classification" / "voc2007_20211007", ["a", "b", "c"], {"test": ("test_ic.txt", "test.zip", multi)}
    )
    write_coco_dataset(
        tmp_path / "classification" / "hateful_memes_20211014",
        {5: "y", 2: "x"},
        {"train_meta.json": [5], "test_meta.json": [5, 2, 2, 5]},
    )
    for name, definition in [
        (
            "voc2007",
            {
                "name": "voc-2007-classification",
                "type": "classification_multilabel",
                "root_folder": "classification/voc2007_20211007",
                "labelmap": "labels.txt",
                "test": {"index_path": "test_ic.txt"},
            },
        ),
        (
            "hateful-memes",
            {
                "name": "hateful-memes",
                "type": "classification_multiclass",
                "format": "coco",
                "root_folder": "classification/hateful_memes_20211014",
                "test": {"index_path": "test_meta.json"},
            },
        ),
    ]:
        spec = ELEVATER_DATASETS.get(name)
        ours = read_split(locate(tmp_path, spec), spec, "test")
        classnames, labels, manifest = _their_manifest(tmp_path, definition, "test")
        assert list(classnames) == ours.classnames and labels == ours.labels
        assert [image.img_path.replace("\\", "/") for image in manifest.images] == [
            str(ours.folder / location) for location in ours.locations
        ]
        with zipfile.ZipFile(ours.folder / ours.locations[0].split("@")[0]) as archive:
            assert ours.locations[0].split("@")[1] in archive.namelist()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("multilabel", [False, True])
def test_few_shot_subsets_match_the_sampler_elevater_uses(tmp_path, seed, multilabel):
    vision_datasets = pytest.importorskip("vision_datasets")
    if not hasattr(getattr(vision_datasets, "DatasetManifest", None), "sample_few_shot_subset"):
        pytest.skip("ELEVATER's sampler is vision-datasets 0.2.x DatasetManifest.sample_few_shot_subset")
    if multilabel:
        labels = [(c,) for c in range(3) for _ in range(7)] + [(0, 2), (1, 2), (0, 1), (0, 1, 2)] * 3 + [()] * 5
    else:
        labels = [(c,) for c in range(3) for _ in range(7)]
    write_iris_dataset(tmp_path / "voc", ["a", "b", "c"], {"train": ("train.txt", "train.zip", labels)}, "images")
    definition = {
        "name": "voc",
        "type": "classification_multilabel" if multilabel else "classification_multiclass",
        "root_folder": "voc",
        "labelmap": "labels.txt",
        "train": {"index_path": "train.txt"},
    }
    _, _, manifest = _their_manifest(tmp_path, definition, "train")
    theirs = manifest.sample_few_shot_subset(4, random_seed=seed)
    ours = sample_few_shot(labels, 3, 4, seed)
    assert [image.img_path for image in theirs.images] == [manifest.images[i].img_path for i in ours]
