"""The registry of downstream datasets: where each lives under the data root, and how to read it.

One entry per dataset (`DATASETS.get("cifar10")`), no if/elif chain. Besides the registered names, any
`ROOT/<name>/{train,test}/<class>/` folder is a classification dataset and any
`ROOT/<name>/captions_test.json` (images under `ROOT/<name>/test/`) a retrieval dataset, which is how the
built-in demo's `shapes` is found. docs/data.md describes every layout with its expected counts.

Each entry names its zero-shot prompts (`prompts`: its key in the shipped CLIP prompt file) and the name
its CLIP_benchmark records carry: CLIP_benchmark's own name where the data is that dataset's split
(`imagenet1k`, `cifar10`, `cars`, `flowers`, `flickr30k`, ...), otherwise one that says what the data is
(`coco2017_val`: CLIP_benchmark's `mscoco_captions` is the Karpathy 5k test split of val2014, another
image set; `birdsnap_cloob_test`: CLOOB's 1,855-image copy; `ucf101_testlist01`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protorkd.errors import UsageError
from protorkd.eval.datasets import (
    CaptionedImages,
    ImageFolderDataset,
    TorchvisionDataset,
    Transform,
    coco_captions,
    karpathy_captions,
)
from protorkd.registry import Registry


@dataclass(frozen=True)
class ClassificationSpec:
    """A labelled image dataset: `ROOT/<folder>/<split>/<class>/*`, or torchvision's format in `ROOT/<folder>`."""

    name: str
    folder: str
    test_split: str = "test"
    train_split: str | None = "train"
    torchvision: str | None = None  # "CIFAR10", "CIFAR100" or "STL10"
    torchvision_marker: str = ""  # the sub-folder that torchvision's format creates, e.g. cifar-10-batches-py
    prompts: str | None = None  # its entry in the shipped CLIP prompts (zeroshot.CLIP_PROMPTS_FILE)
    clip_benchmark_name: str = ""  # CLIP_benchmark's name when the data is its dataset, else an honest name of ours

    def _torchvision_root(self, root: Path) -> Path | None:
        folder = Path(root) / self.folder
        if self.torchvision and (folder / self.torchvision_marker).is_dir():
            return folder
        return None

    def split_path(self, root: Path, split: str) -> Path:
        return self._torchvision_root(root) or Path(root) / self.folder / split

    def has_split(self, root: Path, split: str | None) -> bool:
        if split is None:
            return False
        return self._torchvision_root(root) is not None or (Path(root) / self.folder / split).is_dir()

    def load(self, root: Path, split: str, transform: Transform) -> ImageFolderDataset | TorchvisionDataset:
        tv_root = self._torchvision_root(root)
        if tv_root is not None:
            return TorchvisionDataset(self.torchvision, tv_root, split, transform)
        return ImageFolderDataset(Path(root) / self.folder / split, transform)


@dataclass(frozen=True)
class RetrievalSpec:
    """Captioned images: a COCO-format captions file, or Karpathy's split json (Flickr30k)."""

    name: str
    annotations: str  # relative to ROOT
    images: str  # relative to ROOT
    karpathy_split: str | None = None  # set for Karpathy-format json
    clip_benchmark_name: str = ""

    def has_data(self, root: Path) -> bool:
        return (Path(root) / self.annotations).is_file()

    def load(self, root: Path, transform: Transform) -> CaptionedImages:
        root = Path(root)
        if self.karpathy_split:
            return karpathy_captions(root / self.annotations, root / self.images, self.karpathy_split, transform)
        return coco_captions(root / self.annotations, root / self.images, transform)


DATASETS: Registry = Registry("evaluation dataset")

_REGISTERED = [
    ClassificationSpec("imagenet", "imagenet", prompts="ImageNet", clip_benchmark_name="imagenet1k"),
    ClassificationSpec(
        "cifar10",
        "cifar10",
        torchvision="CIFAR10",
        torchvision_marker="cifar-10-batches-py",
        prompts="CIFAR10",
        clip_benchmark_name="cifar10",
    ),
    ClassificationSpec(
        "cifar100",
        "cifar100",
        torchvision="CIFAR100",
        torchvision_marker="cifar-100-python",
        prompts="CIFAR100",
        clip_benchmark_name="cifar100",
    ),
    ClassificationSpec(
        "stl10",
        "stl10",
        torchvision="STL10",
        torchvision_marker="stl10_binary",
        prompts="STL10",
        clip_benchmark_name="stl10",
    ),
    ClassificationSpec(
        "birdsnap", "birdsnap", train_split=None, prompts="Birdsnap", clip_benchmark_name="birdsnap_cloob_test"
    ),
    ClassificationSpec(
        "country211", "country211", train_split=None, prompts="Country211", clip_benchmark_name="country211"
    ),
    ClassificationSpec(
        "flowers102",
        "flowers102",
        train_split=None,
        prompts="Flowers102",
        clip_benchmark_name="flowers",
    ),
    ClassificationSpec("gtsrb", "gtsrb", train_split=None, prompts="GTSRB", clip_benchmark_name="gtsrb"),
    ClassificationSpec(
        "stanford_cars", "stanford_cars", train_split=None, prompts="StanfordCars", clip_benchmark_name="cars"
    ),
    ClassificationSpec(
        "ucf101",
        "ucf101",
        test_split="testlist01",
        train_split=None,
        prompts="UCF101",
        clip_benchmark_name="ucf101_testlist01",
    ),
    ClassificationSpec(
        "ucf101_testlist02",
        "ucf101",
        test_split="testlist02",
        train_split=None,
        prompts="UCF101",
        clip_benchmark_name="ucf101_testlist02",
    ),
    ClassificationSpec(
        "ucf101_testlist03",
        "ucf101",
        test_split="testlist03",
        train_split=None,
        prompts="UCF101",
        clip_benchmark_name="ucf101_testlist03",
    ),
    RetrievalSpec(
        "coco2017",
        "coco2017/annotations/captions_val2017.json",
        "coco2017/val2017",
        clip_benchmark_name="coco2017_val",
    ),
    RetrievalSpec(
        "flickr30k",
        "flickr30k/dataset_flickr30k.json",
        "flickr30k/flickr30k-images",
        karpathy_split="test",
        clip_benchmark_name="flickr30k",
    ),
]
for _spec in _REGISTERED:
    DATASETS.register(_spec.name)(_spec)


def registered_folders() -> set[str]:
    folders = set()
    for name in DATASETS:
        spec = DATASETS.get(name)
        folders.add(spec.folder if isinstance(spec, ClassificationSpec) else spec.annotations.split("/")[0])
    return folders


def discover(root: Path) -> list[ClassificationSpec | RetrievalSpec]:
    """Every dataset whose data is present under `root`: registered ones first, then generic folders."""
    root = Path(root)
    found: list[ClassificationSpec | RetrievalSpec] = []
    for name in DATASETS:
        spec = DATASETS.get(name)
        present = spec.has_split(root, spec.test_split) if isinstance(spec, ClassificationSpec) else spec.has_data(root)
        if present:
            found.append(spec)
    known = registered_folders()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in known):
        if (folder / "test").is_dir():
            found.append(ClassificationSpec(folder.name, folder.name, clip_benchmark_name=folder.name))
        if (folder / "captions_test.json").is_file():
            found.append(
                RetrievalSpec(
                    folder.name,
                    f"{folder.name}/captions_test.json",
                    f"{folder.name}/test",
                    clip_benchmark_name=folder.name,
                )
            )
    return found


def select(root: Path, names: list[str] | None) -> list[ClassificationSpec | RetrievalSpec]:
    """The present datasets, or exactly `names` (each must be present: a missing one is an error naming its path)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"evaluation data root {root} does not exist")
    present = discover(root)
    if names is None:
        return present
    by_name = {spec.name.lower(): spec for spec in present}
    chosen = []
    for name in names:
        if name.lower() in by_name:
            chosen.append(by_name[name.lower()])
            continue
        spec = DATASETS.get(name) if name in DATASETS else None
        if spec is None:
            raise UsageError(
                f"dataset {name!r} is neither registered ({', '.join(DATASETS.names())}) nor a "
                f"folder {root / name}/test or {root / name}/captions_test.json"
            )
        where = (
            spec.split_path(root, spec.test_split) if isinstance(spec, ClassificationSpec) else root / spec.annotations
        )
        raise UsageError(f"dataset {name}: expected {where}, which does not exist (see docs/data.md)")
    return chosen
