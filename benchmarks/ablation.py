"""Loss ablation: the same student trained with every registered loss at the same budget and seed.

Datasets:
  demo     the built-in shapes corpus (`--demo-size`, its held-out split: zero-shot, linear probe, retrieval)
  cifar10  a real-photo proxy: CIFAR-10 train images as the corpus, captioned with CLIP's CIFAR-10 templates
           (one random template per image); evaluated zero-shot and by linear probe on the test split

Student: tiny-cnn image tower + linear head; teacher: the locked all-MiniLM-L6-v2 text tower (features
cached once per corpus in OUT/cache and shared by every run). CLIP-KD distils the same MiniLM as its
text-only teacher (`--extra-text-teacher`); ProtoCLIP runs as published (projection heads, back translation,
an extraction pass over each episode before training on it).

    python benchmarks/ablation.py --out /tmp/ablation            # ~25 min on 2 CPU cores
    python benchmarks/ablation.py --out /tmp/ablation --datasets demo --losses InfoNCE,SimReg

Each run is a `python -m protorkd train` subprocess (OMP_NUM_THREADS=1, one loader worker: on two cores
this is faster than two torch threads competing with the loader). Prints a markdown table and writes
OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# What a loss needs beyond the common flags (same student, same teacher, same budget).
LOSS_ARGS = {
    "CLIP-KD": ["--extra-text-teacher", "all-MiniLM-L6-v2"],
    "ProtoCLIP": ["--k", "64", "--add-projection-head", "--PBT"],
}


def write_cifar10(out: Path, source: Path, prompts: Path, probe_train: int, test: int, seed: int) -> tuple[Path, Path]:
    """OUT/cifar10/train.tsv (every train image, one template caption each, shuffled) and an eval root
    OUT/cifar10-eval/cifar10/{train,test}/<class>/ (symlinks; `probe_train` / `test` images per class)
    with zeroshot_metadata.json. Returns (tsv, eval root)."""
    entry = json.loads(prompts.read_text())["CIFAR10"]
    classes, templates = entry["classes"], entry["templates"]
    rng = random.Random(seed)
    rows = []
    for name in classes:
        for path in sorted((source / "train" / name).glob("*.jpg")):
            rows.append(f"{path}\t{rng.choice(templates).format(name)}")
    rng.shuffle(rows)
    tsv = out / "cifar10" / "train.tsv"
    tsv.parent.mkdir(parents=True, exist_ok=True)
    tsv.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    eval_root = out / "cifar10-eval"
    for split, count in (("train", probe_train), ("test", test)):
        for name in classes:
            folder = eval_root / "cifar10" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted((source / split / name).glob("*.jpg"))[:count]:
                link = folder / path.name
                if not link.exists():
                    link.symlink_to(path)
    metadata = {"cifar10": {"classes": classes, "templates": templates}}
    (eval_root / "zeroshot_metadata.json").write_text(json.dumps(metadata, indent=1))
    return tsv, eval_root


def run_one(name: str, loss: str, data_args: list[str], epochs: int, out: Path, seed: int, extra: list[str]) -> dict:
    """Train one loss; returns the last evaluation's metrics plus seconds per epoch (training, clustering incl.)."""
    logs = out / "runs"
    if (logs / name / "results.jsonl").exists():  # finished earlier: reuse (delete the folder to rerun)
        return _collect(logs / name)
    command = [
        sys.executable,
        "-m",
        "protorkd",
        "train",
        *data_args,
        "--loss",
        loss,
        *LOSS_ARGS.get(loss, []),
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--logs",
        str(logs),
        "--name",
        name,
        "--teacher-cache",
        str(out / "cache"),
        "--workers",
        "1",
        "--report-to",
        "",
        "--zeroshot-frequency",
        str(epochs),
        "--linear-frequency",
        str(epochs),
        "--retrieval-frequency",
        str(epochs),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"{name}: exit {result.returncode}\n{result.stderr[-2000:]}", file=sys.stderr)
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    metrics = _collect(logs / name)
    metrics["wall_seconds"] = time.time() - started
    return metrics


def _collect(folder: Path) -> dict:
    metrics = json.loads((folder / "results.jsonl").read_text().splitlines()[-1])
    seconds = [float(s) for s in re.findall(r"epoch \d+ trained in ([0-9.]+) s", (folder / "out.log").read_text())]
    metrics["seconds_per_epoch"] = sum(seconds) / len(seconds) if seconds else float("nan")
    return metrics


def table(results: dict[str, dict[str, dict]], dataset: str) -> str:
    keys = {
        "demo": ("zeroshot/shapes/top1", "linear/shapes/top1", "retrieval/shapes/image_to_text_R@1"),
        "cifar10": ("zeroshot/cifar10/top1", "linear/cifar10/top1", None),
    }[dataset]
    lines = [
        "| loss | zero-shot top-1 | linear-probe top-1 | retrieval R@1 (image->text) | s / epoch |",
        "|---|---:|---:|---:|---:|",
    ]

    def fmt(metrics: dict, key: str | None) -> str:
        return "-" if key is None or key not in metrics else f"{metrics[key]:.1f}"

    for loss, metrics in results[dataset].items():
        if "error" in metrics:
            lines.append(f"| {loss} | failed: {metrics['error'][:60]} | | | |")
            continue
        cells = [fmt(metrics, key) for key in keys]
        lines.append(f"| {loss} | {' | '.join(cells)} | {metrics['seconds_per_epoch']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", default="demo,cifar10")
    parser.add_argument("--losses", default="", help="comma-separated (default: every registered loss)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-size", type=int, default=4096)
    parser.add_argument("--demo-epochs", type=int, default=2)
    parser.add_argument("--cifar-root", type=Path, default=SHARED / "cifar10_jpg")
    parser.add_argument("--cifar-prompts", type=Path, default=SHARED / "clip_prompts" / "clip_zeroshot_prompts.json")
    parser.add_argument("--cifar-rows", type=int, default=3200, help="training rows (of 5000, class-balanced shuffle)")
    parser.add_argument("--cifar-epochs", type=int, default=2)
    parser.add_argument("--cifar-probe-train", type=int, default=100, help="linear-probe train images per class")
    parser.add_argument("--cifar-test", type=int, default=200, help="test images per class")
    parser.add_argument(
        "--n-prototypes", type=int, default=16384, help="DINO/ProtoCPC/ProtoRKD prototypes (65536 costs 3.5x per epoch)"
    )
    parser.add_argument("--train-args", default="", help="extra `protorkd train` flags for every run, one string")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from protorkd.losses import LOSSES

    losses = [name for name in args.losses.split(",") if name] or LOSSES.names()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict]] = {}
    datasets = [name for name in args.datasets.split(",") if name]
    for dataset in datasets:
        if dataset == "demo":
            data_args, epochs = ["--demo-size", str(args.demo_size)], args.demo_epochs
        elif dataset == "cifar10":
            tsv, eval_root = write_cifar10(
                args.out, args.cifar_root, args.cifar_prompts, args.cifar_probe_train, args.cifar_test, args.seed
            )
            data_args = ["--train-data", str(tsv), "--eval-data-dir", str(eval_root)]
            data_args += ["--dataset-size", str(args.cifar_rows)]
            epochs = args.cifar_epochs
        else:
            raise SystemExit(f"unknown dataset {dataset!r}: demo, cifar10")
        results[dataset] = {}
        for loss in losses:
            extra = ["--n-prototypes", str(args.n_prototypes), *args.train_args.split()]
            metrics = run_one(f"{dataset}-{loss}", loss, data_args, epochs, args.out, args.seed, extra)
            results[dataset][loss] = metrics
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
            print(
                f"{dataset} {loss}: {json.dumps({k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)})}"
            )
            sys.stdout.flush()
    for dataset in datasets:
        print(f"\n### {dataset}\n\n{table(results, dataset)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
