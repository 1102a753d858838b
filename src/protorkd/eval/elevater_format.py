"""ELEVATER's 20 image-classification datasets in their published on-disk format, read without the toolkit.

The official download (the `vision-datasets` hub, see docs/elevater.md) leaves one folder per dataset,
`ROOT/classification/<name>_<date>/`, holding
- a label map (`labels.txt`, `labelmap.txt` for gtsrb): line i is the name of class i;
- per split, an index file in vision-datasets' "iris" format: one image per line, `train.zip@dir/img.jpg 3`,
  the location first (it may contain spaces), the label last; a multi-label image (voc2007) lists `3,8,11`;
- or, for hateful-memes, kitti-distance and resisc45, a COCO json per split: `images[{id, file_name
  [, zip_file]}]`, `annotations[{image_id, category_id}]`, `categories[{id, name}]`; class i is the i-th
  category in id order, and images are listed in id order (as vision-datasets does);
- the zip files that locations point into (`<zip>@<member>`, relative to the dataset folder), or plain files.

Only the standard library is used here (the torch Dataset lives in `protorkd.eval.elevater`), so this module
can be checked against the `vision-datasets` package without installing torch beside it. Why we read the
format ourselves rather than through that package: docs/elevater.md ("Reading the format").
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from protorkd.errors import UsageError
from protorkd.registry import Registry

log = logging.getLogger(__name__)

METRIC_NAMES = ("accuracy", "mean-per-class", "roc_auc", "11point_mAP")  # ELEVATER's names for its metrics
DEFINITIONS_FILE = "vision_datasets.json"  # the download's dataset definitions, optional under the data root


@dataclass(frozen=True)
class ElevaterSpec:
    """Where one ELEVATER dataset lives and how it is scored (values from the toolkit's dataset definitions)."""

    name: str  # our name (`--datasets`)
    hub_name: str  # its name in vision_datasets.json and the download script
    folder_prefix: str  # the download folder is `classification/<folder_prefix>_<yyyymmdd>`
    train_index: str
    test_index: str
    labelmap: str | None  # None for the COCO-format datasets (names come from `categories`)
    metric: str = "accuracy"
    multilabel: bool = False
    full_search_shots: int | None = None  # all shots: search on this many per class (the toolkit: PatchCamelyon)


ELEVATER_DATASETS: Registry[ElevaterSpec] = Registry("ELEVATER dataset")

_SPECS = [
    ElevaterSpec("caltech101", "caltech-101", "caltech_101", "train.txt", "test.txt", "labels.txt", "mean-per-class"),
    ElevaterSpec("cifar10", "cifar-10", "cifar_10", "train.txt", "test.txt", "labels.txt"),
    ElevaterSpec("cifar100", "cifar-100", "cifar100", "train_images.txt", "test_images.txt", "labels.txt"),
    ElevaterSpec("country211", "country211", "country211", "train.txt", "test.txt", "labels.txt"),
    ElevaterSpec("dtd", "dtd", "dtd", "train.txt", "test.txt", "labels.txt"),
    ElevaterSpec("eurosat", "eurosat_clip", "eurosat_clip", "train.txt", "test.txt", "labels.txt"),
    ElevaterSpec("fer2013", "fer-2013", "fer_2013", "train.txt", "test.txt", "labels.txt"),
    ElevaterSpec(
        "fgvc-aircraft",
        "fgvc-aircraft-2013b-variants102",
        "fgvc_aircraft_2013b_variants102",
        "train.txt",
        "test.txt",
        "labels.txt",
        "mean-per-class",
    ),
    ElevaterSpec("food101", "food-101", "food_101", "train.txt", "test.txt", "labels.txt"),
    ElevaterSpec("gtsrb", "gtsrb", "gtsrb", "train.txt", "test.txt", "labelmap.txt"),
    ElevaterSpec(
        "hateful-memes", "hateful-memes", "hateful_memes", "train_meta.json", "test_meta.json", None, "roc_auc"
    ),
    ElevaterSpec("kitti-distance", "kitti-distance", "kitti_distance", "train_meta.json", "test_meta.json", None),
    ElevaterSpec("mnist", "mnist", "mnist", "train.txt", "test.txt", "labels.txt"),
    ElevaterSpec(
        "oxford-flowers",
        "oxford-flower-102",
        "oxford_flower_102",
        "train.txt",
        "test.txt",
        "labels.txt",
        "mean-per-class",
    ),
    ElevaterSpec(
        "oxford-pets", "oxford-iiit-pets", "oxford_iiit_pets", "train.txt", "test.txt", "labels.txt", "mean-per-class"
    ),
    ElevaterSpec(
        "patchcamelyon",
        "patch-camelyon",
        "patch_camelyon",
        "train.txt",
        "test.txt",
        "labels.txt",
        full_search_shots=10_000,  # linear_probe.py: "deal with patch camelyon large dataset"
    ),
    ElevaterSpec("rendered-sst2", "rendered-sst2", "rendered_sst2", "train.txt", "test.txt", "labels.txt"),
    ElevaterSpec("resisc45", "resisc45_clip", "resisc45_clip", "train.json", "test.json", None),
    ElevaterSpec("stanford-cars", "stanford-cars", "stanford_cars", "train.txt", "test.txt", "labels.txt"),
    ElevaterSpec(
        "voc2007",
        "voc-2007-classification",
        "voc2007",
        "train_ic.txt",
        "test_ic.txt",
        "labels.txt",
        "11point_mAP",
        multilabel=True,
    ),
]
for _spec in _SPECS:
    ELEVATER_DATASETS.register(_spec.name)(_spec)


@dataclass
class ElevaterSplit:
    """One split of a dataset: image locations and their labels, in index-file order.

    `labels[i]` is a tuple of class indices (exactly one for a multi-class dataset). A location is
    `<zip>@<member>` or a plain path, relative to `folder`.
    """

    name: str
    folder: Path
    index_file: Path
    classnames: list[str]
    locations: list[str]
    labels: list[tuple[int, ...]]
    multilabel: bool

    def __len__(self) -> int:
        return len(self.locations)


@dataclass(frozen=True)
class DatasetLayout:
    """The files of one dataset on disk, from the definitions file or from the spec's defaults."""

    folder: Path
    train_index: str
    test_index: str
    labelmap: str | None


def load_definitions(path: Path) -> dict[str, dict]:
    """vision_datasets.json (a list of dataset definitions) -> {hub name: definition}."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read dataset definitions {path}: {error}") from error
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
        raise UsageError(f"{path}: expected a JSON list of dataset definitions with a 'name' each")
    return {entry["name"]: entry for entry in entries}


def _dated_folders(parent: Path, prefix: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(prefix)}_\d{{8}}$")
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and pattern.match(p.name))


def candidate_folders(root: Path, spec: ElevaterSpec) -> list[Path]:
    """Where the dataset may be, most specific first: the download layout, then a plain folder per dataset."""
    root = Path(root)
    dated = (
        _dated_folders(root / "classification", spec.folder_prefix)[::-1]
        + _dated_folders(root, spec.folder_prefix)[::-1]
    )  # newest date first
    plain = [
        root / "classification" / spec.folder_prefix,
        root / spec.folder_prefix,
        root / spec.name,
        root / spec.hub_name,
    ]
    return dated + plain


def locate(root: Path, spec: ElevaterSpec, definitions: dict[str, dict] | None = None) -> DatasetLayout | None:
    """The dataset's folder and file names, or None when it is not under `root`."""
    root = Path(root)
    entry = (definitions or {}).get(spec.hub_name)
    if entry is not None and entry.get("root_folder"):
        folder = root / entry["root_folder"]
        try:
            train_index = entry["train"]["index_path"]
            test_index = entry["test"]["index_path"]
        except (KeyError, TypeError) as error:
            raise UsageError(f"definition of {spec.hub_name!r} lacks train/test index_path ({error})") from error
        layout = DatasetLayout(folder, train_index, test_index, entry.get("labelmap"))
        return layout if (folder / test_index).is_file() else None
    for folder in candidate_folders(root, spec):
        if (folder / spec.test_index).is_file():
            return DatasetLayout(folder, spec.train_index, spec.test_index, spec.labelmap)
    return None


def read_labelmap(path: Path) -> list[str]:
    """One class name per line; trailing blank lines are ignored, a blank line inside is an error."""
    if not Path(path).is_file():
        raise UsageError(f"label map {path} does not exist")
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line:
            raise UsageError(f"{path}:{number}: blank line inside the label map (line i names class i-1)")
    if not lines:
        raise UsageError(f"label map {path} is empty")
    return lines


def _parse_labels(text: str, where: str, num_classes: int | None) -> tuple[int, ...]:
    try:
        labels = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise UsageError(f"{where}: label {text!r} is not an integer or a comma-separated list of them") from error
    bad = [label for label in labels if label < 0 or (num_classes is not None and label >= num_classes)]
    if bad:
        limit = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise UsageError(f"{where}: label {bad[0]} is outside {limit} (the label map's line numbers, from 0)")
    return labels


def read_iris_index(path: Path, num_classes: int | None) -> tuple[list[str], list[tuple[int, ...]]]:
    """`location label[,label...]` lines -> (locations, labels). Lines without a label get an empty tuple."""
    locations, labels = [], []
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(" ", 1)  # only the location may contain spaces
        locations.append(parts[0])
        labels.append(_parse_labels(parts[1], f"{path}:{number}", num_classes) if len(parts) == 2 else ())
    return locations, labels


def read_coco_index(path: Path) -> tuple[list[str], list[str], list[tuple[int, ...]]]:
    """A COCO classification json -> (class names in category-id order, locations, labels)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        categories = sorted(data["categories"], key=lambda c: c["id"])
        position = {category["id"]: index for index, category in enumerate(categories)}
        classnames = [str(category["name"]) for category in categories]
        by_image: dict[object, list[int]] = {image["id"]: [] for image in data["images"]}
        for annotation in data.get("annotations", []):
            by_image[annotation["image_id"]].append(position[annotation["category_id"]])
        locations, labels = [], []
        for image in sorted(data["images"], key=lambda image: image["id"]):  # vision-datasets' order
            zip_file = image.get("zip_file")
            locations.append(f"{zip_file}@{image['file_name']}" if zip_file else str(image["file_name"]))
            labels.append(tuple(by_image[image["id"]]))
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"{path} is not a COCO classification file (images, annotations, categories with "
            f"ids): {type(error).__name__}: {error}"
        ) from error
    return classnames, locations, labels


def read_split(layout: DatasetLayout, spec: ElevaterSpec, split: str) -> ElevaterSplit:
    """Read the train or test split; checks labels against the label map and that every zip file exists."""
    index_name = layout.train_index if split == "train" else layout.test_index
    index_file = layout.folder / index_name
    if not index_file.is_file():
        raise UsageError(
            f"{spec.name}: index file {index_file} does not exist (expected beside "
            f"{layout.folder / layout.test_index}; see docs/elevater.md for the layout)"
        )
    if index_name.endswith(".json"):
        classnames, locations, labels = read_coco_index(index_file)
    else:
        classnames = read_labelmap(layout.folder / layout.labelmap) if layout.labelmap else None
        locations, labels = read_iris_index(index_file, len(classnames) if classnames else None)
        if classnames is None:
            log.warning("%s: no label map; classes are named by their numbers", spec.name)
            classnames = [str(i) for i in range(max((max(x) for x in labels if x), default=0) + 1)]
    if not spec.multilabel:
        multiple = [i for i, x in enumerate(labels) if len(x) > 1]
        if multiple:
            raise UsageError(
                f"{index_file}: image {locations[multiple[0]]!r} has labels {labels[multiple[0]]}, "
                f"but {spec.name} is a single-label dataset"
            )
        unlabelled = [i for i, x in enumerate(labels) if not x]
        if unlabelled:
            log.warning(
                "%s: %d image(s) without a label in %s are left out, e.g. %s",
                spec.name,
                len(unlabelled),
                index_file,
                locations[unlabelled[0]],
            )
            keep = [i for i, x in enumerate(labels) if x]
            locations, labels = [locations[i] for i in keep], [labels[i] for i in keep]
    if not locations:
        raise UsageError(f"{index_file} lists no labelled images")
    zips = {location.split("@", 1)[0] for location in locations if "@" in location}
    missing = sorted(z for z in zips if not (layout.folder / z).is_file())
    if missing:
        raise UsageError(
            f"{index_file} points into {layout.folder / missing[0]}, which does not exist "
            "(download the dataset's zip files next to its index files)"
        )
    return ElevaterSplit(spec.name, layout.folder, index_file, classnames, locations, labels, spec.multilabel)


def sample_few_shot(labels: list[tuple[int, ...]], num_classes: int, num_shots: int, seed: int) -> list[int]:
    """Indices of a few-shot training subset, about `num_shots` images per class.

    The procedure of vision-datasets 0.2.x `DatasetManifest.sample_few_shot_subset`, which the ELEVATER toolkit
    calls, with the same random stream, so a seed picks the same images: shuffle the images with
    `random.Random(seed)` and walk them; an image without labels is kept while fewer than `num_shots` such
    images are; a labelled image is skipped when all its classes already have `num_shots` images, else kept
    when its least-seen class has at most `num_shots / 2` or its most-seen at most `1.5 * num_shots`; stop
    once every class has `num_shots`. Single-label: exactly `num_shots` per class. A class with fewer
    training images keeps all it has (a warning names it).
    """
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    counts = [0] * num_classes
    negatives = 0
    chosen = []
    for index in order:
        image_labels = labels[index]
        if not image_labels:
            if negatives < num_shots:
                negatives += 1
                chosen.append(index)
            continue
        seen = [counts[label] for label in image_labels]
        if min(seen) >= num_shots:
            continue
        if min(seen) <= num_shots / 2 or max(seen) <= 1.5 * num_shots:
            chosen.append(index)
            for label in image_labels:
                counts[label] += 1
        if min(counts) >= num_shots:
            break
    short = {label: count for label, count in enumerate(counts) if count < num_shots}
    if short:
        log.warning(
            "%d class(es) have fewer than %d training images; kept all they have (class: images): %s",
            len(short),
            num_shots,
            ", ".join(f"{k}: {v}" for k, v in list(short.items())[:10]),
        )
    return chosen
