"""`Precision`: `auto` resolved once, and the one place that chooses autocast."""

from __future__ import annotations

import torch

import protorkd.precision as precision_module
from protorkd.precision import Precision


def test_precision_auto_is_bf16_autocast_only_where_bf16_is_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)
    assert Precision.resolve("auto", cpu) == "amp_bf16"
    assert Precision.fastest_inference(cpu) is Precision.AMP_BF16
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: False)
    assert Precision.resolve("auto", cpu) == "fp32"
    assert Precision.fastest_inference(cpu) is Precision.FP32
    assert Precision.resolve("fp32", cpu) == "fp32"  # an explicit choice is kept
    assert Precision.resolve("bf16", cpu) == "bf16"


def test_autocast_computes_in_bf16_on_the_cpu_only_for_amp_bf16():
    a = torch.randn(4, 4)
    for precision, dtype in (
        (Precision.FP32, torch.float32),
        (Precision.AMP, torch.float32),  # fp16 autocast is a CUDA thing; the CPU computes in fp32
        (Precision.AMP_BF16, torch.bfloat16),
        (Precision.BF16, torch.float32),  # bf16 weights, no autocast: the inputs' dtype decides
    ):
        with precision.autocast("cpu"):
            assert (a @ a).dtype == dtype, precision
    assert Precision.BF16.weights_dtype == torch.bfloat16 and Precision.AMP_BF16.weights_dtype == torch.float32
