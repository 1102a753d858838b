"""open_clip models by name and pretrained tag (or local checkpoint), plus the small configs protorkd ships."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protorkd.errors import UsageError

LOCAL_DIR = "local-dir:"  # open_clip's prefix for a model folder (e.g. a `protorkd export`): config + weights


def load_open_clip_model(name: str, tag: str, image_size: int | None = None):
    """An open_clip CLIP model on the CPU; an unknown name or tag is a UsageError that lists what exists.

    `name` is an open_clip architecture, `hf-hub:ORG/REPO`, or `local-dir:FOLDER` (an open_clip model folder
    such as `protorkd export` writes: its config and weights, `tag` unused). `image_size` builds the image tower
    for that resolution (open_clip's `force_image_size`: a ViT's position embeddings are interpolated to it); a
    tower that cannot be built so is a UsageError naming --image-size."""
    import open_clip

    register_open_clip_configs()
    if name.startswith(LOCAL_DIR):
        folder = Path(name.removeprefix(LOCAL_DIR))
        if not (folder / "open_clip_config.json").is_file():
            raise UsageError(f"{name}: no open_clip_config.json in {folder} (expected a `protorkd export` folder)")
        if tag:
            raise UsageError(f"{name} holds its own weights; drop the tag {tag!r}")
        return open_clip.create_model(name, device="cpu", force_image_size=image_size)
    if name not in open_clip.list_models() and not name.startswith("hf-hub:"):
        raise UsageError(f"unknown open_clip model {name!r}; see open_clip.list_models() (e.g. RN50, ViT-B-32)")
    pretrained = tag or None
    try:
        return open_clip.create_model(name, pretrained=pretrained, device="cpu", force_image_size=image_size)
    except RuntimeError as error:
        if image_size is not None and "size mismatch" in str(error):
            raise UsageError(
                f"--image-size {image_size}: open_clip cannot fit {name}@{pretrained}'s weights to {image_size}x"
                f"{image_size} images (its position embeddings cannot be resized); omit --image-size to use its own "
                "size"
            ) from None
        if pretrained and not os.path.exists(pretrained):
            tags = [t for n, t in open_clip.list_pretrained() if n == name]
            raise UsageError(
                f"open_clip could not load {name}@{pretrained}: {error}. Known tags for {name}: {', '.join(tags)}; "
                "a local checkpoint path also works"
            ) from error
        raise


def register_open_clip_configs() -> None:
    """Make the small configs shipped with protorkd (e.g. protorkd-tiny-clip) known to open_clip."""
    import open_clip

    if "protorkd-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")


@contextlib.contextmanager
def trained_weights_follow() -> Iterator[None]:
    """Silence open_clip's "Model initialized randomly" warning while a model is built only to receive trained
    weights (a checkpoint's), where the warning would be false."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()  # open_clip warns through the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def open_clip_config(name: str) -> dict[str, Any] | None:
    """The open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`, ...) of an architecture name or a
    `local-dir:` folder; None when it cannot be read without a download (`hf-hub:`)."""
    import open_clip

    register_open_clip_configs()
    if name.startswith(LOCAL_DIR):
        config = json.loads((Path(name.removeprefix(LOCAL_DIR)) / "open_clip_config.json").read_text())
        return config["model_cfg"]
    return open_clip.get_model_config(name)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """Only WARNING and up from the root logger inside the block: open_clip logs every step of loading a model
    there at INFO, and torch's ONNX exporter every optimisation pass."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(before, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(before)
