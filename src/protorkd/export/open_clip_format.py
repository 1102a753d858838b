"""`protorkd export --format open_clip`: a folder in open_clip's own hub layout, loadable without protorkd.

    DIR/open_clip_config.json        {"model_cfg": {...}, "preprocess_cfg": {...}}
    DIR/open_clip_model.safetensors  the weights under open_clip's names (safetensors only, never a pickle)
    DIR/config.json, tokenizer*, vocab.txt, ...   a Hugging Face / sentence-transformers text tower's files
    DIR/timm/config.json             a timm configuration timm's registry does not hold (the tiny towers)
    DIR/README.md                    the model card

`open_clip.create_model_and_transforms("local-dir:DIR")` and `open_clip.get_tokenizer("local-dir:DIR")` load
it. open_clip resolves a Hugging Face config name and timm's `local-dir:` names against the working directory,
not the folder, so the config names the folder's own files by its absolute path: a moved folder is re-exported
(`protorkd export OLD --out NEW`). Before the folder appears under its name, the export loads itself with
open_clip and checks that both encoders reproduce the model (`check_export`), else it is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protorkd.errors import UsageError
from protorkd.export.model_card import CardFacts, checked_note, render_card
from protorkd.export.text import TextPart, text_part
from protorkd.export.vision import (
    ONNX_INSTEAD,
    TIMM_FOLDER,
    NotExpressible,
    VisionPart,
    custom_vision,
    open_clip_vision,
)
from protorkd.io import atomic_folder
from protorkd.loading import OPEN_CLIP_CONFIG
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.encoder import CLIP_INIT_LOGIT_SCALE
from protorkd.models.open_clip_models import LOCAL_DIR, open_clip_config, quiet_root_logger
from protorkd.models.options import ModelOptions

WEIGHTS = "open_clip_model.safetensors"
TOLERANCE = 1e-5  # fp32: the largest difference of normalised features the export may show
PROBE_TEXTS = ["a photo of a cat.", "two red squares on a blue background", "A B C, 1 2 3!"]


@dataclass
class OpenCLIPModel:
    """What the export writes: open_clip's model and preprocessing configs, weights and the parts' files."""

    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    state: dict[str, torch.Tensor]
    vision: VisionPart
    text: TextPart


def open_clip_form(model: DualEncoder, options: ModelOptions, *, logit_scale: float | None) -> OpenCLIPModel:
    """The model as open_clip's config and weights, or NotExpressible naming the tower and the format to use."""
    embed_dim = model.embed_dim
    if options.image_model_builder == "open_clip":
        vision = open_clip_vision(
            model.image_tower, model.image_head, _source_config(options.image_model), embed_dim=embed_dim
        )
    elif options.image_model_builder in ("custom", "timm"):
        vision = custom_vision(model.image_tower, model.image_head, embed_dim=embed_dim)
    else:
        raise NotExpressible(f"the image tower {model.image_tower.name} has no open_clip form; {ONNX_INSTEAD}")
    text_source = _source_config(options.text_model) if options.text_model_builder == "open_clip" else None
    text = text_part(model.text_tower, model.text_head, text_source, embed_dim=embed_dim)
    clashes = {k for k in set(vision.model_cfg) & set(text.model_cfg) if vision.model_cfg[k] != text.model_cfg[k]}
    if clashes:
        raise NotExpressible(f"the two open_clip towers disagree on {', '.join(sorted(clashes))}; {ONNX_INSTEAD}")
    model_cfg = {**vision.model_cfg, **text.model_cfg, "embed_dim": embed_dim}
    model_cfg.update(vision_cfg=vision.vision_cfg, text_cfg=text.text_cfg)
    scale = CLIP_INIT_LOGIT_SCALE if logit_scale is None else logit_scale
    shape = [1] if model_cfg.get("nonscalar_logit_scale") else []
    state = {**vision.state, **text.state, "logit_scale": torch.full(shape, float(scale))}
    preprocess = model.image_preprocess
    if preprocess.interpolation not in ("bicubic", "bilinear"):
        raise NotExpressible(f"open_clip resizes by bicubic or bilinear, not {preprocess.interpolation}; "
                             f"{ONNX_INSTEAD}")  # fmt: skip
    preprocess_cfg = {
        "size": preprocess.image_size,
        "mode": "RGB",
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "interpolation": preprocess.interpolation,
        "resize_mode": "shortest",
        "fill_color": 0,
    }
    return OpenCLIPModel(model_cfg, preprocess_cfg, state, vision, text)


def _source_config(name: str) -> dict[str, Any]:
    config = open_clip_config(name)
    if config is None:
        raise NotExpressible(f"the open_clip config of {name} cannot be read offline; {ONNX_INSTEAD}")
    return json.loads(json.dumps(config))  # a deep copy


def config_for(form: OpenCLIPModel, folder: Path, hub_id: str | None = None) -> dict[str, Any]:
    """open_clip_config.json for the export at `folder`: the folder's own files named by its absolute path, or,
    for a Hugging Face Hub repository `hub_id`, by Hub names (`hub_layout`)."""
    model_cfg = json.loads(json.dumps(form.model_cfg))
    folder = folder.resolve()
    if form.vision.files:
        model_cfg["vision_cfg"]["timm_model_name"] = (
            f"hf-hub:{hub_id}" if hub_id else f"{LOCAL_DIR}{folder / TIMM_FOLDER}"
        )
    if form.text.hf_files is not None:
        if hub_id:
            model_cfg["text_cfg"]["hf_model_name"] = model_cfg["text_cfg"]["hf_tokenizer_name"] = form.text.hub_id
        else:
            model_cfg["text_cfg"]["hf_model_name"] = str(folder)
    return {"model_cfg": model_cfg, "preprocess_cfg": form.preprocess_cfg}


def check_hub_layout(form: OpenCLIPModel, hub_id: str) -> None:
    """Refuse (one line) a model whose Hub layout would need two root config.json files."""
    if form.text.hf_files is not None and form.text.hub_id is None:
        raise UsageError(
            f"--hub-id {hub_id}: the text tower's Hugging Face config comes from a local folder, which a Hub "
            "repository cannot name; publish that model on the Hub first, or share the folder without --hub-id"
        )


def hub_layout(form: OpenCLIPModel, folder: Path, hub_id: str) -> None:
    """Turn a checked export folder into the layout of the Hub repository `hub_id`: timm reads a configuration
    from the repository's root config.json (`hf-hub:` names hold no subfolder), and the Hugging Face text tower's
    config and tokenizer come from the repository it was downloaded from."""
    if form.vision.files:
        (folder / TIMM_FOLDER / "config.json").replace(folder / "config.json")
        (folder / TIMM_FOLDER).rmdir()
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config_for(form, folder, hub_id), indent=2) + "\n")


def write_files(form: OpenCLIPModel, folder: Path) -> None:
    """Every file of the export but the model card into `folder` (the config pointing at `folder`)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in form.state.items()}  # fmt: skip
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt", "producer": "protorkd export"})
    umask = os.umask(0)  # safetensors creates its file 0600 whatever the umask: as readable as the export's others
    os.umask(umask)
    os.chmod(folder / WEIGHTS, 0o666 & ~umask)
    if form.text.hf_files is not None:
        config, tokenizer = form.text.hf_files
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    for name, text in form.vision.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config_for(form, folder), indent=2) + "\n")


@torch.no_grad()
def check_export(model: DualEncoder, folder: Path, *, tolerance: float = TOLERANCE) -> dict[str, float]:
    """Load `folder` with open_clip and compare its normalised features with `model`'s on probe inputs: random
    images and a few texts. Returns the largest differences; raises UsageError above `tolerance`."""
    import open_clip

    name = f"{LOCAL_DIR}{folder}"
    with quiet_root_logger():
        loaded = open_clip.create_model(name, device="cpu").eval()
        tokenizer = open_clip.get_tokenizer(name)
    size = model.image_preprocess.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    ours_image = model.encode_image(images)
    ours_text = model.encode_texts(PROBE_TEXTS)
    differences = {
        "image": float((loaded.encode_image(images, normalize=True) - ours_image).abs().max()),
        "text": float((loaded.encode_text(tokenizer(PROBE_TEXTS), normalize=True) - ours_text).abs().max()),
    }
    worst = max(differences, key=differences.get)
    if differences[worst] > tolerance:
        raise UsageError(
            f"open_clip's reading of the export gives {worst} features {differences[worst]:.2g} away from the "
            f"model's (more than {tolerance}); {ONNX_INSTEAD}"
        )
    return differences


def write_open_clip(
    model: DualEncoder,
    options: ModelOptions,
    out: Path,
    *,
    logit_scale: float | None,
    facts: CardFacts,
    hub_id: str | None = None,
) -> dict[str, float]:
    """Write the open_clip export of `model` to `out` (a new or empty folder), checked, with its model card;
    with `hub_id` (`USER/REPO`) laid out for that Hugging Face Hub repository (`hub_layout`). Returns the
    check's largest feature differences."""
    model = model.float().eval()
    form = open_clip_form(model, options, logit_scale=logit_scale)
    if hub_id:
        check_hub_layout(form, hub_id)
    out = Path(out).resolve()
    with atomic_folder(out) as tmp:
        write_files(form, tmp)
        differences = check_export(model, tmp)  # read from the folder itself, before any Hub names
        where = hub_note(form, hub_id) if hub_id else PATHS_NOTE
        notes = [*form.vision.notes, *form.text.notes, where, checked_note(differences, "open_clip")]
        card = render_card(dataclasses.replace(facts, notes=[*facts.notes, *notes]), export_format="open_clip")
        (tmp / "README.md").write_text(card if not hub_id else card.replace("local-dir:PATH/TO/THIS/FOLDER",
                                                                            f"hf-hub:{hub_id}"))  # fmt: skip
        if hub_id:
            hub_layout(form, tmp, hub_id)
        else:
            (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(config_for(form, out), indent=2) + "\n")
    return differences


def hub_note(form: OpenCLIPModel, hub_id: str) -> str:
    source = (
        f" The text tower's Hugging Face config and tokenizer come from {form.text.hub_id}." if form.text.hub_id else ""
    )
    return (
        f"This folder is laid out for the Hugging Face Hub repository {hub_id}: once uploaded there, "
        f"`open_clip.create_model_and_transforms('hf-hub:{hub_id}')` loads it.{source}"
    )


PATHS_NOTE = (
    "open_clip reads a Hugging Face text tower's config and a timm configuration by name, resolved against the "
    "working directory, so `open_clip_config.json` names this folder's own files by its absolute path: after "
    "moving the folder, write it again with `protorkd export OLD_FOLDER --out NEW_FOLDER`."
)


def relocate_open_clip(source: Path, out: Path) -> None:
    """Copy an open_clip export folder to `out`, its config's paths into the source folder rewritten to `out`."""
    source, out = Path(source).resolve(), Path(out).resolve()
    config_text = (source / OPEN_CLIP_CONFIG).read_text()
    with atomic_folder(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        (tmp / OPEN_CLIP_CONFIG).write_text(
            config_text.replace(json.dumps(str(source))[1:-1], json.dumps(str(out))[1:-1])
        )


def refuse_existing(out: Path) -> None:
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise UsageError(f"--out {out} exists and is not empty; choose a new folder")
