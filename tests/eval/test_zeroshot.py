from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from protorkd.errors import UsageError
from protorkd.eval.zeroshot import (
    align_classnames,
    build_zeroshot_classifier,
    packaged_prompts,
    resolve_prompts,
    zeroshot_scores,
)


class KeywordModel(torch.nn.Module):
    """Text -> one-hot of the first known word it contains; used to check the classifier recipe."""

    embed_dim = 4

    def __init__(self, words):
        super().__init__()
        self.words = words

    def encode_texts(self, texts, device="cpu"):
        out = torch.zeros(len(texts), self.embed_dim)
        for row, text in enumerate(texts):
            hits = [i for i, w in enumerate(self.words) if w in text]
            out[row, hits[0] if hits else 3] = 1.0
            out[row, 3] += 0.5 if "drawing" in text else 0.0
        return F.normalize(out, dim=-1)


def test_classifier_is_the_normalised_mean_of_normalised_template_embeddings():
    model = KeywordModel(["cat", "dog", "fox"])
    classifier = build_zeroshot_classifier(
        model, ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."], device="cpu"
    )
    photo, drawing = torch.tensor([1.0, 0, 0, 0]), F.normalize(torch.tensor([1.0, 0, 0, 0.5]), dim=0)
    expected = F.normalize((photo + drawing) / 2, dim=0)
    assert classifier.shape == (4, 2)
    assert torch.allclose(classifier[:, 0], expected, atol=1e-6)


def test_synonym_lists_average_the_prompts_of_all_synonyms():
    model = KeywordModel(["cat", "dog", "fox"])
    classifier = build_zeroshot_classifier(model, [["cat", "dog"], "fox"], ["{}"], device="cpu")
    assert torch.allclose(classifier[:, 0], F.normalize(torch.tensor([1.0, 1.0, 0, 0]), dim=0), atol=1e-6)


def test_scores_are_100_times_cosine():
    features = F.normalize(torch.randn(3, 4), dim=-1)
    assert torch.allclose(zeroshot_scores(features, features.T).diag(), torch.full((3,), 100.0))


@pytest.mark.parametrize(
    ("folders", "kept", "classnames", "expected"),
    [
        pytest.param(
            ["000", "001", "002", "003"],
            ["000", "002", "003"],  # 001 was empty
            ["albatross", "bunting", "crow", "dove"],
            ["albatross", "crow", "dove"],
            id="names_of_empty_class_folders_are_dropped_so_labels_stay_aligned",
        ),
        pytest.param(
            ["cat", "dog"],
            ["cat", "dog"],
            ["dog", "cat"],
            ["cat", "dog"],
            id="folder_names_equal_to_class_names_are_matched_by_name_not_position",
        ),
    ],
)
def test_class_names_follow_the_kept_class_folders(folders, kept, classnames, expected):
    assert align_classnames(folders, kept, classnames, "test") == expected


def test_a_class_count_mismatch_is_an_error_naming_the_source():
    with pytest.raises(UsageError, match="prompts.json lists 3 classes but the dataset has 4"):
        align_classnames(["a", "b", "c", "d"], ["a"], ["x", "y", "z"], "prompts.json")


def test_prompts_come_from_the_metadata_file_then_the_shipped_clip_prompts_then_folder_names(tmp_path, caplog):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"cifar10": {"classes": ["plane", "car"], "templates": ["a {}."]}}))
    folders = ["airplane", "automobile"]
    from_file = resolve_prompts("cifar10", folders, folders, packaged_key="CIFAR10", metadata_files=[path])
    assert from_file.classnames == ["plane", "car"] and from_file.templates == ["a {}."]
    synsets = [f"n{i:08d}" for i in range(1000)]
    imagenet = resolve_prompts("imagenet", synsets, synsets, packaged_key="ImageNet", metadata_files=[path])
    assert imagenet.classnames[:2] == ["tench", "goldfish"] and len(imagenet.templates) == 80
    assert imagenet.templates[0] == "a bad photo of a {}."
    # Birdsnap's CLOOB folders are numbers: the shipped names are used, in label order, empty folders dropped
    numbered = [f"{i:03d}" for i in range(500)]
    birdsnap = resolve_prompts("birdsnap", numbered, numbered[:45] + numbered[47:], packaged_key="Birdsnap")
    assert birdsnap.classnames[:2] == ["Acadian Flycatcher", "Acorn Woodpecker"] and len(birdsnap.classnames) == 498
    assert birdsnap.templates == ["a photo of a {}, a type of bird."]
    with caplog.at_level("WARNING"):
        own = resolve_prompts("shapes", ["big_circle", "ring"], ["big_circle", "ring"], metadata_files=[path])
    assert own.classnames == ["big circle", "ring"] and own.templates == ["a photo of a {}."]
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "zero-shot shapes" in caplog.text


def test_metadata_keys_match_ignoring_case_and_separators(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"StanfordCars": {"classes": ["a", "b"], "templates": ["{}"]}}))
    prompts = resolve_prompts("stanford_cars", ["x", "y"], ["x", "y"], metadata_files=[path])
    assert prompts.classnames == ["a", "b"]


def test_every_registered_classification_dataset_gets_as_many_class_names_as_it_has_classes():
    from protorkd.eval.catalog import DATASETS, ClassificationSpec

    prompts = packaged_prompts("clip_zeroshot_prompts.json")
    counts = {
        spec.name: len(spec.prompt_classes or prompts[spec.prompts]["classes"])
        for spec in map(DATASETS.get, DATASETS.names())
        if isinstance(spec, ClassificationSpec)
    }
    assert counts == {  # each dataset's published class count
        **{"imagenet": 1000, "imagenetv2": 1000, "imagenet_sketch": 1000, "imagenet_a": 200, "imagenet_r": 200},
        **{"cifar10": 10, "cifar100": 100, "stl10": 10, "mnist": 10, "food101": 101, "sun397": 397, "dtd": 47},
        **{"oxford_pets": 37, "caltech101": 102, "fgvc_aircraft": 100, "eurosat": 10, "resisc45": 45},
        **{"patchcamelyon": 2, "rendered_sst2": 2, "fer2013": 7, "clevr_counts": 8, "kitti": 4, "voc2007": 20},
        **{"hateful_memes": 2, "kinetics700": 700, "birdsnap": 500, "country211": 211, "flowers102": 102},
        **{"gtsrb": 43, "stanford_cars": 196, "ucf101": 101, "ucf101_testlist02": 101, "ucf101_testlist03": 101},
    }
    for spec in map(DATASETS.get, DATASETS.names()):  # a declared folder list names every class once
        if isinstance(spec, ClassificationSpec) and spec.class_folders is not None:
            assert len(set(spec.class_folders)) == counts[spec.name]
