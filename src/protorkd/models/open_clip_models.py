"""open_clip models by name and pretrained tag (or local checkpoint), plus the small configs protorkd ships."""

from __future__ import annotations

import os
from pathlib import Path

from protorkd.errors import UsageError


def load_open_clip_model(name: str, tag: str):
    """An open_clip CLIP model on the CPU; an unknown name or tag is a UsageError that lists what exists."""
    import open_clip

    register_open_clip_configs()
    if name not in open_clip.list_models() and not name.startswith("hf-hub:"):
        raise UsageError(f"unknown open_clip model {name!r}; see open_clip.list_models() (e.g. RN50, ViT-B-32)")
    pretrained = tag or None
    try:
        return open_clip.create_model(name, pretrained=pretrained, device="cpu")
    except RuntimeError as error:
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
