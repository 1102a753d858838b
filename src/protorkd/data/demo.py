"""The built-in demo corpus: procedurally drawn scenes with varied captions, from Python packages alone.

Scenes hold 1-3 shapes of one kind and colour, in two sizes, anywhere on a plain or noisy background.
Captions describe them in varied natural language. Everything is a deterministic function of a seed.
`write_demo_corpus` writes it in exactly the CC3M layout a user must produce for real data:

    ROOT/train.tsv                         filepath<TAB>title, paths relative to ROOT
    ROOT/images/<shard>/<row>.jpg
    ROOT/eval/shapes/{train,test}/<class>/*.jpg   held-out split with class labels (linear probe, zero-shot)
    ROOT/eval/shapes/captions_test.json     COCO-format captions of the test images (retrieval)
    ROOT/eval/shapes_unseen/test/<class>/*.jpg    compositional split: unseen shape-colour pairs
    ROOT/eval/shapes_unseen/captions_test.json    ... captioned with phrasings unseen in training
    ROOT/eval/shapes_skewed/test/<class>/*.jpg    unequal class sizes: seen pairs, Zipf-distributed shapes
    ROOT/eval/shapes_skewed/captions_test.json    ... captioned in training phrasings
    ROOT/eval/zeroshot_metadata.json        {"shapes": {"classes": [...], "templates": [...]}, "shapes_unseen": ...}

Compositional split: one colour per shape is never drawn in training (`HELD_OUT_COLOURS`: each shape and
each colour still appears in training, only the pairing is new), and two caption phrasings
(`UNSEEN_PHRASINGS`) are never used in training. `shapes` is the in-distribution split (seen pairs, seen
phrasings); `shapes_unseen` holds only unseen pairs described only with unseen phrasings, which is where a
student can profit from what a language teacher knows beyond the training captions.

Unbalanced split: `shapes` and `shapes_unseen` hold `eval_per_class` images of every shape, so there top-1
equals mean per-class recall. `shapes_skewed` draws the same distribution as `shapes` (seen pairs, seen
phrasings) with Zipf-distributed class sizes: the shape of rank r in `SKEWED_ORDER` gets
round(2 eval_per_class / r) test images (200, 100, 67, 50, 40, 33, 29, 25 at the default 100; the largest
class is 37 % of the split), so a model that favours a few classes scores a top-1 above its mean
per-class recall. It is drawn from its own random stream, after the other splits: `train.tsv`, `shapes` and
`shapes_unseen` are byte for byte what corpus version 2 wrote without it, and a corpus written before the
split existed gains it in place (`write_demo_corpus` adds what is missing).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from protorkd.io import atomic_folder, atomic_write

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
PLURALS = {"cross": "crosses"}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (110, 110, 110), "dark blue": (20, 25, 70), "brown": (90, 60, 35)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {} shape.", "an image with a {} in it.")
IMAGE_SIZE = 64
SUPERSAMPLE = 2
CORPUS_VERSION = 2
# shape i is never drawn in training in colour (3 i + 1) mod 8: a permutation, so every shape and every colour
# keeps 7 of its 8 pairings in training
HELD_OUT_COLOURS = {shape: list(COLOURS)[(3 * i + 1) % len(COLOURS)] for i, shape in enumerate(SHAPES)}
SEEN, UNSEEN = "seen", "unseen"
SKEWED_SPLIT = "shapes_skewed"
SKEWED_ORDER = SHAPES  # the class of rank r (from 1) holds round(2 eval_per_class / r) images of `shapes_skewed`
SKEWED_SEED_OFFSET = 2_000_003  # its random stream: Random(seed + offset), apart from the other splits'


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    count: int
    size: str  # "small" | "large"
    centres: tuple[tuple[float, float], ...]
    rotation: float
    noise: bool


def sample_scene(rng: random.Random, shape: str | None = None, pairs: str = SEEN) -> Scene:
    """A random scene whose (shape, colour) pair is a training one (`pairs` SEEN) or a held-out one (UNSEEN)."""
    shape = shape or rng.choice(SHAPES)
    count = rng.choice((1, 1, 2, 3))
    size = rng.choice(("small", "large")) if count == 1 else "small"
    radius = 0.15 if size == "small" else 0.28
    centres: list[tuple[float, float]] = []
    for _ in range(200):
        if len(centres) == count:
            break
        x, y = rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)
        if all(math.hypot(x - cx, y - cy) > 2.1 * radius for cx, cy in centres):
            centres.append((x, y))
    held_out = HELD_OUT_COLOURS[shape]
    colour = held_out if pairs == UNSEEN else rng.choice([c for c in COLOURS if c != held_out])
    background = rng.choice([b for b in BACKGROUNDS if not (b == "gray" and colour == "white")])
    return Scene(
        shape, colour, background, len(centres), size, tuple(centres), rng.uniform(-0.3, 0.3), rng.random() < 0.5
    )


def _polygon(cx: float, cy: float, r: float, sides: int, rotation: float, inner: float = 1.0) -> list[tuple]:
    points = []
    steps = sides * (2 if inner != 1.0 else 1)
    for i in range(steps):
        angle = rotation - math.pi / 2 + 2 * math.pi * i / steps
        radius = r if i % 2 == 0 or inner == 1.0 else r * inner
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    size = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    if scene.noise:  # a few faint blobs so backgrounds are not constant
        for _ in range(6):
            x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 14)
            tint = tuple(min(255, c + rng.randint(10, 35)) for c in BACKGROUNDS[scene.background])
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tint)
    colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[scene.colour])
    r = (0.13 if scene.size == "small" else 0.26) * size
    for cx, cy in scene.centres:
        cx, cy = cx * size, cy * size
        rot = scene.rotation
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif scene.shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, int(r * 0.35)))
        elif scene.shape == "square":
            draw.polygon(_polygon(cx, cy, r * 1.25, 4, rot + math.pi / 4), fill=colour)
        elif scene.shape == "diamond":
            draw.polygon(
                [(cx, cy - r * 1.2), (cx + r * 0.75, cy), (cx, cy + r * 1.2), (cx - r * 0.75, cy)], fill=colour
            )
        elif scene.shape == "triangle":
            draw.polygon(_polygon(cx, cy, r * 1.2, 3, rot), fill=colour)
        elif scene.shape == "star":
            draw.polygon(_polygon(cx, cy, r * 1.25, 5, rot, inner=0.45), fill=colour)
        elif scene.shape == "hexagon":
            draw.polygon(_polygon(cx, cy, r * 1.1, 6, rot + math.pi / 6), fill=colour)
        elif scene.shape == "cross":
            w = r * 0.38
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def _position(scene: Scene) -> str:
    x = sum(c[0] for c in scene.centres) / scene.count
    y = sum(c[1] for c in scene.centres) / scene.count
    vertical = "top" if y < 0.38 else "bottom" if y > 0.62 else ""
    horizontal = "left" if x < 0.38 else "right" if x > 0.62 else ""
    if vertical and horizontal:
        return f"in the {vertical} {horizontal} corner"
    if vertical or horizontal:
        return f"on the {vertical or horizontal}" if horizontal else f"at the {vertical}"
    return "in the middle"


def caption_scene(scene: Scene, rng: random.Random, phrasings: str = SEEN) -> str:
    """One caption, in a training phrasing (`phrasings` SEEN) or in one of the two held-out ones (UNSEEN)."""
    noun = scene.shape if scene.count == 1 else PLURALS.get(scene.shape, scene.shape + "s")
    count = COUNT_WORDS[scene.count]
    article = "an" if scene.colour[0] in "aeiou" else "a"
    a_size = "a" if scene.count == 1 else count
    templates = [
        f"{a_size} {scene.size} {scene.colour} {noun} {_position(scene)}",
        f"{count} {scene.colour} {noun} on a {scene.background} background",
        f"a picture of {count} {scene.colour} {noun}",
        f"{scene.colour} {noun} {_position(scene)}, {scene.background} background",
        f"there {'is' if scene.count == 1 else 'are'} {count} {noun} here, coloured {scene.colour}",
        f"{article} {scene.colour} {scene.shape} drawing" if scene.count == 1 else f"several {scene.colour} {noun}",
        f"simple graphic: {count} {scene.size} {noun}, {scene.colour} on {scene.background}",
        f"{noun} ({scene.colour}) {_position(scene)}",
    ]
    if phrasings == UNSEEN:  # never used in training
        templates = [
            f"an illustration showing {count} {scene.colour} {noun} against {scene.background}",
            f"{count} {noun}, each one painted {scene.colour}, placed {_position(scene)}",
        ]
    return rng.choice(templates)


def default_cache_root() -> Path:
    base = os.environ.get("PROTORKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "protorkd")
    return Path(base)


def demo_rows(demo_size: int, dataset_size: int | None) -> int:
    """How many demo rows a run needs: `--demo-size`, or fewer when `--dataset-size` uses fewer."""
    return min(demo_size, dataset_size) if dataset_size else demo_size


def _demo_size_used(demo_size: int, dataset_size: int | None, seed: int) -> int:
    """The size of the demo corpus a run reads: the whole `--demo-size` corpus when it exists, else one of only
    the rows the run uses. Either serves: rows are drawn one after another from one generator and the held-out
    split from another, so N rows are exactly the first N rows of a larger corpus, with the same eval/ folder."""
    if (demo_corpus_dir(demo_size, seed) / "train.tsv").exists():
        return demo_size
    return demo_rows(demo_size, dataset_size)


def demo_corpus_for(demo_size: int, dataset_size: int | None, seed: int) -> Path:
    """The demo corpus folder a run reads, generated now if needed (only as many rows as the run uses)."""
    return ensure_demo_corpus(_demo_size_used(demo_size, dataset_size, seed), seed)


def demo_eval_root(demo_size: int, dataset_size: int | None, seed: int) -> Path:
    """The held-out eval/ folder of a demo run (the one `demo_corpus_for` generates; nothing is generated here)."""
    return demo_corpus_dir(_demo_size_used(demo_size, dataset_size, seed), seed) / "eval"


def demo_corpus_dir(size: int, seed: int, cache_root: Path | None = None) -> Path:
    return (cache_root or default_cache_root()) / f"demo-v{CORPUS_VERSION}-n{size}-seed{seed}"


def write_demo_corpus(
    out: Path, *, size: int = 10240, seed: int = 0, eval_per_class: int = 100, progress: bool = True
) -> Path:
    """Write the demo corpus into `out` (atomically: built in a sibling folder, every file fsynced, then
    renamed). Returns `out`."""
    out = Path(out)
    if (out / "train.tsv").exists():
        add_skewed_split(out / "eval", seed=seed, eval_per_class=eval_per_class)  # corpora written before it existed
        return out
    if out.exists():
        shutil.rmtree(out)  # an incomplete folder from an older version: the rename below needs it gone
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fill_demo_corpus(out, size=size, seed=seed, eval_per_class=eval_per_class, progress=progress)
    except OSError:
        if not (out / "train.tsv").exists():  # not another process (a DDP rank) finishing it first
            raise
    return out


def _fill_demo_corpus(out: Path, *, size: int, seed: int, eval_per_class: int, progress: bool) -> None:
    from tqdm import tqdm

    with atomic_folder(out) as tmp:
        (tmp / "images").mkdir()
        rng = random.Random(seed)
        lines = ["filepath\ttitle\n"]
        bar = tqdm(range(size), desc="demo corpus", disable=None if progress else True, mininterval=1.0)
        for row in bar:  # a bar only on a terminal
            scene = sample_scene(rng)
            relative = f"images/{row // 1000:03d}/{row:06d}.jpg"
            (tmp / relative).parent.mkdir(exist_ok=True)
            draw_scene(scene, rng).save(tmp / relative, quality=92)
            lines.append(f"{relative}\t{caption_scene(scene, rng)}\n")  # plain TSV: captions hold no tab
        (tmp / "train.tsv").write_text("".join(lines), encoding="utf-8")
        _write_heldout(tmp / "eval", random.Random(seed + 1_000_003), eval_per_class)
        _write_skewed(tmp / "eval" / SKEWED_SPLIT, random.Random(seed + SKEWED_SEED_OFFSET), eval_per_class)
        _write_metadata(tmp / "eval")
        _write_readme(tmp)


def _write_readme(root: Path) -> None:
    atomic_write(
        root / "README.txt",
        "ProtoRKD demo corpus (generated by `protorkd demo-data`). train.tsv is the CC3M-style training corpus;\n"
        "eval/ is a downstream data root with the held-out 'shapes' dataset and the compositional\n"
        "'shapes_unseen' dataset (shape-colour pairs and caption phrasings never seen in train.tsv), and\n"
        "'shapes_skewed', seen pairs with unequal class sizes.\n",
    )


def _write_heldout(root: Path, rng: random.Random, per_class: int) -> None:
    """`shapes`: class-labelled train/test folders of training pairs, COCO-format captions of the test images
    in training phrasings. `shapes_unseen`: test folders of held-out pairs, captions in held-out phrasings."""
    for name, pairs, splits in (("shapes", SEEN, ("train", "test")), ("shapes_unseen", UNSEEN, ("test",))):
        sizes = dict.fromkeys(SHAPES, per_class)
        _write_split(root / name, rng, {split: sizes for split in splits}, pairs)


def skewed_sizes(per_class: int) -> dict[str, int]:
    """{shape: test images} of `shapes_skewed`: Zipf's law over `SKEWED_ORDER`, at least one image each."""
    return {shape: max(1, round(2 * per_class / rank)) for rank, shape in enumerate(SKEWED_ORDER, start=1)}


def _write_skewed(folder: Path, rng: random.Random, per_class: int) -> None:
    _write_split(folder, rng, {"test": skewed_sizes(per_class)}, SEEN)


def _write_split(folder: Path, rng: random.Random, sizes: dict[str, dict[str, int]], pairs: str) -> None:
    """Class folders `folder/<split>/<shape>/` of `sizes[split][shape]` scenes each; two captions per test image
    in `folder/captions_test.json` (COCO format), in the phrasings that go with `pairs`."""
    images, annotations = [], []
    for split, per_shape in sizes.items():
        for shape in SHAPES:
            class_folder = folder / split / shape
            class_folder.mkdir(parents=True)
            for i in range(per_shape[shape]):
                scene = sample_scene(rng, shape, pairs)
                file_name = f"{shape}_{i:04d}.jpg"
                draw_scene(scene, rng).save(class_folder / file_name, quality=92)
                if split == "test":
                    image_id = len(images)
                    images.append({"id": image_id, "file_name": f"{shape}/{file_name}"})
                    for _ in range(2):
                        caption = caption_scene(scene, rng, pairs)
                        annotations.append({"id": len(annotations), "image_id": image_id, "caption": caption})
    (folder / "captions_test.json").write_text(json.dumps({"images": images, "annotations": annotations}))


def _write_metadata(root: Path) -> None:
    """ROOT/zeroshot_metadata.json: the class names (label order) and templates of every demo split."""
    entry = {"classes": sorted(SHAPES), "templates": list(ZEROSHOT_TEMPLATES)}  # label order
    metadata = {"shapes": entry, "shapes_unseen": entry, SKEWED_SPLIT: entry}
    atomic_write(root / "zeroshot_metadata.json", json.dumps(metadata, indent=1))


def add_skewed_split(root: Path, *, seed: int, eval_per_class: int) -> None:
    """Add `shapes_skewed` (and its metadata entry) to the eval root of a corpus written before it existed:
    the same bytes a new corpus gets. Ranks that race here build their own copy; the first rename wins."""
    folder = root / SKEWED_SPLIT
    if not root.is_dir() or (folder / "captions_test.json").exists():
        return
    try:
        with atomic_folder(folder) as tmp:
            _write_skewed(tmp, random.Random(seed + SKEWED_SEED_OFFSET), eval_per_class)
    except OSError:
        if not (folder / "captions_test.json").exists():  # not another rank finishing it first
            raise
    _write_metadata(root)
    _write_readme(root.parent)


def ensure_demo_corpus(size: int = 10240, seed: int = 0, cache_root: Path | None = None) -> Path:
    """The cached demo corpus folder, generated on first use."""
    return write_demo_corpus(demo_corpus_dir(size, seed, cache_root), size=size, seed=seed)
