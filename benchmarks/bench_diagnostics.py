"""What the representation diagnostics add to an evaluation: the demo's per-epoch evaluation, timed with and
without them, interleaved.

    python benchmarks/bench_diagnostics.py --checkpoint logs/RUN/checkpoints/epoch_4.pt [--rounds 3] [--samples 1000]

Per round: the training loop's per-epoch call, `run_suite(model, ROOT, tasks=["zeroshot"], options)` with a
`FeatureCache` kept across rounds (as training keeps one: the zero-shot classifiers and the locked text
teacher's caption features are computed once, in a warm-up round that is not counted), once with
`diagnostics_sample=0` (zero-shot only) and once per --samples value (zero-shot + diagnostics on at most that
many images per captioned dataset; default: `EvalOptions`' default). Prints each
task and dataset's seconds (the median over rounds) and the ratio of the totals. ROOT: --eval-data-dir, or
the checkpoint's demo corpus' eval folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cpu() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a demo run's checkpoint")
    parser.add_argument("--eval-data-dir", type=Path, default=None, help="data root (default: the demo corpus')")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each configuration")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (training's: 256)")
    parser.add_argument("--samples", default="", help="comma-separated diagnostics sample sizes (default: the default)")
    args = parser.parse_args()

    import torch

    from protorkd.commands.common import load_model_from_checkpoint
    from protorkd.data.demo import ensure_demo_corpus
    from protorkd.eval.features import FeatureCache
    from protorkd.eval.suite import EvalOptions, run_suite

    model = load_model_from_checkpoint(args.checkpoint).model.eval()
    root = args.eval_data_dir or ensure_demo_corpus() / "eval"
    cache = FeatureCache()
    samples = [int(n) for n in args.samples.split(",") if n] or [EvalOptions().diagnostics_sample]
    configurations = {"zero-shot only": 0, **{f"zero-shot + diagnostics ({n} images)": n for n in samples}}
    seconds: dict[str, dict[str, list[float]]] = {name: {} for name in configurations}
    for round_ in range(args.rounds + 1):  # round 0 warms the cache, as a run's first evaluation does
        for name, sample in configurations.items():
            options = EvalOptions(device="cpu", batch_size=args.batch_size, cache=cache, diagnostics_sample=sample)
            started = time.perf_counter()
            result = run_suite(model, root, tasks=["zeroshot"], options=options)
            total = time.perf_counter() - started
            if round_ == 0:
                continue
            for task in result.results:
                seconds[name].setdefault(f"{task.task} {task.dataset}", []).append(task.seconds)
            seconds[name].setdefault("total", []).append(total)
    print(f"{_cpu()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, median s")
    print("| configuration | part | seconds |\n|---|---|---:|")
    for name, parts in seconds.items():
        for part, values in parts.items():
            print(f"| {name} | {part} | {statistics.median(values):.2f} |")
    base = statistics.median(seconds["zero-shot only"]["total"])
    for name in list(configurations)[1:]:
        print(f"{name} / zero-shot only: {statistics.median(seconds[name]['total']) / base:.2f}x")


if __name__ == "__main__":
    main()
