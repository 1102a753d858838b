"""The registry of downstream datasets: where each lives under the data root, its classes, and how to read it.

One entry per dataset (`DATASETS.get("cifar10")`), no if/elif chain: every dataset of the shipped CLIP
prompt file (OpenAI's 27), ImageNet's distribution shifts (V2, Sketch, A, R), COCO and Flickr30k. Folder
names serve as class names only for a dataset nobody registered: any `ROOT/<name>/{train,test}/<class>/`
folder is a classification dataset and any `ROOT/<name>/captions_test.json` (images under
`ROOT/<name>/test/`) a retrieval dataset, which is how the built-in demo's `shapes` is found. docs/data.md
describes every layout with its expected counts.

Each classification entry says:
- where its images are: `ROOT/<folder>/<split>/<class>/` (CLOOB's and CLIP_benchmark's ImageFolder layouts;
  an empty split means the folder itself holds the class folders, as the ImageNet-A/-R/-Sketch archives
  extract), or torchvision's own format for CIFAR and STL-10;
- its class order: the folders in `natural_order` (the prompt file lists its names in that order, or the
  folders are the names and are matched by name), or `class_folders`, the folder of each prompt class in
  the prompt file's order (EuroSAT, FER-2013: their folders are neither the names nor in their order;
  ImageNet-A/-R: the 200 WordNet ids, whose names are entries `prompt_classes` of ImageNet's 1000). The
  class list of a registered dataset is fixed: an empty class folder keeps its class (Birdsnap stays
  500-way);
- its names in records: `clip_benchmark_name`, CLIP_benchmark's name when the images are the split
  CLIP_benchmark reads, else a name that says what they are; `zeroshot_name`, the zero-shot record's name,
  which is CLIP_benchmark's only where our class names and templates equal CLIP_benchmark's packaged ones
  (tests/eval/test_clip_benchmark_reference.py) and otherwise says so (`cifar100_openai_classnames`,
  `food101_openai_prompts`, ...).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
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

IMAGENET_CLASSES_FILE = "imagenet_classes.json"  # in protorkd/eval/prompts/ (SOURCE.md there)


@functools.cache
def imagenet_classes() -> dict[str, list]:
    """{"wnids": ImageNet's 1000 WordNet ids in label order, "imagenet_a" / "imagenet_r": the positions in them
    of the 200 classes of ImageNet-A / ImageNet-R}, shipped as package data (scripts/build_imagenet_classes.py)."""
    text = resources.files("protorkd.eval").joinpath("prompts", IMAGENET_CLASSES_FILE).read_text(encoding="utf-8")
    return json.loads(text)


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
    clip_benchmark_name: str = ""  # CLIP_benchmark's name when the data is its split, else an honest name of ours
    zeroshot_name: str = ""  # the zero-shot record's name (default clip_benchmark_name): see the module docstring
    class_folders: tuple[str, ...] | None = None  # the folder of each class, in label (= prompt) order
    prompt_classes: tuple[int, ...] | None = None  # which of the prompt entry's classes these are (a subset)

    @property
    def registered(self) -> bool:
        """A dataset of the registry (its class list is fixed), not a generic folder."""
        return self.prompts is not None

    @property
    def zeroshot_record_name(self) -> str:
        return self.zeroshot_name or self.clip_benchmark_name or self.name

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
        return ImageFolderDataset(
            Path(root) / self.folder / split, transform, class_folders=self.class_folders, keep_empty=self.registered
        )


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


def _imagenet_subset(name: str, folder: str, clip_benchmark_name: str) -> ClassificationSpec:
    """ImageNet-A or -R: the archive's `<wnid>/` folders, scored among their 200 classes only."""
    classes = imagenet_classes()
    indices = tuple(classes[name])
    return ClassificationSpec(
        name,
        folder,
        test_split="",
        train_split=None,
        prompts="ImageNet",
        clip_benchmark_name=clip_benchmark_name,
        class_folders=tuple(classes["wnids"][i] for i in indices),
        prompt_classes=indices,
    )


def _test_only(name: str, prompts: str, clip_benchmark_name: str, **fields) -> ClassificationSpec:
    return ClassificationSpec(
        name, name, train_split=None, prompts=prompts, clip_benchmark_name=clip_benchmark_name, **fields
    )


EUROSAT_FOLDERS = (  # torchvision's / the EuroSAT archive's folders, in the order of OpenAI's EuroSAT names
    "Forest",
    "PermanentCrop",
    "Residential",
    "River",
    "Pasture",
    "SeaLake",
    "HerbaceousVegetation",
    "AnnualCrop",
    "Industrial",
    "Highway",
)
FER2013_FOLDERS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # Kaggle's, in OpenAI's order

_REGISTERED = [
    ClassificationSpec("imagenet", "imagenet", prompts="ImageNet", clip_benchmark_name="imagenet1k"),
    _test_only("imagenetv2", "ImageNet", "imagenetv2"),  # imagenetv2/test/<0..999>/ (matched-frequency)
    _test_only("imagenet_sketch", "ImageNet", "imagenet_sketch", test_split=""),  # imagenet_sketch/<wnid>/
    _imagenet_subset("imagenet_a", "imagenet-a", "imagenet-a"),
    _imagenet_subset("imagenet_r", "imagenet-r", "imagenet-r"),
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
        zeroshot_name="cifar100_openai_classnames",  # CLIP_benchmark prompts torchvision's "aquarium_fish"
    ),
    ClassificationSpec(
        "stl10",
        "stl10",
        torchvision="STL10",
        torchvision_marker="stl10_binary",
        prompts="STL10",
        clip_benchmark_name="stl10",
    ),
    ClassificationSpec("mnist", "mnist", prompts="MNIST", clip_benchmark_name="mnist"),
    ClassificationSpec(
        "food101", "food101", prompts="Food101", clip_benchmark_name="food101", zeroshot_name="food101_openai_prompts"
    ),
    ClassificationSpec(
        "sun397",
        "sun397",
        prompts="SUN397",
        clip_benchmark_name="sun397_test",
        zeroshot_name="sun397_test_openai_prompts",
    ),
    ClassificationSpec(
        "dtd", "dtd", prompts="DescribableTextures", clip_benchmark_name="dtd", zeroshot_name="dtd_openai_prompts"
    ),
    ClassificationSpec(
        "oxford_pets",
        "oxford_pets",
        prompts="OxfordPets",
        clip_benchmark_name="pets",
        zeroshot_name="pets_openai_prompts",
    ),
    ClassificationSpec("caltech101", "caltech101", prompts="Caltech101", clip_benchmark_name="caltech101_test"),
    ClassificationSpec(
        "fgvc_aircraft",
        "fgvc_aircraft",
        prompts="FGVCAircraft",
        clip_benchmark_name="fgvc_aircraft",
        zeroshot_name="fgvc_aircraft_openai_prompts",
    ),
    ClassificationSpec(
        "eurosat",
        "eurosat",
        prompts="EuroSAT",
        clip_benchmark_name="eurosat_test",
        zeroshot_name="eurosat_test_openai_prompts",
        class_folders=EUROSAT_FOLDERS,
    ),
    ClassificationSpec(
        "resisc45",
        "resisc45",
        prompts="RESISC45",
        clip_benchmark_name="resisc45",
        zeroshot_name="resisc45_openai_prompts",
    ),
    ClassificationSpec(
        "patchcamelyon",
        "patchcamelyon",
        prompts="PatchCamelyon",
        clip_benchmark_name="pcam",
        zeroshot_name="pcam_openai_prompts",
    ),
    ClassificationSpec("rendered_sst2", "rendered_sst2", prompts="SST2", clip_benchmark_name="renderedsst2"),
    ClassificationSpec(
        "fer2013",
        "fer2013",
        prompts="FacialEmotionRecognition2013",
        clip_benchmark_name="fer2013",
        zeroshot_name="fer2013_openai_prompts",
        class_folders=FER2013_FOLDERS,
    ),
    ClassificationSpec(
        "clevr_counts",
        "clevr_counts",
        prompts="CLEVRCounts",
        clip_benchmark_name="clevr_count_all",
        zeroshot_name="clevr_count_all_openai_prompts",
    ),
    ClassificationSpec("kitti", "kitti", prompts="KITTI", clip_benchmark_name="kitti_closest_vehicle_distance"),
    ClassificationSpec(
        "voc2007",
        "voc2007",
        prompts="PascalVOC2007",
        clip_benchmark_name="voc2007",
        zeroshot_name="voc2007_openai_prompts",
    ),
    _test_only("hateful_memes", "HatefulMemes", "hateful_memes_test"),
    _test_only("kinetics700", "Kinetics700", "kinetics700_val_frames"),
    _test_only("birdsnap", "Birdsnap", "birdsnap_cloob_test"),
    _test_only("country211", "Country211", "country211"),
    _test_only("flowers102", "Flowers102", "flowers"),
    _test_only("gtsrb", "GTSRB", "gtsrb"),
    _test_only("stanford_cars", "StanfordCars", "cars", zeroshot_name="cars_openai_prompts"),
    _test_only("ucf101", "UCF101", "ucf101_testlist01", test_split="testlist01"),
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
    chosen = []
    for name in names:
        matching = [spec for spec in present if spec.name.lower() == name.lower()]  # a folder can be both kinds
        if matching:
            chosen.extend(matching)
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
