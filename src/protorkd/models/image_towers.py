"""Image towers: open_clip, timm and torchvision models (classifier removed) and the custom small ones.

Every builder returns an `ImageTower`: a module mapping images [B, 3, H, W] to features [B, D], which
also carries the preprocessing its weights expect (resolution, mean, std).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from protorkd.errors import UsageError
from protorkd.models.open_clip_models import load_open_clip_model, open_clip_config
from protorkd.models.tiny import CUSTOM_IMAGE_ARCHS, TIMM_FORMS
from protorkd.registry import Registry

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TimmForm:
    """How timm builds a backbone: a registered architecture and the arguments it was created with."""

    architecture: str
    model_args: dict


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"


class ImageTower(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        output_dim: int,
        preprocess: Preprocess,
        name: str,
        timm_form: TimmForm | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.output_dim = output_dim
        self.preprocess = preprocess
        self.name = name
        self.timm_form = timm_form  # set when the backbone is a timm model (what `protorkd export` writes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """Turn on gradient checkpointing if the backbone supports it; returns whether it did."""
        for method in ("set_grad_checkpointing", "gradient_checkpointing_enable"):
            if hasattr(self.backbone, method):
                getattr(self.backbone, method)(enable)
                return True
        return False


IMAGE_BUILDERS: Registry = Registry("image model builder")


@IMAGE_BUILDERS.register("open_clip")
def build_open_clip_image(name: str, tag: str, image_size: int | None) -> ImageTower:
    model = load_open_clip_model(name, tag, image_size)
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    preprocess = Preprocess(
        image_size or size,
        tuple(cfg.get("mean", OPENAI_MEAN)),
        tuple(cfg.get("std", OPENAI_STD)),
        cfg.get("interpolation", "bicubic"),
    )
    return ImageTower(visual, _output_dim(visual, name), preprocess, f"open_clip:{name}")


def _output_dim(visual: nn.Module, name: str) -> int:
    """An open_clip visual's output width: its `output_dim`, else (open_clip's timm towers have none) the
    model's joint width from its config."""
    if getattr(visual, "output_dim", None):
        return int(visual.output_dim)
    config = open_clip_config(name)
    if config is None:
        raise UsageError(f"cannot tell the output width of the open_clip image tower {name}")
    return int(config["embed_dim"])


@IMAGE_BUILDERS.register("timm")
def build_timm_image(name: str, tag: str, image_size: int | None) -> ImageTower:
    import timm

    if not timm.list_models(name) and not name.startswith("hf-hub:"):
        raise UsageError(f"unknown timm model {name!r}; see timm.list_models() (e.g. resnet50, vit_small_patch16_224)")
    kwargs: dict = {"num_classes": 0}
    if tag and tag != "pretrained":
        if not os.path.exists(tag):
            raise UsageError(f"--image-model-tag {tag!r}: no such checkpoint file (use 'pretrained' for hub weights)")
        kwargs["pretrained_cfg_overlay"] = {"file": tag}
    if image_size:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=bool(tag), **kwargs)
    except TypeError:
        kwargs.pop("img_size", None)  # convolutional nets take any size
        model = timm.create_model(name, pretrained=bool(tag), **kwargs)
    config = timm.data.resolve_data_config({}, model=model)
    preprocess = Preprocess(
        image_size or config["input_size"][-1], tuple(config["mean"]), tuple(config["std"]), config["interpolation"]
    )
    form = TimmForm(name, {k: v for k, v in kwargs.items() if k == "img_size"})
    return ImageTower(model, model.num_features, preprocess, f"timm:{name}", form)


@IMAGE_BUILDERS.register("torchvision")
def build_torchvision_image(name: str, tag: str, image_size: int | None) -> ImageTower:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise UsageError(f"unknown torchvision model {name!r}; valid names include: {', '.join(names[:12])}, ...")
    weights = None
    if tag and not os.path.exists(tag):
        weights = tag
    model = torchvision.models.get_model(name, weights=weights)
    if tag and os.path.exists(tag):
        model.load_state_dict(torch.load(tag, map_location="cpu", weights_only=True))
    _remove_classifier(model)
    size = image_size or 224
    with torch.no_grad():
        was_training = model.training
        model.eval()
        output_dim = model(torch.zeros(1, 3, size, size)).flatten(1).shape[1]
        model.train(was_training)
    return ImageTower(
        nn.Sequential(model, nn.Flatten(1)),
        output_dim,
        Preprocess(size, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        f"torchvision:{name}",
    )


def _remove_classifier(model: nn.Module) -> None:
    """Replace the final classification layer (fc / classifier / heads) of a torchvision model by identity."""
    for attribute in ("fc", "classifier", "heads", "head"):
        if hasattr(model, attribute):
            setattr(model, attribute, nn.Identity())
            return
    raise UsageError(f"cannot find the classifier of torchvision model {type(model).__name__} to remove")


@IMAGE_BUILDERS.register("custom")
def build_custom_image(name: str, tag: str, image_size: int | None) -> ImageTower:
    model, default_size = CUSTOM_IMAGE_ARCHS.get(name)()
    if tag:
        model.load_state_dict(torch.load(tag, map_location="cpu", weights_only=True))
    preprocess = Preprocess(image_size or default_size, OPENAI_MEAN, OPENAI_STD, "bilinear")
    form = TimmForm(*TIMM_FORMS[name]) if name in TIMM_FORMS else None
    return ImageTower(model, model.output_dim, preprocess, f"custom:{name}", form)


def build_image_tower(builder: str, name: str, tag: str = "", image_size: int | None = None) -> ImageTower:
    return IMAGE_BUILDERS.get(builder)(name, tag, image_size)
