"""The assembled dual encoder: image tower + text tower + projection heads into a joint space."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from protorkd.models.features import Features
from protorkd.models.image_towers import ImageTower
from protorkd.models.text_towers import TextTower


class DualEncoder(nn.Module):
    """`encode_image` / `encode_text` return L2-normalised joint features [B, D]; evaluation uses only these.

    A locked tower is frozen (requires_grad False), stays in eval mode whatever `train()` is called
    with, and runs under `torch.no_grad()`. Heads stay trainable (they sit on top of a locked teacher's
    features, which the training loop may read from a cache instead of running the tower).

    Optional ProtoCLIP projection heads (`image_projection_head`, `text_projection_head`, built by
    `--add-projection-head`) map the *unnormalised* joint features to a separate space where the
    prototypes live (`Features.image_proto` / `text_proto` of `forward`); as in ProtoCLIP,
    they never reach `encode_image` / `encode_text`, so no evaluation ever sees them.
    """

    def __init__(
        self,
        image_tower: ImageTower,
        text_tower: TextTower,
        image_head: nn.Module,
        text_head: nn.Module,
        *,
        lock_image: bool = False,
        lock_text: bool = False,
        embed_dim: int,
        image_projection_head: nn.Module | None = None,
        text_projection_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_head = image_head
        self.text_head = text_head
        self.image_projection_head = image_projection_head
        self.text_projection_head = text_projection_head
        self.lock_image = lock_image
        self.lock_text = lock_text
        self.embed_dim = embed_dim
        for tower, locked in ((image_tower, lock_image), (text_tower, lock_text)):
            if locked:
                tower.requires_grad_(False)
                tower.eval()

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        if self.lock_image:
            self.image_tower.eval()
        if self.lock_text:
            self.text_tower.eval()
        return self

    def forward(
        self,
        images: torch.Tensor | None = None,
        tokens: dict[str, torch.Tensor] | None = None,
        *,
        image_backbone_features: torch.Tensor | None = None,
        text_backbone_features: torch.Tensor | None = None,
        images_view2: torch.Tensor | None = None,
        text_views: int = 1,
    ) -> Features:
        """One training forward (so DistributedDataParallel sees every trainable parameter's use).

        Each side comes from raw inputs (`images` / `tokens`) or from cached backbone features of a locked
        teacher. Returns the normalised joint features and the same before normalisation, plus a second augmented
        view (`images_view2`), a second pass of a trainable text tower with other dropout (`text_views` 2), and
        with projection heads ProtoCLIP's prototype-space features (`Features`).
        """
        image_joint = text_joint = text_dropout = None
        if image_backbone_features is not None:
            image_joint = self.image_joint(image_backbone_features)
        elif images is not None:
            image_joint = self.image_joint(self.image_backbone(images))
        if text_backbone_features is not None:
            text_joint = self.text_joint(text_backbone_features)
        elif tokens is not None:
            text_joint = self.text_joint(self.text_backbone(tokens))
            if text_views == 2:
                text_dropout = self.encode_text(tokens)
        image, image_proto = self._joint_and_proto(image_joint, self.image_projection_head)
        text, text_proto = self._joint_and_proto(text_joint, self.text_projection_head)
        image_view2 = self.encode_image(images_view2) if images_view2 is not None else None
        return Features(image, text, image_view2, text_dropout, image_proto, text_proto, image_joint, text_joint)

    @staticmethod
    def _joint_and_proto(
        joint: torch.Tensor | None, head: nn.Module | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(normalised joint features, normalised projection-head features or None) of unnormalised `joint`."""
        if joint is None:
            return None, None
        normalized = F.normalize(joint, dim=-1)
        proto = F.normalize(head(joint.to(_head_dtype(head))), dim=-1) if head is not None else None
        return normalized, proto

    # --- backbones (tower features before the heads) -------------------------------------------
    def image_backbone(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D_image]"""
        with torch.no_grad() if self.lock_image else contextlib.nullcontext():
            return self.image_tower(images)

    def text_backbone(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """tokens from `tokenize` -> [B, D_text]"""
        with torch.no_grad() if self.lock_text else contextlib.nullcontext():
            return self.text_tower(tokens)

    # --- joint space ------------------------------------------------------------------------------
    def image_joint(self, image_backbone_features: torch.Tensor) -> torch.Tensor:
        """[B, D_image] -> unnormalised joint features [B, D] (the input of ProtoCLIP's projection head)."""
        return self.image_head(_as_head_input(image_backbone_features, self.image_head))

    def text_joint(self, text_backbone_features: torch.Tensor) -> torch.Tensor:
        return self.text_head(_as_head_input(text_backbone_features, self.text_head))

    def project_image(self, image_backbone_features: torch.Tensor) -> torch.Tensor:
        """[B, D_image] -> normalised [B, D] (used with cached teacher features too)."""
        return F.normalize(self.image_joint(image_backbone_features), dim=-1)

    def project_text(self, text_backbone_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_joint(text_backbone_features), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.image_backbone(images))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.project_text(self.text_backbone(tokens))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.text_tower.tokenize(texts)

    def encode_texts(self, texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """Convenience for evaluation: tokenize, move to `device`, encode. [N] str -> [N, D]"""
        tokens = {key: value.to(device) for key, value in self.tokenize(texts).items()}
        return self.encode_text(tokens)

    @property
    def image_preprocess(self):
        return self.image_tower.preprocess


def _head_dtype(head: nn.Module) -> torch.dtype:
    weight = next(head.parameters(), None)
    return weight.dtype if weight is not None else torch.float32


def _as_head_input(features: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Features in the head's dtype (fp32 weights, or bf16 under --precision bf16); fp32 for an identity head.
    Cached teacher features arrive as fp16 and towers under autocast may return half precision."""
    return features.to(_head_dtype(head))
