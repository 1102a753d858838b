"""A trained dual encoder with open_clip's inference interface: what `protorkd.load` returns for a checkpoint.

`encode_image(images, normalize=False)` and `encode_text(tokens, normalize=False)` give the joint-space
features, unnormalised unless asked, as open_clip's `CLIP.encode_image` / `encode_text` do (the
`DualEncoder` itself always normalises, which is what evaluation wants). `tokenizer` turns texts into the
tokens `encode_text` takes: a dict of tensors from the text tower's own tokenizer, where open_clip's
tokenizers give one tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from protorkd.models.dual_encoder import DualEncoder

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature, for a model that never learned one


class TextTokenizer:
    """texts (a string or a list of them) -> the tokens of the text tower (a dict of [B, L] tensors)."""

    def __init__(self, model: DualEncoder) -> None:
        self._model = model

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        return self._model.tokenize([texts] if isinstance(texts, str) else list(texts))


class Encoder(nn.Module):
    """open_clip's `encode_image` / `encode_text` / `logit_scale` over a `DualEncoder`."""

    def __init__(self, model: DualEncoder, *, logit_scale: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.logit_scale = nn.Parameter(
            torch.tensor(CLIP_INIT_LOGIT_SCALE if logit_scale is None else logit_scale), requires_grad=False
        )
        self.tokenizer = TextTokenizer(model)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, 3, H, W] (the `preprocess` output, batched) -> [B, D]."""
        features = self.model.image_joint(self.model.image_backbone(images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: dict[str, torch.Tensor], normalize: bool = False) -> torch.Tensor:
        """tokens from `tokenizer` (on the model's device) -> [B, D]."""
        features = self.model.text_joint(self.model.text_backbone(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, image: torch.Tensor | None = None, text: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(normalised image features, normalised text features, exp(logit_scale)), as open_clip's CLIP."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()
