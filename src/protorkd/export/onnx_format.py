"""`protorkd export --format onnx`: one graph per encoder, dynamic batch, normalised joint features out.

    DIR/image_encoder.onnx   images [B, 3, S, S] (the evaluation transform's output) -> features [B, D]
    DIR/text_encoder.onnx    the tokenizer's tensors ([B, L] each, named as the tokenizer names them) -> [B, D]
    DIR/*.onnx.data          the graphs' weights (torch's exporter writes them beside the graphs)
    DIR/protorkd_onnx.json   the graphs' inputs, the image preprocessing, the tokenizer to use
    DIR/tokenizer files      for a Hugging Face / sentence-transformers text tower (AutoTokenizer reads DIR)
    DIR/README.md            the model card

The tokenizer stays in Python: the text graph takes token ids. Written with torch's `torch.export`-based
exporter (`dynamo=True`, which needs onnxscript); before the folder appears under its name, onnxruntime runs
both graphs on a batch of another size than the one traced and they must agree with the model
(`check_onnx`, 1e-4), else the export is refused.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from protorkd.errors import UsageError
from protorkd.export.model_card import CardFacts, checked_note, render_card, retarget_card
from protorkd.io import atomic_folder
from protorkd.loading import ONNX_MANIFEST, OPEN_CLIP_CONFIG
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.encoder import Encoder
from protorkd.models.open_clip_models import LOCAL_DIR, quiet_root_logger
from protorkd.models.text_towers import HuggingFaceTower, OpenCLIPTextTower, SentenceTransformerTower, TextTower

IMAGE_GRAPH, TEXT_GRAPH = "image_encoder.onnx", "text_encoder.onnx"
TOLERANCE = 1e-4
PROBE_TEXTS = ["a photo of a cat.", "two red squares on a blue background, seen from above", "hi"]


class _ImageGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)


class _TextGraph(nn.Module):
    """The text encoder over positional tensors (named `names`): what a graph input list can hold."""

    def __init__(self, model: nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        tokens: Any = dict(zip(self.names, tensors)) if self.names else tensors[0]
        return self.model.encode_text(tokens, normalize=True)


def _token_inputs(tokens: Any) -> tuple[list[str], tuple[torch.Tensor, ...], list[str] | None]:
    """(graph input names, tensors, dict keys or None) of a tokenizer's output (a dict, or one tensor)."""
    if isinstance(tokens, dict):
        names = list(tokens)
        return names, tuple(tokens[name] for name in names), names
    return ["input_ids"], (tokens,), None


def _export(module: nn.Module, inputs: tuple, names: list[str], path: Path, sequence: bool) -> None:
    import onnxscript  # noqa: F401  (torch's exporter needs it; a missing package is the caller's one line)

    batch = torch.export.Dim("batch")
    length = torch.export.Dim("length")
    shapes: tuple = tuple({0: batch, 1: length} if sequence else {0: batch} for _ in names)
    if isinstance(module, _TextGraph):
        shapes = (shapes,)  # its forward takes the tensors as *args
    with quiet_root_logger(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and tracing
        torch.onnx.export(
            module, inputs, str(path), dynamo=True, dynamic_shapes=shapes, input_names=names,
            output_names=["features"], verbose=False, report=False,
        )  # fmt: skip


@torch.no_grad()
def check_onnx(model: nn.Module, tokenizer: Any, folder: Path, image_size: int) -> dict[str, float]:
    """Run both graphs under onnxruntime on probe inputs of a batch size other than the traced one; the largest
    differences from the model, a UsageError above `TOLERANCE`."""
    import onnxruntime

    images = torch.randn(5, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(folder / IMAGE_GRAPH), providers=["CPUExecutionProvider"])
    image = session.run(None, {"images": images.numpy()})[0]
    names, tensors, _ = _token_inputs(tokenizer(PROBE_TEXTS))
    session = onnxruntime.InferenceSession(str(folder / TEXT_GRAPH), providers=["CPUExecutionProvider"])
    text = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, tensors)})[0]
    differences = {
        "image": float(np.abs(image - model.encode_image(images, normalize=True).numpy()).max()),
        "text": float(np.abs(text - model.encode_text(tokenizer(PROBE_TEXTS), normalize=True).numpy()).max()),
    }
    worst = max(differences, key=differences.get)
    if differences[worst] > TOLERANCE:
        raise UsageError(f"the ONNX {worst} graph differs from the model by {differences[worst]:.2g} under "
                         f"onnxruntime (more than {TOLERANCE})")  # fmt: skip
    return differences


def write_onnx(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    *,
    preprocess: dict[str, Any],
    tokenizer_files: Any | None,
    tokenizer_note: str,
    card: Callable[[str], str],
    dynamic_length: bool = True,
) -> dict[str, float]:
    """Write the two graphs of `model` (with open_clip's `encode_image` / `encode_text(..., normalize)`) to
    `out`, checked under onnxruntime; `tokenizer_files` (with `save_pretrained`) go in too when given, and
    `tokenizer_note` says in the manifest how to make the text graph's inputs; `card(check_note)` is the README.
    `dynamic_length=False` fixes the token length to the traced one (open_clip's text transformers add a
    positional embedding of their context length: their tokenizers always pad to it)."""
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            raise UsageError(f"--format onnx needs {package}: pip install 'protorkd[onnx]'") from None
    model = model.float().eval()
    size = int(preprocess["size"])
    images = torch.randn(2, 3, size, size)
    names, tensors, keys = _token_inputs(tokenizer(PROBE_TEXTS[:2]))
    with atomic_folder(Path(out).resolve()) as tmp:
        _export(_ImageGraph(model), (images,), ["images"], tmp / IMAGE_GRAPH, sequence=False)
        _export(_TextGraph(model, keys), tensors, names, tmp / TEXT_GRAPH, sequence=keys is not None and dynamic_length)
        if tokenizer_files is not None:
            tokenizer_files.save_pretrained(tmp)
        manifest = {
            "image_encoder": {"file": IMAGE_GRAPH, "inputs": ["images"], "shape": ["batch", 3, size, size]},
            "text_encoder": {
                "file": TEXT_GRAPH,
                "inputs": names,
                "shape": ["batch", "length" if keys is not None and dynamic_length else tensors[0].shape[1]],
            },
            "output": "features [batch, D], L2-normalised joint embeddings",
            "preprocess": preprocess,
            "tokenizer": tokenizer_note,
        }
        (tmp / ONNX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        differences = check_onnx(model, tokenizer, tmp, size)
        (tmp / "README.md").write_text(card(checked_note(differences, "onnxruntime")))
    return differences


def text_tokenizer(tower: TextTower) -> tuple[Any | None, str]:
    """(a Hugging Face tokenizer to save into the export, or None; how to make the text graph's inputs)."""
    if isinstance(tower, SentenceTransformerTower):
        return tower.model[0].tokenizer, (
            f"AutoTokenizer.from_pretrained(this folder)(texts, padding=True, truncation=True, max_length="
            f"{tower.model.max_seq_length}, return_tensors='np')"
        )
    if isinstance(tower, HuggingFaceTower):
        return tower.tokenizer, (
            f"AutoTokenizer.from_pretrained(this folder)(texts, padding=True, truncation=True, max_length="
            f"{tower.max_seq_length}, return_tensors='np')"
        )
    if isinstance(tower, OpenCLIPTextTower):
        return None, f"open_clip.get_tokenizer({tower.name.split(':', 1)[1]!r})(texts, {tower.context_length})"
    return None, f"the tokenizer of {tower.name}: model, preprocess, tokenizer = protorkd.load(checkpoint)"


def checkpoint_to_onnx(
    model: DualEncoder, out: Path, *, logit_scale: float | None, facts: CardFacts
) -> dict[str, float]:
    """The ONNX export of a checkpoint's model, with its model card."""
    encoder = Encoder(model, logit_scale=logit_scale)
    files, note = text_tokenizer(model.text_tower)
    preprocess = model.image_preprocess
    spec = {"size": preprocess.image_size, "mean": list(preprocess.mean), "std": list(preprocess.std),
            "interpolation": preprocess.interpolation, "resize": "shorter side, then centre crop"}  # fmt: skip

    def card(check: str) -> str:
        return render_card(dataclasses.replace(facts, notes=[*facts.notes, check]), export_format="onnx")

    return write_onnx(encoder, encoder.tokenizer, out, preprocess=spec, tokenizer_files=files, tokenizer_note=note,
                      card=card, dynamic_length=not isinstance(model.text_tower, OpenCLIPTextTower))  # fmt: skip


def open_clip_folder_to_onnx(folder: Path, out: Path) -> dict[str, float]:
    """The ONNX export of an open_clip export folder (loaded by open_clip), its model card carried over."""
    import open_clip

    name = f"{LOCAL_DIR}{Path(folder).resolve()}"
    with quiet_root_logger():
        model = open_clip.create_model(name, device="cpu")
        tokenizer = open_clip.get_tokenizer(name)
    config = json.loads((Path(folder) / OPEN_CLIP_CONFIG).read_text())
    readme = Path(folder) / "README.md"
    text = readme.read_text() if readme.is_file() else "# exported model\n"

    def card(check: str) -> str:
        return retarget_card(text, "onnx", [f"Converted from the open_clip export {folder}.", check])

    return write_onnx(model, tokenizer, out, preprocess=config["preprocess_cfg"], tokenizer_files=None,
                      tokenizer_note=f"open_clip.get_tokenizer('local-dir:OPEN_CLIP_EXPORT') of {folder}",
                      card=card)  # fmt: skip
