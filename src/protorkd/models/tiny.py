"""Small architectures for CPU tests and the built-in demo, registered next to the real builders.

`tiny-cnn` (~1.2M parameters): a 4x4 stride-4 patchify stem followed by depthwise-separable blocks,
which trains to high zero-shot accuracy on the demo corpus in a couple of CPU minutes.
`resnet9-tiny` (~0.9M parameters): Page's ResNet-9 at 3/8 width for 32 px photos (the caption-supervised CIFAR-10
speed benchmark).
`tiny-vit`: timm's ViT-Tiny shrunk (`TINY_VIT_ARGS`), for code paths that need a transformer.
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


def _conv_bn(in_channels: int, out_channels: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
    ]
    return [*layers, nn.MaxPool2d(2)] if pool else layers


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(channels, channels, False), *_conv_bn(channels, channels, False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """Page's ResNet-9 (davidcpage/cifar10-fast, the DAWNBench CIFAR-10 network) at a chosen width.

    prep conv(w0) -> conv(w1)+pool, residual(w1) -> conv(w2)+pool -> conv(w3)+pool, residual(w3) -> global max
    pool -> [B, w3]. Each conv: 3x3 without bias, BatchNorm, activation (then the 2x2 max pool), as in Page's
    code, with GELU instead of ReLU. Full width is (64, 128, 256, 512); the default here is 3/8 of it.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (24, 48, 96, 192)) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.features = nn.Sequential(
            *_conv_bn(3, w0, False),
            *_conv_bn(w0, w1, True),
            _Residual(w1),
            *_conv_bn(w1, w2, True),
            *_conv_bn(w2, w3, True),
            _Residual(w3),
        )
        self.output_dim = w3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).amax(dim=(2, 3))


@CUSTOM_IMAGE_ARCHS.register("tiny-cnn")
def tiny_cnn() -> tuple[nn.Module, int]:
    """(module, default image size)."""
    return TinyCNN(), 64


@CUSTOM_IMAGE_ARCHS.register("micro-cnn")
def micro_cnn() -> tuple[nn.Module, int]:
    """A ~30k-parameter variant for unit tests (64-d, like tiny-text)."""
    return TinyCNN(widths=(16, 64), depths=(1, 1)), 32


@CUSTOM_IMAGE_ARCHS.register("resnet9-tiny")
def resnet9_tiny() -> tuple[nn.Module, int]:
    """~0.9M parameters at 32 px (CIFAR-sized photos): the caption-supervised CIFAR-10 benchmark's student."""
    return ResNet9(), 32


# tiny-vit is timm's ViT-Tiny with these arguments: `protorkd export` names it so (open_clip's timm tower)
TINY_VIT_ARCHITECTURE = "vit_tiny_patch16_224"
TINY_VIT_ARGS = {"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}
TIMM_FORMS = {"tiny-vit": (TINY_VIT_ARCHITECTURE, TINY_VIT_ARGS)}  # custom architectures that are timm models


@CUSTOM_IMAGE_ARCHS.register("tiny-vit")
def tiny_vit() -> tuple[nn.Module, int]:
    import timm

    model = timm.create_model(TINY_VIT_ARCHITECTURE, pretrained=False, num_classes=0, **TINY_VIT_ARGS)
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
