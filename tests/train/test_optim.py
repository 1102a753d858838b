"""The learning-rate schedule and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from protorkd.train.optim import lr_at, param_groups


def test_learning_rate_schedule_values():
    kwargs = dict(base_lr=1.0, warmup_steps=4, total_steps=14)
    assert [lr_at(s, **kwargs) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kwargs) == 1.0
    assert lr_at(9, **kwargs) == pytest.approx(0.5)
    assert lr_at(14, **kwargs) == pytest.approx(0.0)
    assert lr_at(7, **kwargs) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_weight_decay_skips_biases_norms_and_temperatures():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    module.logit_scale = torch.nn.Parameter(torch.zeros(()))
    decay, no_decay = param_groups({"rest": [module]}, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
