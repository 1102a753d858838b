"""The text tower and head of a dual encoder as an open_clip text config and open_clip's text weights.

* a Hugging Face or sentence-transformers tower -> open_clip's `HFTextEncoder` with the same pooler (mean or
  CLS) and no projection; its config.json and tokenizer files go into the export (open_clip's HFTokenizer
  reads them from the folder). A sentence-transformers pipeline may end with `Normalize`: open_clip's
  encoder does not normalise, so the two agree on normalised features (`encode_text(..., normalize=True)`,
  what every protorkd evaluation uses), and the unnormalised ones differ by that scale only.
* an open_clip text tower -> its own config, a linear head folded into its projection (which then gets a bias:
  `proj_type: linear`, `proj_bias: true`).

A text head on a Hugging Face tower (open_clip's HF projection has no bias), the hashed `tiny-text` tower
and anything else are `NotExpressible`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from protorkd.export.vision import ONNX_INSTEAD, NotExpressible, head_layers, linear_head, model_extras
from protorkd.models.text_towers import (
    MINILM_NAMES,
    HuggingFaceTower,
    OpenCLIPTextTower,
    SentenceTransformerTower,
    TextTower,
)

HF_POOLERS = {"mean": "mean_pooler", "cls": "cls_pooler", "cls_before_pooler": "cls_last_hidden_state_pooler"}
SBERT_POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer.", "ln_final.", "text_projection")


@dataclass
class TextPart:
    """open_clip's `text_cfg`, the text weights (keys of the whole open_clip model), top-level model_cfg keys,
    and a Hugging Face model and tokenizer whose files go into the export folder."""

    text_cfg: dict[str, Any]
    state: dict[str, torch.Tensor]
    model_cfg: dict[str, Any] = field(default_factory=dict)
    hf_files: tuple[Any, Any] | None = None  # (config with save_pretrained, tokenizer with save_pretrained)
    hub_id: str | None = None  # the Hugging Face Hub repository the HF tower's config comes from, if any
    notes: list[str] = field(default_factory=list)  # how the tower is expressed, for the model card


def text_part(tower: TextTower, head: nn.Module, source_cfg: dict[str, Any] | None, *, embed_dim: int) -> TextPart:
    if isinstance(tower, (SentenceTransformerTower, HuggingFaceTower)):
        return _hf_text(tower, head, embed_dim=embed_dim)
    if isinstance(tower, OpenCLIPTextTower) and source_cfg is not None:
        return _open_clip_text(tower, head, source_cfg)
    raise NotExpressible(
        f"the text tower {tower.name} has no open_clip form (its tokenizer is its own); {ONNX_INSTEAD}"
    )


def _sbert_parts(tower: SentenceTransformerTower) -> tuple[nn.Module, Any, str, bool, int]:
    """(the Hugging Face model, its tokenizer, open_clip's pooler name, lower-casing, max length) of an sbert
    pipeline of Transformer -> Pooling (-> Normalize)."""
    from sentence_transformers import models

    modules = list(tower.model)
    kinds = [type(module) for module in modules]
    if kinds not in ([models.Transformer, models.Pooling], [models.Transformer, models.Pooling, models.Normalize]):
        names = " -> ".join(kind.__name__ for kind in kinds)
        raise NotExpressible(f"the sentence-transformers pipeline of {tower.name} ({names}) has no open_clip form "
                             f"(Transformer -> Pooling [-> Normalize] has); {ONNX_INSTEAD}")  # fmt: skip
    transformer, pooling = modules[0], modules[1]
    config = pooling.get_config_dict()
    mode = config.get("pooling_mode") or next(
        (name for name in ("mean", "cls") if config.get(f"pooling_mode_{name}_token{'s' if name == 'mean' else ''}")),
        None,
    )
    if mode not in SBERT_POOLERS:
        raise NotExpressible(f"{tower.name} pools by {mode!r}; open_clip's HF text tower pools by mean or CLS; "
                             f"{ONNX_INSTEAD}")  # fmt: skip
    model = getattr(transformer, "auto_model", None) or transformer.model
    return (
        model,
        transformer.tokenizer,
        SBERT_POOLERS[mode],
        bool(transformer.do_lower_case),
        tower.model.max_seq_length,
    )


def _hf_text(tower: SentenceTransformerTower | HuggingFaceTower, head: nn.Module, *, embed_dim: int) -> TextPart:
    if head_layers(head):
        raise NotExpressible(
            f"the text head on {tower.name} has a bias that open_clip's Hugging Face text projection lacks "
            f"(it is expressible with --text-head-n-layers 0); {ONNX_INSTEAD}"
        )
    if isinstance(tower, SentenceTransformerTower):
        model, tokenizer, pooler, lower, length = _sbert_parts(tower)
    else:
        model, tokenizer, lower, length = tower.model, tower.tokenizer, False, tower.max_seq_length
        pooler = HF_POOLERS[tower.pooler]
    if tokenizer.pad_token_id != model.config.pad_token_id:
        raise NotExpressible(
            f"{tower.name}: open_clip masks the padding by the model config's pad_token_id "
            f"({model.config.pad_token_id}), which is not the tokenizer's ({tokenizer.pad_token_id}); {ONNX_INSTEAD}"
        )
    keep_pooler = pooler == "cls_pooler"  # open_clip builds the HF pooling layer only for its CLS pooler
    state = {
        f"text.transformer.{k}": v.detach().clone()
        for k, v in model.state_dict().items()
        if keep_pooler or not k.startswith("pooler.")
    }
    text_cfg = {
        "hf_model_name": None,  # the export folder's path, filled in by the writer
        "hf_tokenizer_name": hub_id_of(tower) or tower.name.split(":", 1)[1],
        "hf_proj_type": None,
        "hf_pooler_type": pooler,
        "context_length": int(length),
        "tokenizer_kwargs": {"clean": "lower" if lower else "whitespace"},
    }
    notes = [
        f"The text tower {tower.name} is open_clip's Hugging Face text encoder ({pooler}, no projection) over the "
        "same transformer; its config and tokenizer files are in this folder."
    ]
    if len(getattr(tower, "model", [])) == 3 and isinstance(tower, SentenceTransformerTower):
        notes.append(
            "sentence-transformers normalises this tower's output and open_clip's encoder does not: normalised "
            "features (`encode_text(..., normalize=True)`, what every evaluation uses) agree, unnormalised ones "
            "differ by that scale."
        )
    hub_id = hub_id_of(tower)
    return TextPart(text_cfg, state, hf_files=(model.config, tokenizer), hub_id=hub_id, notes=notes)


def hub_id_of(tower: TextTower) -> str | None:
    """The Hub repository a Hugging Face / sentence-transformers tower came from (`all-MiniLM-L6-v2`, also when
    read from its offline copy, is `sentence-transformers/all-MiniLM-L6-v2`), None for a local folder."""
    name = tower.name.split(":", 1)[1]
    if name in MINILM_NAMES:
        return MINILM_NAMES[-1]
    if Path(name).exists():
        return None
    if isinstance(tower, SentenceTransformerTower) and "/" not in name:
        return f"sentence-transformers/{name}"
    return name


def _open_clip_text(tower: OpenCLIPTextTower, head: nn.Module, source_cfg: dict[str, Any]) -> TextPart:
    model = tower.model
    text_cfg = dict(source_cfg["text_cfg"])
    custom = hasattr(model, "text") and model.text is not None
    state = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if (k.startswith("text.") if custom else k.startswith(TEXT_KEYS))
    }
    for key in ("logit_bias",):  # SigLIP-style models: part of the model, kept
        if key in model.state_dict():
            state[key] = model.state_dict()[key].detach().clone()
    linear, notes = linear_head(head, "text", tower.name), []
    if linear is not None:
        prefix = "text.text_projection" if custom else "text_projection"
        _fold_text_projection(state, text_cfg, linear, prefix, tower.name)
        notes.append(f"The linear text head is folded into the text projection of {tower.name} (with a bias).")
    return TextPart(text_cfg, state, model_cfg=model_extras(source_cfg), notes=notes)


def _fold_text_projection(state: dict, text_cfg: dict, linear: nn.Linear, prefix: str, name: str) -> None:
    """z = W t + b after the text projection P: one projection with a bias (open_clip's `proj_bias`)."""
    weight, bias = linear.weight.detach().double(), linear.bias.detach().double()
    if f"{prefix}.weight" in state:  # already a Linear (proj_type linear)
        inner_weight = state.pop(f"{prefix}.weight").double()
        inner_bias = state.pop(f"{prefix}.bias", torch.zeros(inner_weight.shape[0])).double()
    elif prefix in state:  # a [width, D] matrix: x @ P
        inner_weight, inner_bias = state.pop(prefix).double().T, torch.zeros(linear.in_features, dtype=torch.float64)
    else:
        raise NotExpressible(f"a text head on the open_clip tower {name} without a projection; {ONNX_INSTEAD}")
    state[f"{prefix}.weight"] = (weight @ inner_weight).float()
    state[f"{prefix}.bias"] = (weight @ inner_bias + bias).float()
    text_cfg["proj_type"], text_cfg["proj_bias"] = "linear", True
