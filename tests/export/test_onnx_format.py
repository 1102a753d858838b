"""`protorkd export --format onnx`: onnxruntime runs the two graphs, at a batch size other than the traced one,
to the model's features within 1e-4. Skipped without the onnx extra (pip install 'protorkd[onnx]')."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import protorkd
from protorkd.cli import main
from tests.conftest import TINY_TOWERS, write_checkpoint

onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (torch's exporter needs onnxscript)")


def test_onnx_graphs_reproduce_the_model_under_onnxruntime_with_any_batch_size(tmp_path):
    checkpoint = write_checkpoint(TINY_TOWERS, tmp_path)  # micro-cnn + tiny-text: no open_clip form, ONNX takes it
    out = tmp_path / "onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--format", "onnx"]) == 0
    manifest = json.loads((out / "protorkd_onnx.json").read_text())
    assert manifest["image_encoder"]["inputs"] == ["images"] and manifest["text_encoder"]["inputs"] == ["input_ids"]
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: onnx\n")

    model, _, tokenizer = protorkd.load(checkpoint)
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # traced with 2
    texts = ["one", "a red circle and a much longer caption than any traced", "", "x y z", "blue"]
    with torch.no_grad():
        ours_image = model.encode_image(images, normalize=True).numpy()
        ours_text = model.encode_text(tokenizer(texts), normalize=True).numpy()
    image = onnxruntime.InferenceSession(str(out / "image_encoder.onnx")).run(None, {"images": images.numpy()})[0]
    session = onnxruntime.InferenceSession(str(out / "text_encoder.onnx"))
    text = session.run(None, {"input_ids": tokenizer(texts)["input_ids"].numpy()})[0]
    assert image.shape == (7, model.embed_dim) and text.shape == (5, model.embed_dim)
    assert np.abs(image - ours_image).max() <= 1e-4
    assert np.abs(text - ours_text).max() <= 1e-4
