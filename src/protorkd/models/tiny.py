"""Small architectures for CPU tests and the built-in demo, registered next to the real builders.

`tiny-cnn` (~1.2M parameters): a 4x4 stride-4 patchify stem followed by depthwise-separable blocks,
which trains to high zero-shot accuracy on the demo corpus in a couple of CPU minutes.
`tiny-vit`: a small ViT built from timm's VisionTransformer, for code paths that need a transformer.
`tiny-text`: a hashed word-embedding text tower (no download, no tokenizer files) for fast tests.
"""

from __future__ import annotations

import re
import zlib

import torch
import torch.nn as nn

from protorkd.registry import Registry

CUSTOM_IMAGE_ARCHS: Registry = Registry("custom image architecture")
CUSTOM_TEXT_ARCHS: Registry = Registry("custom text architecture")


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        self.pointwise = nn.Sequential(
            nn.Conv2d(channels, channels * 2, 1), nn.GELU(), nn.Conv2d(channels * 2, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pointwise(self.norm(self.depthwise(x)))


class TinyCNN(nn.Module):
    """Patchify stem (4x4, stride 4) + stages of residual blocks + global average pool -> [B, width]."""

    def __init__(self, widths: tuple[int, ...] = (96, 192, 256), depths: tuple[int, ...] = (2, 2, 2)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=4), nn.BatchNorm2d(widths[0])]
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            if stage > 0:
                layers += [nn.Conv2d(widths[stage - 1], width, 2, stride=2), nn.BatchNorm2d(width)]
            layers += [_Block(width) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.output_dim = widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).mean(dim=(2, 3))


@CUSTOM_IMAGE_ARCHS.register("tiny-cnn")
def tiny_cnn() -> tuple[nn.Module, int]:
    """(module, default image size)."""
    return TinyCNN(), 64


@CUSTOM_IMAGE_ARCHS.register("micro-cnn")
def micro_cnn() -> tuple[nn.Module, int]:
    """A ~30k-parameter variant for unit tests (64-d, like tiny-text)."""
    return TinyCNN(widths=(16, 64), depths=(1, 1)), 32


@CUSTOM_IMAGE_ARCHS.register("tiny-vit")
def tiny_vit() -> tuple[nn.Module, int]:
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=0
    )
    model.output_dim = 128
    return model, 64


class HashedBagOfWords(nn.Module):
    """Text tower: words hashed into `buckets` embeddings, mean-pooled, then a small MLP. [B] str -> [B, dim]."""

    def __init__(self, dim: int = 64, buckets: int = 4096, max_words: int = 32) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(buckets, dim, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(dim, dim))
        self.buckets = buckets
        self.max_words = max_words
        self.output_dim = dim

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), self.max_words, dtype=torch.long)
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z0-9]+", text.lower())[: self.max_words]
            for col, word in enumerate(words):
                ids[row, col] = 1 + zlib.crc32(word.encode()) % (self.buckets - 1)
        return {"input_ids": ids}

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mlp(self.embedding(tokens["input_ids"]))


@CUSTOM_TEXT_ARCHS.register("tiny-text")
def tiny_text() -> nn.Module:
    return HashedBagOfWords()
