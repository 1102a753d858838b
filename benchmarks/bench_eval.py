"""Evaluation speed and agreement: zero-shot and retrieval throughput, linear probe torch vs sklearn, STS.

    python benchmarks/bench_eval.py [--checkpoint CKPT] [--shared-data ../shared/data] [--device auto]
        [--parts zeroshot,retrieval,linear,sts] [--threads N] [--linear-features joint|backbone]
        [--rounds N] [--features FILE.pt] [--save-features FILE.pt]

- zero-shot CIFAR-10 (cifar10_jpg test, 10,000 images): images/s of the whole task (classifier included).
- COCO retrieval: images/s on coco_mini_captions (159 images, 795 captions), and the blocked recall@K on
  COCO val2017's real size (5,000 images x 25,014 captions, random unit features), seconds.
- linear probe on CIFAR-10 features (5,000 train / 10,000 test; joint by default): the cv protocol's whole
  run (coarse-to-fine search, 5 folds, refit) with the torch L-BFGS solver and with sklearn (the reference),
  interleaved for --rounds rounds (torch, sklearn, torch, ...), each round's seconds, test top-1 and chosen
  L2, then the speed ratio of the medians; then CLIP_benchmark's protocol on the same features (its CLI
  default, and with --linear-val-proportion 0.2), for the gap between the two protocols.
  --save-features writes the features, --features reuses them, --train-per-class N keeps N training
  images per class.
- sts: STS of all-MiniLM-L6-v2 against its published MTEB scores (docs/evaluation.md).
The model is --checkpoint, or the default demo student (untrained: tiny-cnn image tower, MiniLM text tower).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
# all-MiniLM-L6-v2, cosine Spearman x 100 on MTEB (github.com/embeddings-benchmark/results,
# results/sentence-transformers__all-MiniLM-L6-v2/8b3219a92973c328a8e22fadcfa821b5dc75636a/<task>.json)
PUBLISHED_MINILM = {"STS12": 72.37, "STS13": 80.60, "STS15": 85.39, "STS16": 78.99, "STSB": 82.03, "SICKR": 77.58}


def _model(checkpoint: str | None):
    if checkpoint:
        from protorkd.loading import load_model_from_checkpoint

        return load_model_from_checkpoint(Path(checkpoint)).model
    from protorkd.models.build import build_dual_encoder
    from protorkd.models.options import ModelOptions

    return build_dual_encoder(ModelOptions()).eval()


def _transform(model):
    from protorkd.data.transforms import eval_transform

    return eval_transform(model.image_preprocess)


def _time(function):
    started = time.perf_counter()
    value = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - started


def bench_zeroshot(model, shared: Path, device, batch_size: int, workers: int) -> list[tuple]:
    from protorkd.eval import zeroshot
    from protorkd.eval.datasets import ImageFolderDataset

    dataset = ImageFolderDataset(shared / "cifar10_jpg" / "test", _transform(model))
    prompts = zeroshot.resolve_prompts("cifar10", dataset.class_folders, dataset.classes, packaged_key="CIFAR10")
    metrics, seconds = _time(
        lambda: zeroshot.evaluate(model, dataset, prompts, device=device, batch_size=batch_size, workers=workers)
    )
    return [
        (
            "zero-shot CIFAR-10 (10,000 test images, 18 templates)",
            f"{len(dataset) / seconds:.0f} images/s",
            f"top1 {metrics['top1']:.2f}",
        )
    ]


def bench_retrieval(model, shared: Path, device, batch_size: int, workers: int) -> list[tuple]:
    from protorkd.eval import retrieval
    from protorkd.eval.datasets import coco_captions

    coco = shared / "coco_mini_captions"
    dataset = coco_captions(coco / "annotations" / "captions_val2017.json", coco / "val2017", _transform(model))
    metrics, seconds = _time(
        lambda: retrieval.evaluate(model, dataset, device=device, batch_size=batch_size, workers=workers)
    )
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5000, 512, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(25014, 512, generator=generator), dim=-1)
    owners = torch.arange(25014) % 5000
    _, full_seconds = _time(lambda: retrieval.retrieval_metrics(images, texts, owners))
    return [
        (
            "COCO retrieval, coco_mini (159 images, 795 captions)",
            f"{len(dataset) / seconds:.0f} images/s",
            f"mean recall {metrics['mean_recall']:.2f}",
        ),
        ("blocked recall@K, 5,000 x 25,014 x 512 (CPU)", f"{full_seconds:.2f} s", "block 1024: ~100 MB of scores"),
    ]


def linear_features(model, shared: Path, device, batch_size: int, workers: int, joint: bool) -> dict[str, torch.Tensor]:
    from protorkd.eval.datasets import ImageFolderDataset
    from protorkd.eval.features import image_features

    out = {}
    for split in ("train", "test"):
        dataset = ImageFolderDataset(shared / "cifar10_jpg" / split, _transform(model))
        x, y = image_features(model, dataset, device=device, batch_size=batch_size, workers=workers, normalize=joint)
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    return out


def bench_linear(features: dict[str, torch.Tensor], device, rounds: int) -> list[tuple]:
    """The cv probe with each solver, interleaved (torch, sklearn, torch, ...): the ratio of medians; then
    CLIP_benchmark's protocol on the same features."""
    from protorkd.eval.linear_clip_benchmark import clip_benchmark_linear_probe
    from protorkd.eval.linear_probe import cv_linear_probe

    args = (features["train_x"], features["train_y"], features["test_x"], features["test_y"])
    cv_linear_probe(*args, solver="torch", device=device)  # warm-up: CUDA context, LAPACK, first-call costs
    shape = f"{len(features['train_y'])} train / {len(features['test_y'])} test x {features['train_x'].shape[1]}"
    rows, seconds = [], {"torch": [], "sklearn": []}
    for round_index in range(rounds):
        for solver in ("torch", "sklearn"):
            result, elapsed = _time(lambda solver=solver: cv_linear_probe(*args, solver=solver, device=device))
            seconds[solver].append(elapsed)
            m = result.metrics
            detail = f"top1 {m['top1']:.2f}, l2 {m['l2']:.3g}, cv top1 {m['cv_top1']:.2f}"
            rows.append((f"round {round_index + 1}: cv probe, {solver} [{shape}]", f"{elapsed:.2f} s", detail))
    if rounds:
        torch_median, sklearn_median = (float(np.median(seconds[solver])) for solver in ("torch", "sklearn"))
        rows.append(("cv probe speed, sklearn / torch (medians)", f"{sklearn_median / torch_median:.1f}x", ""))
    for proportion in (None, 0.2):
        result, elapsed = _time(
            lambda proportion=proportion: clip_benchmark_linear_probe(*args, val_proportion=proportion, device=device)
        )
        m = result.metrics
        name = "CLIP_benchmark's probe" + (f", val_proportion {proportion}" if proportion else " (its CLI default)")
        rows.append(
            (f"{name} [{shape}]", f"{elapsed:.2f} s", f"top1 {m['top1']:.2f}, weight decay {m['weight_decay']:.3g}")
        )
    return rows


def bench_sts(shared: Path, device, batch_size: int) -> list[tuple]:
    from protorkd.eval import sts
    from protorkd.eval.features import text_features
    from protorkd.models.build import build_dual_encoder
    from protorkd.models.options import ModelOptions

    model = build_dual_encoder(ModelOptions(text_model_builder="sbert", text_model="all-MiniLM-L6-v2")).eval()
    model.to(device)
    metrics, seconds = _time(lambda: sts.evaluate(model, shared / "sts", device=device, batch_size=batch_size))
    rows = []
    for name in sts.TASK_ORDER:
        published = PUBLISHED_MINILM.get(name)
        ours = metrics[f"{name}/spearman"]
        note = f"published (MTEB) {published:.2f}, diff {ours - published:+.2f}" if published else "no MTEB file"
        rows.append((f"STS {name}, all-MiniLM-L6-v2", f"{ours:.2f}", note))
    rows.append(("STS avg of 7", f"{metrics['avg/spearman']:.2f}", f"{seconds:.0f} s in all"))
    # MTEB's SICK-R "test" is all 9,927 SICK pairs (train + trial + test), SentEval's the 4,927 test pairs.
    parts = [
        sts.load_table(
            shared / "sts" / "SICK" / f"SICK_{split}.txt", "SICK", first=1, second=2, score=3, header=True
        ).subsets["test"]
        for split in ("train", "trial", "test_annotated")
    ]
    everything = sts.STSPairs(
        "SICK-all",
        {
            "all": tuple(sum((list(p[i]) for p in parts), []) for i in range(2))
            + (np.concatenate([p[2] for p in parts]),)
        },
    )

    def encode(texts):
        return text_features(model, texts, device=device, batch_size=batch_size)

    ours = sts.score_pairs(everything, encode)["spearman"]
    rows.append(
        (
            f"SICK-R on all {len(everything)} pairs (MTEB's split)",
            f"{ours:.2f}",
            f"published (MTEB) 77.58, diff {ours - 77.58:+.2f}",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--shared-data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--parts",
        default="zeroshot,retrieval,linear",
        help="comma-separated: zeroshot, retrieval, linear, sts (STS runs all-MiniLM-L6-v2: slow on a CPU)",
    )
    parser.add_argument("--features", type=Path, help="linear-probe features written earlier by --save-features")
    parser.add_argument("--save-features", type=Path)
    parser.add_argument("--threads", type=int, help="CPU threads for torch and BLAS (sklearn) alike")
    parser.add_argument(
        "--linear-features", choices=("joint", "backbone"), default="joint", help="features the probe reads"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the linear probe (default 2)")
    parser.add_argument(
        "--train-per-class", type=int, help="linear probe: only the first N training images of each class"
    )
    args = parser.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)

    def report(rows: list[tuple]) -> None:  # as each part finishes, so a slow later part loses nothing
        for row in rows:
            print("  ".join(str(cell) for cell in row), flush=True)

    needs_model = parts & {"zeroshot", "retrieval"} or ("linear" in parts and not args.features)
    model = _model(args.checkpoint).to(device) if needs_model else None
    if "zeroshot" in parts:
        report(bench_zeroshot(model, args.shared_data, device, args.batch_size, args.workers))
    if "retrieval" in parts:
        report(bench_retrieval(model, args.shared_data, device, args.batch_size, args.workers))
    if "linear" in parts:
        if args.features:
            features = torch.load(args.features, weights_only=True)
        else:
            joint = args.linear_features == "joint"
            features = linear_features(model, args.shared_data, device, args.batch_size, args.workers, joint)
        if args.save_features:
            torch.save(features, args.save_features)
        if args.train_per_class:
            labels = features["train_y"]
            keep = torch.cat([torch.nonzero(labels == c)[: args.train_per_class, 0] for c in labels.unique()])
            features = {**features, "train_x": features["train_x"][keep], "train_y": labels[keep]}
        report(bench_linear(features, device, args.rounds))
    if "sts" in parts:
        report(bench_sts(args.shared_data, device, args.batch_size))


if __name__ == "__main__":
    main()
