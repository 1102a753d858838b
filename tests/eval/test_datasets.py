from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from protorkd.errors import UsageError
from protorkd.eval.catalog import DATASETS, discover, select
from protorkd.eval.datasets import ImageFolderDataset, coco_captions, karpathy_captions, natural_order
from protorkd.eval.features import image_features
from tests.conftest import shared_data


def _to_tensor(image):
    return torch.zeros(3, 4, 4)


def _image(path, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_numeric_class_folders_are_in_numeric_order():
    assert natural_order(["10", "2", "1"]) == ["1", "2", "10"]
    assert natural_order(["b", "a", "10"]) == ["10", "a", "b"]
    assert natural_order(["002", "010", "001"]) == ["001", "002", "010"]


def test_empty_class_folders_are_dropped_and_reported(tmp_path):
    for name in ("000", "002"):
        _image(tmp_path / name / "x.jpg")
    (tmp_path / "001").mkdir()
    dataset = ImageFolderDataset(tmp_path, _to_tensor)
    assert dataset.class_folders == ["000", "001", "002"]
    assert dataset.classes == ["000", "002"] and dataset.empty_classes == ["001"]
    assert [label for _, label in dataset.samples] == [0, 1]


def test_a_missing_or_imageless_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(UsageError, match=str(tmp_path / "nope")):
        ImageFolderDataset(tmp_path / "nope", _to_tensor)
    (tmp_path / "cls").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        ImageFolderDataset(tmp_path, _to_tensor)


def test_an_unreadable_image_stops_extraction_with_its_path(tmp_path, tiny_model):
    _image(tmp_path / "a" / "good.jpg")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    from protorkd.data.transforms import image_transform

    dataset = ImageFolderDataset(tmp_path, image_transform(32, (0.5,) * 3, (0.5,) * 3, train=False))
    with pytest.raises(UsageError, match="broken.jpg"):
        image_features(tiny_model, dataset, device="cpu", batch_size=4, workers=1)


def test_coco_and_karpathy_caption_files_are_read_with_every_caption(tmp_path):
    for name in ("1.jpg", "2.jpg"):
        _image(tmp_path / "images" / name)
    coco = {
        "images": [{"id": 7, "file_name": "2.jpg"}, {"id": 3, "file_name": "1.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "b1"},
            {"id": 2, "image_id": 3, "caption": " a1 "},
            {"id": 3, "image_id": 7, "caption": "b2"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    dataset = coco_captions(tmp_path / "captions.json", tmp_path / "images", _to_tensor)
    assert [p.name for p in dataset.image_paths] == ["1.jpg", "2.jpg"]
    assert dataset.captions == ["a1", "b1", "b2"] and dataset.caption_image.tolist() == [0, 1, 1]
    karpathy = {
        "images": [
            {"filename": "1.jpg", "split": "test", "sentences": [{"raw": "x"}, {"raw": "y"}]},
            {"filename": "2.jpg", "split": "train", "sentences": [{"raw": "z"}]},
        ]
    }
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    flickr = karpathy_captions(tmp_path / "karpathy.json", tmp_path / "images", "test", _to_tensor)
    assert len(flickr) == 1 and flickr.captions == ["x", "y"]


def test_a_captions_file_naming_absent_images_is_an_error(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "gone.jpg"}], "annotations": [{"id": 1, "image_id": 1, "caption": "c"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    with pytest.raises(UsageError, match="gone.jpg"):
        coco_captions(tmp_path / "captions.json", tmp_path, _to_tensor)


def test_discovery_finds_registered_and_generic_datasets(tmp_path):
    _image(tmp_path / "cifar10" / "test" / "cat" / "1.jpg")
    _image(tmp_path / "ucf101" / "testlist01" / "Archery" / "1.jpg")
    _image(tmp_path / "shapes" / "test" / "ring" / "1.jpg")
    (tmp_path / "shapes" / "captions_test.json").write_text("{}")
    names = [spec.name for spec in discover(tmp_path)]
    assert names == ["cifar10", "ucf101", "shapes", "shapes"]
    assert DATASETS.get("birdsnap").train_split is None


def test_naming_an_absent_dataset_is_an_error_naming_the_expected_path(tmp_path):
    with pytest.raises(UsageError, match=str(tmp_path / "flowers102" / "test")):
        select(tmp_path, ["flowers102"])
    with pytest.raises(UsageError, match="neither registered"):
        select(tmp_path, ["nonsense"])


def test_shared_cifar10_and_coco_mini_load_with_their_documented_counts():
    cifar = DATASETS.get("cifar10")
    root = shared_data("cifar10_jpg").parent
    test = ImageFolderDataset(root / "cifar10_jpg" / "test", _to_tensor)
    train = ImageFolderDataset(root / "cifar10_jpg" / "train", _to_tensor)
    assert (len(test), len(train), len(test.classes)) == (10000, 5000, 10)
    assert cifar.prompts == "CIFAR10"
    coco = shared_data("coco_mini_captions")
    dataset = coco_captions(coco / "annotations" / "captions_val2017.json", coco / "val2017", _to_tensor)
    assert (len(dataset), len(dataset.captions)) == (159, 795)
