"""Caption ensembles against a hand computation and against CLIP_benchmark's prompt-ensembled classifier."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from protorkd.errors import UsageError
from protorkd.models.options import TeacherSide
from protorkd.teachers.cache import TeacherFeatures
from protorkd.teachers.caption_ensemble import caption_ensemble


def cached(features: list[list[float]], rows: list[int]) -> TeacherFeatures:
    return TeacherFeatures(np.array(features, dtype=np.float16), np.array(rows), set(), Path("cache"))


def unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector]


def test_every_row_of_an_image_gets_the_normalised_mean_of_its_normalised_caption_features():
    # three distinct captions (the cache stores each once); rows: a/c0, b/c1, a/c2, a/c1, b/c1
    tower = cached([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]], [0, 1, 2, 1, 1])
    got = caption_ensemble(tower, ["a.jpg", "b.jpg", "a.jpg", "a.jpg", "b.jpg"], TeacherSide.TEXT)
    c0, c1, c2 = unit([3.0, 4.0]), unit([1.0, 0.0]), unit([0.0, 2.0])
    a = unit([(c0[k] + c2[k] + c1[k]) / 3 for k in range(2)])  # 0.8 + 0 + 1, 0.6 + 1 + 0 over 3
    b = unit(c1)  # row 1 and row 4 are the same caption twice: its own direction
    expected = torch.tensor([a, b, a, a, b])
    torch.testing.assert_close(tower_rows(got, 5), expected, rtol=0, atol=1e-6)
    assert got.info["caption_ensemble"] is True and got.dim == 2


def tower_rows(features: TeacherFeatures, n: int) -> torch.Tensor:
    return features.lookup(torch.arange(n))


def test_with_every_template_as_captions_the_target_is_clip_benchmarks_zero_shot_class_embedding():
    zeroshot = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    templates = ["a photo of a {c}.", "a blurry photo of a {c}.", "art of the {c}."]  # CLIP_benchmark's form
    classes = ["cat", "dog"]
    captions = sorted({t.format(c=c) for t in templates for c in classes})
    table = torch.randn(len(captions), 5, generator=torch.Generator().manual_seed(0)) * 3

    class Model(torch.nn.Module):  # encode_text looks a caption's (unnormalised) feature up in the table
        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return table[tokens]

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor([captions.index(text) for text in texts])

    reference = zeroshot.zero_shot_classifier(Model(), tokenizer, classes, templates, "cpu", amp=False)  # [D, C]
    images = [f"{c}-{i}.jpg" for c in classes for i in range(2) for _ in templates]  # 2 photos per class
    rows = [captions.index(t.format(c=c)) for c in classes for _ in range(2) for t in templates]
    tower = TeacherFeatures(table.numpy(), np.array(rows), set(), Path("cache"))
    got = tower_rows(caption_ensemble(tower, images, TeacherSide.TEXT), len(rows))
    expected = reference.T[[classes.index(path.split("-")[0]) for path in images]]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_it_needs_a_cached_locked_text_tower():
    tower = cached([[1.0, 0.0]], [0])
    with pytest.raises(UsageError, match="--teacher text"):
        caption_ensemble(tower, ["a.jpg"], TeacherSide.IMAGE)
    with pytest.raises(UsageError, match="--teacher text"):
        caption_ensemble(None, ["a.jpg"], TeacherSide.TEXT)
