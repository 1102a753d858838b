"""ProtoRKD: relational and prototypical knowledge distillation for compact vision-language encoders.

`model, preprocess, tokenizer = protorkd.load(PATH)` loads a checkpoint, a run folder or an export folder
(`protorkd.loading.load`); it is imported on first use, so `import protorkd` (and `protorkd --help`) stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":  # imported by name: the package itself stays below every layer (import-linter)
        return importlib.import_module("protorkd.loading").load
    raise AttributeError(f"module 'protorkd' has no attribute {name!r}")
