"""An export is accepted wherever a pretrained open_clip model is: as a CLIP-KD teacher, as a student's starting
weights, and by CLIP_benchmark's own command line (which then scores it as `protorkd eval` does)."""

from __future__ import annotations

import builtins
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import protorkd
from protorkd.cli import main
from protorkd.models.build import build_dual_encoder
from protorkd.models.options import ModelOptions
from tests.conftest import TINY_MODEL_ARGS


@pytest.fixture(scope="module")
def clip_export(tiny_clip_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chain") / "tiny-clip"
    assert main(["export", str(tiny_clip_run), "--out", str(out)]) == 0
    return out


def test_an_export_is_the_clip_kd_teacher_of_the_next_run(clip_export, tiny_corpus, tmp_path):
    teacher = f"local-dir:{clip_export}"
    args = ["train", "--train-data", str(tiny_corpus / "train.tsv"), "--logs", str(tmp_path), "--name", "next"]
    args += [*TINY_MODEL_ARGS, "--batch-size", "16", "--epochs", "2", "--episode-size", "32", "--keep-checkpoints", "1"]
    args += ["--teacher", "none"]
    args += ["--loss", "CLIP-KD", "--clip-teacher-model", teacher, "--clip-teacher-images", "cached"]
    assert main(args) == 0
    run = tmp_path / "next"
    last = [line for line in (run / "out.log").read_text().splitlines() if " step " in line][-1]
    assert " clip_kd_fd_loss " in last and " clip_kd_icl_loss " in last
    # the cached CLIP teacher is the export: its spec names the export's weights, its temperature the learned one
    (manifest,) = run.glob("cache/teacher-text-*/manifest.json")
    info = json.loads(manifest.read_text())
    assert info["teacher"]["model"] == teacher and info["teacher"]["weights"].startswith("file:")
    model, _, _ = protorkd.load(clip_export)
    assert info["info"]["logit_scale"] == pytest.approx(math.exp(model.logit_scale.item()), rel=1e-6)
    # --keep-checkpoints 1: only the most recent epoch_N.pt stays
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_2.pt", "epoch_latest.pt"]


def test_an_export_is_the_starting_weights_of_an_open_clip_student(clip_export):
    name = f"local-dir:{clip_export}"
    student = build_dual_encoder(
        ModelOptions(
            image_model_builder="open_clip",
            image_model=name,
            text_model_builder="open_clip",
            text_model=name,
            teacher="none",
            image_head_n_layers=0,
        )  # fmt: skip
    ).eval()
    exported, _, tokenizer = protorkd.load(clip_export)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    texts = ["a red circle", "two blue squares"]
    with torch.no_grad():
        assert torch.allclose(student.encode_image(images), exported.encode_image(images, normalize=True), atol=1e-6)
        assert torch.allclose(student.encode_texts(texts), exported.encode_text(tokenizer(texts), normalize=True),
                              atol=1e-6)  # fmt: skip


def test_clip_benchmarks_own_cli_scores_the_demo_export_as_protorkd_eval_does(
    demo_student_run, demo_export, tiny_corpus, tmp_path, monkeypatch
):
    """CLIP_benchmark 1.6.2's `clip_benchmark eval` (its `main` with its own argument parsing, model loading,
    dataset and metric code) on the export, against `protorkd eval` on the checkpoint. It runs in this process
    because its `accuracy` calls float() on a 1-element array, which numpy 2.x refuses: the module is given
    numpy 1.x's conversion (the element's value), nothing else changes. Zero-shot on the demo's `shapes`, read
    as an image folder by CLIP_benchmark's `imagenet_sketch` entry, with our class names and templates."""
    cli = pytest.importorskip("clip_benchmark.cli")
    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "float", lambda x: builtins.float(np.asarray(x).item()), raising=False)
    run = shutil.copytree(demo_student_run, tmp_path / "run")  # `protorkd eval` appends to its results.jsonl
    checkpoint = run / "checkpoints" / "epoch_1.pt"
    eval_args = ["--checkpoint", str(checkpoint), "--eval-data-dir", str(tiny_corpus / "eval"), "--tasks", "zeroshot"]
    assert main(["eval", *eval_args, "--device", "cpu", "--workers", "0", "--no-cache"]) == 0
    ours = json.loads((run / "results.jsonl").read_text().splitlines()[-1])
    assert ours["evaluated_by"] == "protorkd eval"
    metadata = json.loads((tiny_corpus / "eval" / "zeroshot_metadata.json").read_text())["shapes"]
    (tmp_path / "classes.json").write_text(json.dumps({"imagenet_sketch": metadata["classes"]}))
    templates = [template.replace("{}", "{c}") for template in metadata["templates"]]  # CLIP_benchmark's placeholder
    (tmp_path / "templates.json").write_text(json.dumps({"imagenet_sketch": templates}))
    argv = [
        "eval", "--dataset", "imagenet_sketch", "--dataset_root", str(tiny_corpus / "eval" / "shapes" / "test"),
        "--task", "zeroshot_classification", "--model", f"local-dir:{demo_export}", "--pretrained", "",
        "--custom_classname_file", str(tmp_path / "classes.json"),
        "--custom_template_file", str(tmp_path / "templates.json"),
        "--no_amp", "--num_workers", "0", "--batch_size", "64", "--output", str(tmp_path / "theirs.json"),
    ]  # fmt: skip
    monkeypatch.setattr("sys.argv", ["clip_benchmark", *argv])
    cli.main()
    theirs = json.loads((tmp_path / "theirs.json").read_text())["metrics"]
    assert theirs["acc1"] == pytest.approx(ours["zeroshot/shapes/top1"] / 100, abs=1e-6)
    assert theirs["acc5"] == pytest.approx(ours["zeroshot/shapes/top5"] / 100, abs=1e-6)
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["zeroshot/shapes/mean_per_class_recall"] / 100,
                                                            abs=1e-6)  # fmt: skip
