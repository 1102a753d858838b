"""Overhead of distillation from cached teacher features, on the CPU (ProtoCLIP's: `bench_protoclip.py`).

1. Cached teacher, step time: one training step (tokenize, forward, loss, backward, AdamW) of the same
   CLIP student (tiny-cnn + tiny-text, both towers train) with plain InfoNCE vs CLIP-KD reading a CLIP
   teacher's (128-d image + text) and a text teacher's (384-d) features from fp16 memory-mapped caches
   per batch. Same in-memory batches, alternated blocks of steps, median per step (in-process, so the
   machine's load hits both alike).
2. Cached teacher, whole epochs from the CLI (the loop's "epoch N trained in X s"), runs interleaved and
   repeated, medians.

Target: ratios <= 1.10.

    python benchmarks/bench_overhead.py --out /tmp/overhead            # ~6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ["--image-model-builder", "custom", "--image-model", "tiny-cnn", "--text-model-builder", "custom"]
STUDENT += ["--text-model", "tiny-text", "--teacher", "none"]


def tiny_clip_checkpoint(out: Path) -> Path:
    """A protorkd-tiny-clip state dict in a file (a stand-in for pretrained weights; speed does not care)."""
    path = out / "tiny-clip.pt"
    if not path.exists():
        sys.path.insert(0, str(ROOT / "src"))
        import open_clip
        import torch

        from protorkd.models.open_clip_models import register_open_clip_configs

        register_open_clip_configs()
        torch.manual_seed(0)
        torch.save(open_clip.create_model("protorkd-tiny-clip").state_dict(), path)
    return path


def step_seconds(batch_size: int, blocks: int, steps: int) -> dict[str, float]:
    """Median seconds per training step of InfoNCE and of CLIP-KD with cached teacher features."""
    sys.path.insert(0, str(ROOT / "src"))
    import tempfile

    import numpy as np
    import torch

    from protorkd.losses import LossOptions, build_loss
    from protorkd.losses.base import LossInputs
    from protorkd.models.build import build_dual_encoder
    from protorkd.models.options import ModelOptions
    from protorkd.teachers.cache import TeacherFeatures
    from protorkd.train.optim import build_optimizer

    torch.set_num_threads(1)  # as the CLI runs below (OMP_NUM_THREADS=1)
    torch.manual_seed(0)
    rows = 4096
    captions = [
        f"a {c} {s} on a {b} background"
        for c in ("red", "blue", "green", "pink")
        for s in ("circle", "star", "square", "ring")
        for b in ("white", "black", "grey", "dark")
    ] * (rows // 64)
    batches = [
        (
            torch.randn(batch_size, 3, 64, 64),
            captions[i * batch_size : (i + 1) * batch_size],
            torch.randint(0, rows, (batch_size,)),
        )
        for i in range(8)
    ]
    folder = Path(tempfile.mkdtemp())
    caches = {}
    for key, dim in (("teacher_image_features", 128), ("teacher_text_features", 128), ("text_teacher_features", 384)):
        array = np.lib.format.open_memmap(folder / f"{key}.npy", mode="w+", dtype=np.float16, shape=(rows, dim))
        array[:] = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)
        array.flush()
        caches[key] = TeacherFeatures(np.load(folder / f"{key}.npy", mmap_mode="r"), np.arange(rows), set(), folder)
    model_cfg = ModelOptions(
        image_model="tiny-cnn", text_model_builder="custom", text_model="tiny-text", teacher="none"
    )
    setups = {}
    for name, loss_cfg in (
        ("InfoNCE", LossOptions(loss="InfoNCE")),
        ("CLIP-KD", LossOptions(loss="CLIP-KD", clip_kd_teacher_dim=128, clip_kd_text_teacher_dim=384)),
    ):
        torch.manual_seed(0)
        model = build_dual_encoder(model_cfg).train()
        loss = build_loss(loss_cfg.loss, loss_cfg, model.embed_dim)
        optimizer = build_optimizer(
            [model, loss], lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, device_type="cpu"
        )
        setups[name] = (model, loss, optimizer, caches if name == "CLIP-KD" else {})

    def step(name: str, images, texts, indices) -> None:
        model, loss, optimizer, feature_caches = setups[name]
        features = model(images=images, tokens=model.tokenize(texts))
        separate = {key: cache.lookup(indices) for key, cache in feature_caches.items()}
        if feature_caches:
            separate["teacher_logit_scale"] = torch.tensor(100.0)
        terms = loss(
            LossInputs(features.image, features.text, teacher="none", indices=indices, separate_teachers=separate)
        )
        sum(terms.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {name: [] for name in setups}
    for name in setups:  # warm-up
        step(name, *batches[0])
    for block in range(blocks):
        for name in list(setups) if block % 2 == 0 else list(setups)[::-1]:
            for i in range(steps):
                started = time.perf_counter()
                step(name, *batches[i % len(batches)])
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def epoch_seconds(out: Path, name: str, args: list[str]) -> list[float]:
    """Train once; the per-epoch training seconds from out.log."""
    command = [sys.executable, "-m", "protorkd", "train", *args, "--logs", str(out / "runs"), "--name", name]
    command += ["--report-to", "", "--workers", "1", "--zeroshot-frequency", "0", "--linear-frequency", "0"]
    command += ["--retrieval-frequency", "0", "--teacher-cache", str(out / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    log_text = (out / "runs" / name / "out.log").read_text()
    return [float(s) for s in re.findall(r"epoch \d+ trained in ([0-9.]+) s", log_text)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--demo-size", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--step-blocks", type=int, default=10)
    parser.add_argument("--steps-per-block", type=int, default=10)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    per_step = step_seconds(args.batch_size, args.step_blocks, args.steps_per_block)
    ratio = per_step["CLIP-KD"] / per_step["InfoNCE"]
    print(
        f"step time, batch {args.batch_size}: InfoNCE {per_step['InfoNCE'] * 1000:.1f} ms, "
        f"CLIP-KD with cached teachers {per_step['CLIP-KD'] * 1000:.1f} ms, ratio {ratio:.3f}",
        flush=True,
    )
    checkpoint = tiny_clip_checkpoint(args.out)
    common = ["--demo-size", str(args.demo_size), "--epochs", str(args.epochs), *STUDENT]
    teachers = ["--clip-teacher-model", "protorkd-tiny-clip", "--clip-teacher-tag", str(checkpoint)]
    teachers += ["--clip-teacher-images", "cached"]
    teachers += ["--extra-text-teacher", "tiny-text", "--extra-text-teacher-builder", "custom"]
    configs = {
        "InfoNCE": [*common, "--loss", "InfoNCE"],
        "CLIP-KD, cached teachers": [*common, "--loss", "CLIP-KD", *teachers],
    }
    epoch_seconds(args.out, "fill-caches", [*configs["CLIP-KD, cached teachers"], "--epochs", "1"])
    times: dict[str, list[list[float]]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        order = list(enumerate(configs.items()))
        for index, (name, config) in order if repeat % 2 == 0 else order[::-1]:
            times[name].append(epoch_seconds(args.out, f"r{repeat}-{index}", config))
            print(f"repeat {repeat} {name}: {times[name][-1]}", flush=True)

    def steady(name: str) -> float:  # epochs after the first
        return statistics.median(s for run in times[name] for s in run[1:])

    def first(name: str) -> float:
        return statistics.median(run[0] for run in times[name])

    rows = [("InfoNCE", "InfoNCE", steady), ("CLIP-KD, cached teachers", "InfoNCE", steady)]
    print("\n| configuration | s / epoch (epochs 2+) | ratio | epoch 1 s | epoch 1 ratio |\n|---|---:|---:|---:|---:|")
    for name, baseline, measure in rows:
        ratio = measure(name) / measure(baseline)
        first_ratio = first(name) / first(baseline)
        print(f"| {name} | {measure(name):.2f} | {ratio:.3f} | {first(name):.2f} | {first_ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
