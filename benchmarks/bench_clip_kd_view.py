"""CLIP-KD: the CLIP teacher online on the student's augmented batch vs its cached centre-crop features.

On the CIFAR-10 proxy of `benchmarks/ablation.py` (CIFAR-10 train images captioned with CLIP's templates;
zero-shot and linear probe on the test split). No pretrained CLIP is reachable offline, so the teacher is
trained here first: `--teacher-model` (default `protorkd-tiny-rn-clip`, an open_clip CLIP with a small
ModifiedResNet at 64 px and a 4-layer text transformer; the ViT `protorkd-tiny-clip` ends below the student
at this budget) with InfoNCE on all `--teacher-rows` training images, saved as an open_clip state dict and
loaded back through `--clip-teacher-tag`.

Students (same seed, same budget): a CLIP of tiny-cnn + tiny-text trained from scratch (`--teacher none`),
with InfoNCE alone, with CLIP-KD and the teacher online (`--clip-teacher-images online`), and with CLIP-KD
and the teacher's cached centre-crop features (`--clip-teacher-images cached`). Student and teacher both
take 64 px images with OpenAI's statistics, so online the teacher receives the student's very tensor, as
in CLIP-KD. Each student runs `--seeds` times, the three configurations interleaved; reported: zero-shot
and linear-probe top-1 (mean over seeds) and the epoch time relative to InfoNCE (median of epochs 2+).

    python benchmarks/bench_clip_kd_view.py --out /tmp/clip-kd-view      # ~25 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from ablation import SHARED, write_cifar10  # noqa: E402

STUDENT = ["--image-model-builder", "custom", "--image-model", "tiny-cnn", "--text-model-builder", "custom"]
STUDENT += ["--text-model", "tiny-text", "--teacher", "none"]


def train(out: Path, name: str, args: list[str], epochs: int, seed: int) -> dict:
    """One `protorkd train` run; its last evaluation plus the per-epoch seconds."""
    folder = out / "runs" / name
    if not (folder / "results.jsonl").exists():
        command = [sys.executable, "-m", "protorkd", "train", *args, "--epochs", str(epochs), "--seed", str(seed)]
        command += ["--logs", str(out / "runs"), "--name", name, "--teacher-cache", str(out / "cache")]
        command += ["--workers", "1", "--report-to", "", "--retrieval-frequency", "0"]
        command += ["--zeroshot-frequency", str(epochs), "--linear-frequency", str(epochs)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((folder / "results.jsonl").read_text().splitlines()[-1])
    log_text = (folder / "out.log").read_text()
    metrics["epoch_seconds"] = [float(s) for s in re.findall(r"epoch \d+ trained in ([0-9.]+) s", log_text)]
    return metrics


def teacher_state_dict(run: Path) -> Path:
    """The trained tiny CLIP as an open_clip state dict (`--clip-teacher-tag` loads it), its logit scale included."""
    import torch

    checkpoint = torch.load(run / "checkpoints" / "epoch_latest.pt", weights_only=True)
    state = {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("image_tower.backbone."):
            state["visual." + key.removeprefix("image_tower.backbone.")] = value
        elif key.startswith("text_tower.model."):
            state[key.removeprefix("text_tower.model.")] = value
    state["logit_scale"] = checkpoint["loss_state"]["logit_scale"]
    path = run / "teacher-open_clip.pt"
    torch.save(state, path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=3200, help="CIFAR-10 training rows (class-balanced shuffle)")
    parser.add_argument("--teacher-model", default="protorkd-tiny-rn-clip", help="open_clip architecture")
    parser.add_argument("--teacher-rows", type=int, default=5000, help="CIFAR-10 rows the teacher trains on")
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--student-epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--augmentation", default=None, help="--augmentation of the students (default: RRC 0.9-1)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = SHARED / "clip_prompts" / "clip_zeroshot_prompts.json"
    tsv, eval_root = write_cifar10(args.out, SHARED / "cifar10_jpg", prompts, 100, 200, 0)
    data = ["--train-data", str(tsv), "--eval-data-dir", str(eval_root), "--dataset-size", str(args.rows)]

    clip_model = ["--image-model-builder", "open_clip", "--image-model", args.teacher_model]
    clip_model += ["--text-model-builder", "open_clip", "--text-model", args.teacher_model]
    clip_model += ["--teacher", "none", "--image-head-n-layers", "0", "--text-head-n-layers", "0"]
    teacher_data = [*data[:-1], str(args.teacher_rows)]
    teacher = train(args.out, "teacher", [*teacher_data, *clip_model, "--loss", "InfoNCE"], args.teacher_epochs, 0)
    print(f"teacher: zero-shot {teacher['zeroshot/cifar10/top1']:.1f}, linear {teacher['linear/cifar10/top1']:.1f}")
    clip = [
        "--clip-teacher-model",
        args.teacher_model,
        "--clip-teacher-tag",
        str(teacher_state_dict(args.out / "runs" / "teacher")),
    ]
    student = [*data, *STUDENT, *(["--augmentation", args.augmentation] if args.augmentation else [])]
    configs = {
        "InfoNCE": [*student, "--loss", "InfoNCE"],
        "CLIP-KD, teacher online": [*student, "--loss", "CLIP-KD", *clip, "--clip-teacher-images", "online"],
        "CLIP-KD, teacher cached": [*student, "--loss", "CLIP-KD", *clip, "--clip-teacher-images", "cached"],
    }
    tag = args.augmentation or "default"
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for seed in range(args.seeds):
        order = list(enumerate(configs.items()))
        for index, (name, config) in order if seed % 2 == 0 else order[::-1]:
            metrics = train(args.out, f"{tag}-s{seed}-{index}", config, args.student_epochs, seed)
            results[name].append(metrics)
            print(f"seed {seed} {name}: {json.dumps({k: v for k, v in metrics.items() if '/top1' in k})}", flush=True)
    (args.out / f"results-{tag}.json").write_text(json.dumps(results, indent=1))

    def steady(name: str) -> float:
        return statistics.median(s for run in results[name] for s in run["epoch_seconds"][1:])

    def mean(name: str, key: str) -> str:
        values = [run[key] for run in results[name]]
        return f"{statistics.mean(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})"

    zeroshot, linear = teacher["zeroshot/cifar10/top1"], teacher["linear/cifar10/top1"]
    print(f"\nteacher: zero-shot {zeroshot:.1f}, linear probe {linear:.1f}")
    print("\n| student | zero-shot top-1 (per seed) | linear-probe top-1 (per seed) | s / epoch | ratio to InfoNCE |")
    print("|---|---:|---:|---:|---:|")
    for name in configs:
        zeroshot, linear = mean(name, "zeroshot/cifar10/top1"), mean(name, "linear/cifar10/top1")
        print(f"| {name} | {zeroshot} | {linear} | {steady(name):.2f} | {steady(name) / steady('InfoNCE'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
