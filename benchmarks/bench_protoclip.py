"""ProtoCLIP's epoch time against plain InfoNCE, side by side in one run (interleaved), on the CPU.

The demo setting (`--teacher text`: tiny-cnn image student, the locked all-MiniLM-L6-v2 text teacher read
from its feature cache), episodes of `--episode-size` rows drawn with replacement, batch 64, one torch thread
and one loader worker per run. Configurations:

  InfoNCE                       the baseline
  ProtoCLIP, episode            the default, ProtoCLIP's method: before each episode one extraction pass over it
                                (eval mode, inference mode, only the image tower runs: the teacher's
                                side comes from the cache), then k-means, back translation, training
  ProtoCLIP, previous-epoch     `--cluster-features previous-epoch`: clusters the previous epoch's training features

ProtoCLIP runs with `--add-projection-head --PBT` and clusters every epoch. Each configuration trains
`--repeats` times, in alternating order; the epoch time is the loop's "epoch N trained in X s" (clustering
included), median over epochs 2+ of every repeat. Target (issue 12): ProtoCLIP / InfoNCE <= 1.3.

    python benchmarks/bench_protoclip.py --out /tmp/bench-protoclip          # ~6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path


def epoch_seconds(out: Path, name: str, args: list[str]) -> list[float]:
    """Train once; the per-epoch seconds (clustering included) from out.log."""
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
    parser.add_argument("--episode-size", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        "--demo-size",
        str(args.demo_size),
        "--episode-size",
        str(args.episode_size),
        "--epochs",
        str(args.epochs),
    ]
    protoclip = ["--loss", "ProtoCLIP", "--add-projection-head", "--PBT", "--k", str(args.k)]
    configs = {
        "InfoNCE": [*common, "--loss", "InfoNCE"],
        "ProtoCLIP, episode": [*common, *protoclip],
        "ProtoCLIP, previous-epoch": [*common, *protoclip, "--cluster-features", "previous-epoch"],
    }
    epoch_seconds(args.out, "fill-cache", [*configs["InfoNCE"], "--epochs", "1"])
    times: dict[str, list[list[float]]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        order = list(enumerate(configs.items()))
        for index, (name, config) in order if repeat % 2 == 0 else order[::-1]:
            times[name].append(epoch_seconds(args.out, f"r{repeat}-{index}", config))
            print(f"repeat {repeat} {name}: {times[name][-1]}", flush=True)

    def steady(name: str) -> float:  # epochs after the first (worker start-up, one-time imports)
        return statistics.median(s for run in times[name] for s in run[1:])

    print("\n| configuration | s / epoch (epochs 2+, median) | ratio to InfoNCE |\n|---|---:|---:|")
    for name in configs:
        print(f"| {name} | {steady(name):.2f} | {steady(name) / steady('InfoNCE'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
