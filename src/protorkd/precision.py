"""Numeric precision: one `Precision` value per run (or per evaluation), and the one place that chooses autocast.

`--precision auto` is resolved once (`Precision.resolve`) into fp32, amp (fp16 autocast on CUDA), amp_bf16 (bf16
autocast on CUDA and on the CPU) or bf16 (bf16 weights, no autocast). Every forward pass that may run in low
precision enters `precision.autocast(device)`; nothing else calls `torch.autocast`.
"""

from __future__ import annotations

import contextlib
from enum import Enum

import torch


def cpu_has_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX)? Emulated bf16 would be slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


class Precision(str, Enum):
    """A resolved numeric precision (never "auto")."""

    FP32 = "fp32"
    AMP = "amp"  # fp16 autocast on CUDA; on the CPU torch has no fp16 autocast worth using: fp32
    AMP_BF16 = "amp_bf16"  # bf16 autocast on CUDA and on the CPU
    BF16 = "bf16"  # bf16 weights and inputs, no autocast

    @classmethod
    def resolve(cls, name: str | Precision, device: torch.device) -> Precision:
        """`auto` -> amp_bf16 where `device` computes bf16 natively (CUDA with bf16, CPUs with AVX512-BF16 or
        AMX), amp on other GPUs, fp32 on other CPUs; any other name is that precision."""
        if name != "auto":
            return cls(name)
        if device.type == "cuda":
            return cls.AMP_BF16 if torch.cuda.is_bf16_supported() else cls.AMP
        return cls.AMP_BF16 if device.type == "cpu" and cpu_has_bf16() else cls.FP32

    @classmethod
    def fastest_inference(cls, device: torch.device) -> Precision:
        """The precision of a forward pass whose outputs need no gradients and only a coarse accuracy (ProtoCLIP's
        extraction pass before k-means): bf16 autocast where the hardware computes bf16 natively, fp16 autocast on
        GPUs without bf16, fp32 on other CPUs."""
        if device.type == "cuda":
            return cls.AMP_BF16 if torch.cuda.is_bf16_supported() else cls.AMP
        return cls.AMP_BF16 if device.type == "cpu" and cpu_has_bf16() else cls.FP32

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """The autocast context of this precision on `device` (a no-op where it computes in the weights' dtype)."""
        device = torch.device(device)
        if device.type == "cuda" and self in (Precision.AMP, Precision.AMP_BF16):
            return torch.autocast("cuda", dtype=torch.float16 if self is Precision.AMP else torch.bfloat16)
        if device.type == "cpu" and self is Precision.AMP_BF16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the model's weights (and its image inputs) are held in."""
        return torch.bfloat16 if self is Precision.BF16 else torch.float32


__all__ = ["Precision", "cpu_has_bf16"]
