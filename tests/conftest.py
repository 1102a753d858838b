"""Shared fixtures: offline hub, a private cache folder, a tiny CSV corpus in the CC3M layout."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from protorkd.models.options import ModelOptions
from tests.support.gather_server import image_server  # noqa: F401  (a fixture for tests/data and tests/commands)

# A pytest started through a wrapper script without an `if __name__ == "__main__":` guard (pip's own console
# script has one) would run again inside every worker that multiprocessing spawns, since a spawned worker
# re-imports the parent's __main__ by path. Naming pytest's real entry module makes workers skip it.
_main = sys.modules.get("__main__")
_launcher = Path(getattr(_main, "__file__", None) or "").name
if _main is not None and getattr(_main, "__spec__", None) is None and _launcher in ("pytest", "py.test"):
    _main.__spec__ = importlib.util.find_spec("pytest.__main__")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tiny towers for tests: a ~9k-parameter CNN student and a hashed bag-of-words text teacher.
TINY_TOWER_FLAGS = [
    "--image-model-builder",
    "custom",
    "--image-model",
    "micro-cnn",
    "--text-model-builder",
    "custom",
    "--text-model",
    "tiny-text",
]
TINY_MODEL_ARGS = [
    *TINY_TOWER_FLAGS,
    "--workers",
    "0",
    "--report-to",
    "",
    "--linear-frequency",
    "0",
    "--retrieval-frequency",
    "0",
]
# the same towers as library options, both trainable (CLIP-style)
TINY_TOWERS = ModelOptions(
    image_model_builder="custom",
    image_model="micro-cnn",
    text_model_builder="custom",
    text_model="tiny-text",
    teacher="none",
)


def tiny_train_args(
    corpus: Path, logs: Path, name: str, *extra: str, logs_flag: str = "--logs", eval_data: bool = True
) -> list[str]:
    """`protorkd train` arguments for a run of the tiny towers on `corpus` (extra flags come last and win)."""
    args = ["train", "--train-data", str(corpus / "train.tsv")]
    if eval_data:
        args += ["--eval-data-dir", str(corpus / "eval")]
    return [*args, logs_flag, str(logs), "--name", name, "--batch-size", "16", *TINY_MODEL_ARGS, *extra]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PROTORKD_CACHE", str(tmp_path_factory.getbasetemp() / "protorkd-cache"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """96 demo pairs + 10 held-out images per class, written like a user's CC3M folder."""
    from protorkd.data.demo import write_demo_corpus

    root = tmp_path_factory.mktemp("corpus") / "demo"
    write_demo_corpus(root, size=96, seed=3, eval_per_class=10, progress=False)
    return root


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def _train_run(corpus: Path, logs: Path, name: str, *flags: str) -> Path:
    """One short `protorkd train` run on `corpus`, evaluated on its held-out split; returns the run folder."""
    from protorkd.cli import main

    args = ["train", "--train-data", str(corpus / "train.tsv"), "--eval-data-dir", str(corpus / "eval")]
    common = ["--epochs", "1", "--batch-size", "16", "--workers", "0", "--report-to", "", "--linear-frequency", "0"]
    assert main([*args, "--logs", str(logs), "--name", name, *common, "--retrieval-frequency", "0", *flags]) == 0
    return logs / name


@pytest.fixture(scope="session")
def demo_student_run(tiny_corpus, tmp_path_factory) -> Path:
    """One epoch of the demo's own model shape: the tiny-cnn image student under a locked MiniLM text teacher
    (every model flag at its default)."""
    return _train_run(tiny_corpus, tmp_path_factory.mktemp("demo_student"), "demo")


@pytest.fixture(scope="session")
def tiny_clip_run(tiny_corpus, tmp_path_factory) -> Path:
    """One epoch of a tiny open_clip CLIP (`protorkd-tiny-clip` towers), both towers trained with InfoNCE."""
    towers = ["--image-model-builder", "open_clip", "--image-model", "protorkd-tiny-clip", "--teacher", "none"]
    towers += ["--text-model-builder", "open_clip", "--text-model", "protorkd-tiny-clip", "--zeroshot-frequency", "0"]
    # a CLIP student keeps its towers' own projections (no extra head): exactly open_clip's model (a linear head's
    # bias after a ViT has no exact open_clip form; docs/export.md)
    towers += ["--image-head-n-layers", "0"]
    return _train_run(tiny_corpus, tmp_path_factory.mktemp("tiny_clip"), "clip", *towers)


@pytest.fixture(scope="session")
def demo_export(demo_student_run, tmp_path_factory) -> Path:
    """`protorkd export` (open_clip format) of `demo_student_run`."""
    from protorkd.cli import main

    out = tmp_path_factory.mktemp("demo_export") / "demo"
    assert main(["export", str(demo_student_run), "--out", str(out)]) == 0
    return out


def write_checkpoint(options: ModelOptions, folder: Path, *, seed: int = 0) -> Path:
    """A weights checkpoint (as `epoch_N.pt`, its flags stored) of randomly initialised towers, BatchNorm
    statistics included: for tests about loading and mapping weights, not about training."""
    import torch

    from protorkd.checkpoint import save_checkpoint, weights_payload
    from protorkd.config import Config
    from protorkd.models.build import build_dual_encoder

    torch.manual_seed(seed)
    model = build_dual_encoder(options).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = folder / "epoch_1.pt"
    payload = weights_payload(model, options, epoch=1, name=folder.name, config=Config(model=options).to_flat_dict())
    save_checkpoint(path, payload)
    return path
