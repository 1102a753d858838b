"""Epoch time of image-teacher distillation: online, centre-crop cached and reinforced (K stored views) CLIP-KD against
InfoNCE with the same student, side by side (interleaved rounds), plus the reinforced cache's fill and disk cost.

    python benchmarks/bench_reinforced.py --out /tmp/bench-reinforced [--rows 2048] [--views 10] [--rounds 2]
        [--teacher-model protorkd-tiny-clip --teacher-tag FILE]   # default: a random protorkd-tiny-clip saved once
        [--student vit-b-32 --batch-size 256]   # on a GPU (benchmarks/gpu_check.sh): ViT-B-32 at 224 px, amp_bf16

Every configuration trains the same student (by default tiny-cnn at 64 px and the hashed bag-of-words text tower,
both trainable, batch 64; `--student vit-b-32`: open_clip's ViT-B-32 image tower at 224 px, bf16 autocast) on the
first --rows rows of the built-in demo corpus, decoded in memory. The CLIP-KD runs add the
teacher's terms; their teacher caches are filled before the timed epochs (the fill is reported on its own). Epoch
times are the "epoch N trained in X s" lines of out.log, epoch 1 dropped (warm-up), median over the rest and over
rounds; rounds interleave the configurations so a drift of the machine affects all alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_demo import cpu_model

STUDENTS = {
    "tiny": ["--image-model-builder", "custom", "--image-model", "tiny-cnn"],
    "vit-b-32": ["--image-model-builder", "open_clip", "--image-model", "ViT-B-32", "--image-size", "224",
                 "--precision", "amp_bf16"],
}  # fmt: skip
CONFIGS = {
    "InfoNCE (no teacher)": ["--loss", "InfoNCE"],
    "CLIP-KD, online teacher": ["--loss", "CLIP-KD", "--clip-teacher-images", "online"],
    "CLIP-KD, cached centre crops": ["--loss", "CLIP-KD", "--clip-teacher-images", "cached"],
    "CLIP-KD, reinforced (K views)": ["--loss", "CLIP-KD", "--teacher-views", "{views}"],
}


def device_name() -> str:
    """The CPU model and cores, and the GPU a run would use when there is one."""
    import torch

    gpu = f"; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu_model()}, {os.cpu_count()} cores{gpu}"


def teacher_checkpoint(out: Path, model: str) -> Path:
    """A random `model` saved once, so every run (and its caches) sees the same teacher weights."""
    path = out / f"{model}.pt"
    if not path.exists():
        import open_clip
        import torch

        from protorkd.models.open_clip_models import register_open_clip_configs

        register_open_clip_configs()
        torch.manual_seed(0)
        torch.save(open_clip.create_model(model).state_dict(), path)
    return path


def corpus(out: Path, rows: int) -> Path:
    """The first `rows` rows of the built-in demo corpus (generated once)."""
    from protorkd.data.demo import ensure_demo_corpus

    source = ensure_demo_corpus(10240, 0) / "train.tsv"
    target = out / f"demo-{rows}.tsv"
    if not target.exists():
        lines = source.read_text().splitlines()
        root = source.parent
        body = [f"{root / line.split(chr(9))[0]}\t{line.split(chr(9))[1]}" for line in lines[1 : rows + 1]]
        target.write_text("\n".join([lines[0], *body]) + "\n")
    return target


def run(out: Path, name: str, flags: list[str], epochs: int) -> dict:
    logs = out / "runs"
    shutil.rmtree(logs / name, ignore_errors=True)
    command = [sys.executable, "-m", "protorkd", "train", *flags, "--logs", str(logs), "--name", name]
    command += ["--epochs", str(epochs)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    log = (logs / name / "out.log").read_text()
    epoch_seconds = [float(m) for m in re.findall(r"epoch \d+ trained in ([\d.]+) s", log)]
    teachers = float(re.search(r"teacher features ready in ([\d.]+) s", log).group(1))
    return {"epochs": epoch_seconds, "teachers": teachers, "wall": wall, "folder": logs / name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="working folder (caches, runs, results.json)")
    parser.add_argument("--rows", type=int, default=2048, help="training rows of the demo corpus (default: 2048)")
    parser.add_argument("--views", type=int, default=10, help="stored views per image (default: 10)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not timed (default: 4)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: 2)")
    parser.add_argument("--teacher-model", default="protorkd-tiny-clip", help="open_clip teacher architecture")
    parser.add_argument("--teacher-tag", default=None, help="its weights (default: a random one saved once)")
    parser.add_argument("--student", choices=sorted(STUDENTS), default="tiny", help="the student's image tower")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of every run (default: 64)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.teacher_tag or str(teacher_checkpoint(args.out, args.teacher_model))
    data = corpus(args.out, args.rows)
    common = ["--train-data", str(data), *STUDENTS[args.student]]
    common += ["--text-model-builder", "custom", "--text-model", "tiny-text", "--teacher", "none", "--in-memory", "on"]
    common += ["--batch-size", str(args.batch_size), "--zeroshot-frequency", "0", "--report-to", "", "--workers", "0"]
    teacher = ["--clip-teacher-model", args.teacher_model, "--clip-teacher-tag", tag]
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for round_number in range(args.rounds):
        for index, (name, flags) in enumerate(CONFIGS.items()):
            flags = [flag.format(views=args.views) for flag in flags]
            extra = teacher if "CLIP-KD" in name else []
            cache = ["--teacher-cache", str(args.out / f"cache-{index}")]  # filled in round 1, read afterwards
            print(f"round {round_number + 1}: {name}", flush=True)
            results[name].append(
                run(args.out, f"r{round_number}-{index}", [*common, *flags, *extra, *cache], args.epochs)
            )
    baseline = statistics.median(t for r in results["InfoNCE (no teacher)"] for t in r["epochs"][1:])
    print(
        f"\n{device_name()}; {args.rows} rows, batch {args.batch_size}, student {args.student}; "
        f"teacher {args.teacher_model}"
    )
    print("| configuration | epoch s (median) | vs InfoNCE |\n|---|---:|---:|")
    summary = {}
    for name, runs in results.items():
        epoch = statistics.median(t for r in runs for t in r["epochs"][1:])
        summary[name] = {"epoch_seconds": epoch, "ratio": epoch / baseline}
        print(f"| {name} | {epoch:.2f} | {epoch / baseline:.3f}x |")
    (folder,) = (args.out / "cache-3").glob("teacher-image-views-*")
    manifest = json.loads((folder / "manifest.json").read_text())
    images, views = manifest["unique"], manifest["views"]
    size = sum((folder / name).stat().st_size for name in ("features.npy", "views.npy"))
    fill = results["CLIP-KD, reinforced (K views)"][0]["teachers"]
    print(
        f"\nreinforced cache: {images} images x {views} views x {manifest['dim']}-d: {size / 2**20:.1f} MiB, "
        f"{size / (images * views):.0f} bytes per image per view; filled (with the caption cache) in {fill:.1f} s, "
        f"{images * views / fill:.0f} views/s"
    )
    summary["cache"] = {"bytes_per_image_view": size / (images * views), "fill_seconds": fill, "views": views}
    (args.out / "results.json").write_text(json.dumps({"machine": device_name(), **summary}, indent=1))


if __name__ == "__main__":
    main()
