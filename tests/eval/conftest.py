"""Tiny models and hand-made data for the evaluation tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model():
    """A ~20k-parameter CNN + hashed bag-of-words dual encoder (no download)."""
    from protorkd.config import ModelConfig
    from protorkd.models.build import build_dual_encoder

    torch.manual_seed(0)
    config = ModelConfig(
        image_model_builder="custom",
        image_model="micro-cnn",
        text_model_builder="custom",
        text_model="tiny-text",
        teacher="none",
    )
    return build_dual_encoder(config).eval()
