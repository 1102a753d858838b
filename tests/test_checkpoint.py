"""Checkpoints are plain dicts written atomically."""

from __future__ import annotations

import pytest
import torch

from protorkd.checkpoint import load_checkpoint, save_checkpoint
from protorkd.errors import UsageError


def test_checkpoint_is_atomic_and_plain(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1, "state_dict": {"w": torch.ones(2)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary file left behind
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(2)) and "version" in loaded
    assert load_checkpoint(path)["epoch"] == 1
    with pytest.raises(UsageError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
