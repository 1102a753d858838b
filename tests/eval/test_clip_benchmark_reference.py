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


class CudaOnCpu(str):
    """The device CLIP_benchmark's linear probe insists on (`assert device == 'cuda'`), running on the CPU."""

    def __eq__(self, other: object) -> bool:
        return other in ("cuda", "cpu")

    __hash__ = str.__hash__


def _their_linear_probe(tmp_path, monkeypatch, train_x, train_y, test_x, test_y, *, val_proportion=None, seed=0):
    """CLIP_benchmark 1.6.2's `linear_probe.evaluate` on these features (written where it caches features, so it
    skips featurising), its CUDA calls made no-ops; the global stream seeded as its CLI seeds it."""
    from clip_benchmark.metrics import linear_probe

    monkeypatch.setattr(zeroshot_classification, "float", lambda x: builtins.float(np.asarray(x).item()), raising=False)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    folder = tmp_path / "features" / "model"
    folder.mkdir(parents=True)
    torch.manual_seed(seed)  # cli.run
    if val_proportion is not None:  # cli.run: random_split of the train dataset, before featurising
        kept, held_out = torch.utils.data.random_split(range(len(train_y)), [1 - val_proportion, val_proportion])
        torch.save(train_x[held_out.indices], folder / "features_val.pt")
        torch.save(train_y[held_out.indices], folder / "targets_val.pt")
        train_x, train_y = train_x[kept.indices], train_y[kept.indices]
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        torch.save(x, folder / f"features_{split}.pt")
        torch.save(y, folder / f"targets_{split}.pt")
    with_val = object() if val_proportion is not None else None
    return linear_probe.evaluate(
        torch.nn.Identity(), None, None, -1, 64, 0, 0.1, 10, "model", seed, str(tmp_path / "features"),
        CudaOnCpu("cpu"), val_dataloader=with_val, normalize=True, amp=False,
    )  # fmt: skip


@pytest.mark.parametrize("val_proportion", [None, 0.2])
def test_our_clip_benchmark_probe_equals_clip_benchmarks_on_the_same_features(tmp_path, monkeypatch, val_proportion):
    from protorkd.eval.linear_clip_benchmark import clip_benchmark_linear_probe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 64: both sides run faster on one thread
    try:
        centres = torch.randn(6, 16, generator=torch.Generator().manual_seed(9)) * 0.5
        generator = torch.Generator().manual_seed(0)
        labels = torch.arange(6).repeat(70)
        features = F.normalize(centres[labels] + torch.randn(420, 16, generator=generator), dim=-1)
        train = (features[:300], labels[:300])
        test = (features[300:], labels[300:])
        theirs = _their_linear_probe(tmp_path, monkeypatch, *train, *test, val_proportion=val_proportion)
        ours = clip_benchmark_linear_probe(*train, *test, val_proportion=val_proportion).metrics
    finally:
        torch.set_num_threads(threads)
    assert 0.3 < theirs["lp_acc1"] < 0.95  # the case is not trivial
    assert ours["top1"] / 100 == pytest.approx(theirs["lp_acc1"], abs=0.001)  # within 0.1 point
    assert ours["top5"] / 100 == pytest.approx(theirs["lp_acc5"], abs=0.001)
    assert ours["mean_per_class_recall"] / 100 == pytest.approx(theirs["lp_mean_per_class_recall"], abs=0.001)
    assert ours["weight_decay"] == theirs["weight_decay"]  # 0 without validation, else the same search's choice


def test_datasets_whose_zero_shot_records_carry_clip_benchmarks_name_use_its_class_names_and_templates():
    """A zero-shot record named like a CLIP_benchmark dataset must mean what CLIP_benchmark's does."""
    import json
    from pathlib import Path

    import clip_benchmark.datasets as cb_datasets

    from protorkd.eval.catalog import DATASETS, ClassificationSpec
    from protorkd.eval.zeroshot import CLIP_PROMPTS_FILE, packaged_prompts

    folder = Path(cb_datasets.__file__).parent
    their_names = json.loads((folder / "en_classnames.json").read_text())
    their_templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text())
    # CLIP_benchmark takes these from torchvision's datasets, transcribed: CIFAR10.classes, STL10.classes,
    # RenderedSST2.classes
    their_names |= {
        "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "stl10": ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"],
        "renderedsst2": ["negative", "positive"],
    }
    imagenet_family = {"imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r"}  # imagenet1k's names, masked
    checked = []
    for spec in map(DATASETS.get, DATASETS.names()):
        if not isinstance(spec, ClassificationSpec):
            continue
        name = spec.zeroshot_record_name
        key = "imagenet1k" if name in imagenet_family else name
        if key not in their_names and key not in their_templates:
            continue  # not a CLIP_benchmark name (ours says what differs, e.g. cifar100_openai_classnames)
        entry = packaged_prompts(CLIP_PROMPTS_FILE)[spec.prompts]
        ours = [c if isinstance(c, str) else c[0] for c in entry["classes"]]
        if spec.prompt_classes is not None:
            ours = [ours[i] for i in spec.prompt_classes]
            their = [their_names[key][i] for i in spec.prompt_classes]
        else:
            their = their_names[key]
        assert all(isinstance(c, str) for c in entry["classes"]), name  # no synonyms CLIP_benchmark lacks
        assert ours == their, name
        assert [t.replace("{}", "{c}") for t in entry["templates"]] == their_templates.get(
            key, their_templates["imagenet1k"]
        ), name
        checked.append(name)
    assert sorted(checked) == sorted(
        ["imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "cifar10", "stl10", "mnist",
         "flowers", "gtsrb", "country211", "renderedsst2", "kitti_closest_vehicle_distance"]
    )  # fmt: skip
