"""The small built-in architectures: shapes and sizes known by hand."""

from __future__ import annotations

import torch

from protorkd.models.tiny import CUSTOM_IMAGE_ARCHS, ResNet9


def test_resnet9_tiny_has_the_hand_counted_parameters_and_pools_to_its_last_width():
    model, size = CUSTOM_IMAGE_ARCHS.get("resnet9-tiny")()
    # 3x3 convs without bias: 3->24, 24->48, residual 2x 48->48, 48->96, 96->192, residual 2x 192->192;
    # BatchNorm weight + bias on every conv's output (24 + 48 + 2*48 + 96 + 192 + 2*192 channels).
    convs = 9 * (3 * 24 + 24 * 48 + 2 * 48 * 48 + 48 * 96 + 96 * 192 + 2 * 192 * 192)
    norms = 2 * (24 + 48 + 2 * 48 + 96 + 192 + 2 * 192)
    assert sum(p.numel() for p in model.parameters()) == convs + norms == 925_080
    assert size == 32 and model.output_dim == 192
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 192)


def test_resnet9_residual_branches_add_to_their_input():
    model = ResNet9(widths=(4, 8, 8, 8)).eval()
    residual = model.features[7]  # after prep (3 layers) and the pooled conv (4 layers)
    x = torch.randn(1, 8, 4, 4)
    assert torch.equal(residual(x), x + residual.body(x))


def test_global_max_pool():
    model = ResNet9(widths=(4, 8, 8, 8)).eval()
    images = torch.randn(3, 3, 16, 16)
    assert torch.equal(model(images), model.features(images).amax(dim=(2, 3)))
