from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from protorkd.errors import UsageError
from protorkd.eval.zeroshot import (
    accuracy_metrics,
    align_classnames,
    build_zeroshot_classifier,
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


def test_perfect_scores_give_100_top1_and_random_scores_give_chance():
    labels = torch.arange(10).repeat(100)
    perfect = F.one_hot(labels, 10).float()
    assert accuracy_metrics(perfect, labels, mean_per_class=True) == {
        "top1": 100.0,
        "top5": 100.0,
        "mean_per_class_recall": 100.0,
    }
    random = torch.randn(1000, 10, generator=torch.Generator().manual_seed(0))
    metrics = accuracy_metrics(random, labels)
    assert abs(metrics["top1"] - 10) < 3 and abs(metrics["top5"] - 50) < 5


def test_mean_per_class_recall_weights_classes_equally():
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [1.0, 0]])  # always class 0
    metrics = accuracy_metrics(logits, labels, mean_per_class=True)
    assert metrics["top1"] == 75.0 and metrics["mean_per_class_recall"] == 50.0


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


def test_prompts_come_from_the_metadata_file_first_then_open_clip_then_folder_names(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"CIFAR10": {"classes": ["plane", "car"], "templates": ["a {}."]}}))
    from_file = resolve_prompts(
        ("CIFAR10", "cifar10"), ["airplane", "automobile"], ["airplane", "automobile"], metadata_files=[path]
    )
    assert from_file.classnames == ["plane", "car"] and from_file.templates == ["a {}."]
    folders = [f"n{i:08d}" for i in range(1000)]
    imagenet = resolve_prompts(("ImageNet", "imagenet"), folders, folders, metadata_files=[path])
    assert imagenet.classnames[0] == "tench" and len(imagenet.templates) == 80
    assert all("{}" in t for t in imagenet.templates)
    own = resolve_prompts(("shapes",), ["big_circle", "ring"], ["big_circle", "ring"], metadata_files=[path])
    assert own.classnames == ["big circle", "ring"] and own.templates == ["a photo of a {}."]


def test_metadata_keys_match_ignoring_case_and_separators(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"StanfordCars": {"classes": ["a", "b"], "templates": ["{}"]}}))
    prompts = resolve_prompts(("stanford_cars",), ["x", "y"], ["x", "y"], metadata_files=[path])
    assert prompts.classnames == ["a", "b"]
