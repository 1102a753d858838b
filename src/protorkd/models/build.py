"""Assemble a `DualEncoder` from the model flags."""

from __future__ import annotations

import copy
import logging

from protorkd.errors import UsageError
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.heads import make_head, make_projection_head
from protorkd.models.image_towers import build_image_tower
from protorkd.models.options import ModelOptions
from protorkd.models.text_towers import add_lora, build_text_tower

log = logging.getLogger(__name__)
DEFAULT_JOINT_DIM = 512


def joint_dim(cfg: ModelOptions, image_dim: int, text_dim: int) -> int:
    if cfg.joint_projection_dim > 0:
        return cfg.joint_projection_dim
    if cfg.text_head_n_layers == 0:
        return text_dim
    if cfg.image_head_n_layers == 0:
        return image_dim
    return DEFAULT_JOINT_DIM


def build_dual_encoder(cfg: ModelOptions) -> DualEncoder:
    """Build both towers, their heads and the locks that `cfg` describes."""
    lock_image, lock_text = cfg.locks
    image_tower = build_image_tower(cfg.image_model_builder, cfg.image_model, cfg.image_model_tag, cfg.image_size)
    text_tower = build_text_tower(
        cfg.text_model_builder, cfg.text_model, cfg.text_model_tag, cfg.text_pooler, cfg.max_seq_length
    )
    if cfg.adapter == "lora":
        if lock_text:
            raise UsageError(
                "--adapter lora trains the text tower, which is locked; drop --lock-text-model / --teacher text"
            )
        trainable = add_lora(text_tower, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        log.info("LoRA adapters: %d trainable text-tower parameters", trainable)
    dim = joint_dim(cfg, image_tower.output_dim, text_tower.output_dim)
    try:
        image_head = make_head(image_tower.output_dim, dim, cfg.image_head_n_layers, cfg.head_hidden_dim)
        text_head = make_head(text_tower.output_dim, dim, cfg.text_head_n_layers, cfg.head_hidden_dim)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if cfg.grad_checkpointing:
        for tower in (image_tower, text_tower):
            if not tower.set_grad_checkpointing(True):
                log.warning("%s does not support gradient checkpointing; ignored", tower.name)
    image_projection_head = text_projection_head = None
    if cfg.add_projection_head:  # ProtoCLIP: the image head is a deep copy of the text head (identical init)
        if cfg.projection_n_layers < 0 or cfg.projection_dim < 1 or cfg.projection_hidden_dim < 1:
            raise UsageError(
                "--projection-n-layers must be >= 0 and --projection-dim / --projection-hidden-dim >= 1 "
                f"(got {cfg.projection_n_layers}, {cfg.projection_dim}, {cfg.projection_hidden_dim})"
            )
        text_projection_head = make_projection_head(
            dim, cfg.projection_dim, cfg.projection_hidden_dim, cfg.projection_n_layers
        )
        image_projection_head = copy.deepcopy(text_projection_head)
    model = DualEncoder(
        image_tower,
        text_tower,
        image_head,
        text_head,
        lock_image=lock_image,
        lock_text=lock_text,
        embed_dim=dim,
        image_projection_head=image_projection_head,
        text_projection_head=text_projection_head,
    )
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(
            "nothing to train: both towers are locked and both heads are identity; unlock a tower or add a head "
            "layer (--image-head-n-layers 1)"
        )
    return model
