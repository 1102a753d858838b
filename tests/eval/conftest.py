"""Tiny models and hand-made data for the evaluation tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model():
    """A ~20k-parameter CNN + hashed bag-of-words dual encoder (no download)."""
    from protorkd.models.build import build_dual_encoder
    from tests.conftest import TINY_TOWERS

    torch.manual_seed(0)
    return build_dual_encoder(TINY_TOWERS).eval()
