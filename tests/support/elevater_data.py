"""Writers of tiny ELEVATER datasets in the published on-disk format (shared by the tests and conftest).

Images are 32x32 PNGs of one colour per class (plus noise), stored in zip files and listed by index files
exactly as the vision-datasets download lays them out (docs/elevater.md).
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [
    (220, 30, 30),
    (30, 200, 30),
    (30, 30, 220),
    (220, 220, 30),
    (220, 30, 220),
    (30, 220, 220),
    (250, 250, 250),
    (10, 10, 10),
    (250, 140, 30),
    (120, 60, 20),
]


def png_bytes(colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_of(labels: tuple[int, ...]) -> tuple[int, int, int]:
    """One colour per class; a multi-label image gets the mean colour of its classes, an unlabelled one grey."""
    if not labels:
        return (128, 128, 128)
    return tuple(int(np.mean([COLOURS[label][k] for label in labels])) for k in range(3))


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def write_iris_dataset(
    folder: Path,
    classnames: list[str],
    splits: dict[str, tuple[str, str, list[tuple[int, ...]]]],
    member_dir: str = "{split} images",
) -> Path:
    """splits: {split: (index file name, zip name, labels per image)}; writes labels.txt, index files, zips.

    Members are `<member_dir>/NNN.png`; the default has a space, as some real sets have (an unlabelled image
    must then not have one: its line would end in the path, whose last word would read as the label)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("\n".join(classnames) + "\n")
    for split, (index_name, zip_name, labels) in splits.items():
        members, lines = {}, []
        for i, image_labels in enumerate(labels):
            member = f"{member_dir.format(split=split)}/{i:03d}.png"
            members[member] = png_bytes(colour_of(image_labels), seed=zlib.crc32(f"{folder.name}{split}{i}".encode()))
            lines.append(f"{zip_name}@{member} {','.join(str(x) for x in image_labels)}")
        write_zip(folder / zip_name, members)
        (folder / index_name).write_text("\n".join(lines) + "\n")
    return folder


def write_coco_dataset(folder: Path, categories: dict[int, str], splits: dict[str, list[int]]) -> Path:
    """splits: {index json name: category id per image}; images in img.zip (the hateful-memes layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = sorted(categories)
    members = {}
    for index_name, image_categories in splits.items():
        images, annotations = [], []
        for i, category in enumerate(image_categories):
            name = f"img/{index_name[:-5]}_{i:03d}.png"
            members[name] = png_bytes(COLOURS[ids.index(category)], seed=zlib.crc32(f"{index_name}{i}".encode()))
            images.append({"id": i + 1, "file_name": name, "zip_file": "img.zip", "width": 32, "height": 32})
            annotations.append({"id": i + 1, "image_id": i + 1, "category_id": category})
        data = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k, "name": v} for k, v in categories.items()],
        }
        (folder / index_name).write_text(json.dumps(data))
    write_zip(folder / "img.zip", members)
    return folder


def balanced(n_classes: int, per_class: int) -> list[tuple[int, ...]]:
    return [(c,) for c in range(n_classes) for _ in range(per_class)]
