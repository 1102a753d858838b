"""Embed a folder of images, a corpus TSV or a file of texts with a trained model: `protorkd embed`.

Inputs are read the way training reads its corpus (`data.tsv.CsvCorpus`): an image that is missing, corrupt,
over the pixel limit, or a row that cannot be parsed, or an empty text, is skipped and counted
(`BadSampleCounter`, named by file, row and line), and more than `max_bad_fraction` of them stops the run.
Every embedding row has an id in a parallel list: the image's path relative to the folder, the TSV row
number, or the text file's line number (1-based, as protorkd's messages name them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from protorkd.data.images import DEFAULT_MAX_PIXELS, to_rgb
from protorkd.data.tsv import BadSampleCounter, CsvCorpus, collate, read_corpus_table
from protorkd.errors import UsageError
from protorkd.precision import Precision

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Inputs:
    """What to embed: image paths or texts, their ids, and the rows a reader already found unusable."""

    kind: str  # "image" or "text"
    items: list[str]  # image paths, or texts
    ids: list[str]
    source: str
    problems: dict[int, str] = field(default_factory=dict)
    lines: list[int] | None = None


def image_folder(folder: Path) -> Inputs:
    """Every image file under `folder` (by suffix, recursively, sorted); ids are paths relative to it."""
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UsageError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return Inputs("image", [str(p) for p in paths], [p.relative_to(folder).as_posix() for p in paths], str(folder))


def corpus_column(path: Path, kind: str, *, img_key: str, caption_key: str, separator: str, flag: str) -> Inputs:
    """The image paths or the captions of a corpus TSV (read as training reads it); ids are row numbers."""
    table = read_corpus_table(path, img_key, caption_key, separator, flag=flag)
    items = table.images if kind == "image" else table.captions
    ids = [str(row + 1) for row in range(len(items))]
    return Inputs(kind, items, ids, str(path), dict(table.problems), table.lines)


def text_lines(path: Path) -> Inputs:
    """One text per line of a UTF-8 file (blank lines are empty texts, skipped and counted); ids are line numbers."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--texts {path}: no such file")
    try:
        texts = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UsageError(f"--texts {path}: not UTF-8 ({error.reason} at byte {error.start})") from None
    numbers = list(range(1, len(texts) + 1))
    return Inputs("text", [t.strip() for t in texts], [str(n) for n in numbers], str(path), lines=numbers)


class _AsRGB:
    """8-bit RGB first (16-bit and float images scaled as training scales them), then the model's transform."""

    def __init__(self, preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Any) -> torch.Tensor:
        return self.preprocess(to_rgb(image))


@dataclass
class Embeddings:
    features: np.ndarray  # [N, D] float32, one row per readable input
    ids: list[str]  # parallel to the rows
    bad: BadSampleCounter  # the skipped inputs, with reasons


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    inputs: Inputs,
    *,
    preprocess: Callable[[Any], torch.Tensor] | None = None,
    tokenizer: Callable[[list[str]], Any] | None = None,
    device: torch.device | str = "cpu",
    precision: Precision = Precision.FP32,
    batch_size: int = 256,
    workers: int = 0,
    normalize: bool = True,
    max_bad_fraction: float = 0.01,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Embeddings:
    """`model.encode_image` / `encode_text(..., normalize)` of every readable input, batched, in `precision`.

    `model` has open_clip's interface (`protorkd.load` gives one, with its `preprocess` and `tokenizer`).
    Raises BadDataError when more than `max_bad_fraction` of the inputs cannot be read."""
    device = torch.device(device)
    images = inputs.kind == "image"
    corpus = CsvCorpus(
        inputs.items if images else [""] * len(inputs.items),
        inputs.ids if images else inputs.items,  # CsvCorpus skips an empty caption: only empty texts are
        _AsRGB(preprocess) if images else None,
        load_images=images,
        source=inputs.source,
        problems=inputs.problems,
        lines=inputs.lines,
        max_pixels=max_pixels,
    )
    loader = DataLoader(corpus, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    bad = BadSampleCounter(max_bad_fraction, corpus.describe)
    weights = precision.weights_dtype
    model = model.to(device, weights).eval()
    rows, kept = [], []
    for batch in tqdm(loader, desc=f"embedding {inputs.kind}s", disable=None, leave=False):
        bad.update(len(batch["indices"]) + len(batch["bad"]), batch["bad"])
        if not len(batch["indices"]):
            continue
        with precision.autocast(device):
            if images:
                features = model.encode_image(batch["images"].to(device, weights), normalize=normalize)
            else:
                tokens = tokenizer(batch["captions"])
                tokens = {k: v.to(device) for k, v in tokens.items()} if isinstance(tokens, dict) else tokens.to(device)
                features = model.encode_text(tokens, normalize=normalize)
        rows.append(features.float().cpu())
        kept += batch["indices"].tolist()
    bad.check()
    width = rows[0].shape[1] if rows else 0
    features = torch.cat(rows).numpy() if rows else np.zeros((0, width), np.float32)
    return Embeddings(features, [inputs.ids[i] for i in kept], bad)
