"""Our zero-shot and retrieval metrics against CLIP_benchmark's own `evaluate` functions on the same embeddings.

Skipped without the `compare` extra (pip install 'protorkd[compare]'). The stand-in model returns fixed
embeddings: an image "is" its embedding and a text is looked up in a table, so both implementations see
exactly the same vectors and differ only in what they compute from them.
"""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protorkd.eval.ranking import accuracy_metrics
from protorkd.eval.records import clip_benchmark_metrics
from protorkd.eval.retrieval import retrieval_metrics
from protorkd.eval.zeroshot import build_zeroshot_classifier, zeroshot_scores

pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval  # noqa: E402

DIM = 24


class TableModel(torch.nn.Module):
    """encode_image(x) = x; texts are rows of a table of random embeddings, one per distinct string."""

    def __init__(self) -> None:
        super().__init__()
        self.vocabulary: dict[str, int] = {}
        self.table = torch.randn(4000, DIM, generator=torch.Generator().manual_seed(7))
        self.embed_dim = DIM

    def tokenize(self, texts: list[str]) -> torch.Tensor:  # CLIP_benchmark's tokenizer
        return torch.tensor([self.vocabulary.setdefault(text, len(self.vocabulary)) for text in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]

    def encode_texts(self, texts: list[str], device: str = "cpu") -> torch.Tensor:  # ours
        return self.encode_text(self.tokenize(texts))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images


class Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, targets: list) -> None:
        self.images, self.targets = images, targets
        self.classes = [f"class {i}" for i in range(9)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def test_zeroshot_metrics_equal_clip_benchmarks_on_the_same_embeddings(monkeypatch):
    # CLIP_benchmark 1.6.2's `accuracy` calls float() on a 1-element array, which numpy 2.x refuses; give its
    # module numpy 1.x's conversion (the element's value), nothing else changes
    monkeypatch.setattr(zeroshot_classification, "float", lambda x: builtins.float(np.asarray(x).item()), raising=False)
    model = TableModel()
    classnames = [f"class {i}" for i in range(9)]
    templates = ["a photo of a {c}.", "a drawing of the {c}.", "{c}"]
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 9, (300,), generator=generator)
    classifier = build_zeroshot_classifier(model, classnames, templates, device="cpu")
    # images near their class embedding, plus noise: accuracies well away from 0 and 100
    images = 2 * classifier.T[labels] + torch.randn(300, DIM, generator=generator)
    loader = torch.utils.data.DataLoader(Images(images, labels.tolist()), batch_size=64)
    theirs = zeroshot_classification.evaluate(
        model, loader, model.tokenize, classnames, templates, device="cpu", amp=False
    )
    ours = accuracy_metrics(zeroshot_scores(F.normalize(images, dim=-1), classifier), labels)
    assert 0.2 < theirs["acc1"] < 0.9  # the case is not trivial
    assert clip_benchmark_metrics("zeroshot_classification", ours) == pytest.approx(theirs, abs=1e-6)


def test_retrieval_metrics_equal_clip_benchmarks_on_the_same_embeddings():
    model = TableModel()
    generator = torch.Generator().manual_seed(1)
    n_images = 150
    images = torch.randn(n_images, DIM, generator=generator)
    captions = [[f"image {i} caption {j}" for j in range(5 if i % 3 else 4)] for i in range(n_images)]
    owners = torch.tensor([i for i, texts in enumerate(captions) for _ in texts])
    model.tokenize([text for texts in captions for text in texts])
    texts = model.encode_texts([text for texts in captions for text in texts])
    images = images + 2.5 * torch.stack([texts[owners == i].mean(0) for i in range(n_images)])  # related, noisy
    dataset = [(images[i], captions[i]) for i in range(n_images)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=32, collate_fn=lambda batch: (torch.stack([b[0] for b in batch]), [b[1] for b in batch])
    )
    theirs = zeroshot_retrieval.evaluate(
        model, loader, model.tokenize, device="cpu", amp=False, recall_k_list=[1, 5, 10]
    )
    ours = retrieval_metrics(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), owners, block=37)
    converted = clip_benchmark_metrics("zeroshot_retrieval", ours)
    assert 0.1 < theirs["image_retrieval_recall@1"] < 0.9
    assert {key: converted[key] for key in theirs} == pytest.approx(theirs, abs=1e-6)
