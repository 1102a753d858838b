"""The main command as a new user runs it: `protorkd train` with no arguments, from an empty cache.

    python benchmarks/bench_demo.py                 # one run, ~2.5 min on 2 cores
    python benchmarks/bench_demo.py --repeats 2 -- --batch-size 128   # extra train flags after --
    python benchmarks/bench_demo.py --levers        # each speed lever switched off in turn, one epoch each
    python benchmarks/bench_demo.py --levers -- --train-data T.tsv --image-model resnet9-tiny   # on another recipe

`--levers` trains one epoch of the demo (its corpus and teacher cache shared, evaluation off) with all the
levers on and with each switched off, interleaved over `--rounds` rounds, and prints seconds per epoch and
the ratio to all-levers-on; channels_last, which has no flag, is timed on the student alone (forward +
backward + AdamW, bf16 autocast where the CPU has it), interleaved with and without it.

Each run gets a fresh `PROTORKD_CACHE` (the demo corpus is generated and the teacher's features encoded
again, as on a fresh clone) and its own logs folder. Prints the machine (CPU model, cores, load), the wall
time of the whole command, and each phase's seconds as `out.log` reports them: corpus, teacher encoding,
training batches (decoding the images into memory), each epoch's training, each evaluation task, and what is
left (interpreter start-up and imports, model building, checkpoints). Writes OUT/bench_demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict:
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "bf16_instructions": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "cores": os.cpu_count(),
        "load_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }


PHASES = {
    "corpus": r"corpus .*\(ready in ([0-9.]+) s\)",
    "teacher": r"teacher features ready in ([0-9.]+) s",
    "batches": r"training batches ready in ([0-9.]+) s",
}


def phases(log: str) -> dict:
    """Seconds per phase, read from out.log."""
    found: dict = {}
    for name, pattern in PHASES.items():
        match = re.search(pattern, log)
        if match:
            found[name] = float(match.group(1))
    found["train_epochs"] = [float(s) for s in re.findall(r"epoch \d+ trained in ([0-9.]+) s", log)]
    evaluations: list[dict] = []
    for task, dataset, seconds in re.findall(r"\| (zeroshot|linear|retrieval|analysis|sts) (\S+): ([0-9.]+) s", log):
        if task == "zeroshot" and dataset == "shapes" or not evaluations:
            evaluations.append({})
        evaluations[-1][f"{task} {dataset}"] = float(seconds)
    found["evaluations"] = evaluations
    speeds = [float(s) for s in re.findall(r"samples_per_second ([0-9.]+)", log)]
    found["samples_per_second_median"] = sorted(speeds)[len(speeds) // 2] if speeds else None
    return found


def run_once(extra: list[str], work: Path) -> dict:
    env = {**os.environ, "PROTORKD_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "protorkd", "train", "--logs", str(work / "logs"), "--name", "demo", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"protorkd train failed ({result.returncode}):\n{result.stderr[-3000:]}")
    log = (work / "logs" / "demo" / "out.log").read_text()
    final = json.loads((work / "logs" / "demo" / "results.jsonl").read_text().splitlines()[-1])
    measured = phases(log)
    accounted = sum(v for k, v in measured.items() if k in PHASES) + sum(measured["train_epochs"])
    accounted += sum(sum(e.values()) for e in measured["evaluations"])
    return {
        "wall_seconds": round(wall, 1),
        "captured_output_lines": len((result.stdout + result.stderr).splitlines()),
        "captured_carriage_returns": (result.stdout + result.stderr).count("\r"),  # progress bars: none off a terminal
        **measured,
        "other_seconds": round(wall - accounted, 1),
        "zeroshot_top1": final.get("zeroshot/shapes/top1"),
        "zeroshot_unseen_top1": final.get("zeroshot/shapes_unseen/top1"),
        "zeroshot_skewed_top1": final.get("zeroshot/shapes_skewed/top1"),
        "zeroshot_skewed_mean_per_class_recall": final.get("zeroshot/shapes_skewed/mean_per_class_recall"),
        "linear_top1": final.get("linear_clip_benchmark_joint/shapes/top1"),
        "unseen_text_to_image_R@1": final.get("retrieval/shapes_unseen/text_to_image_R@1"),
        "unseen_image_to_text_R@1": final.get("retrieval/shapes_unseen/image_to_text_R@1"),
    }


LEVERS = {
    "all levers on (defaults)": [],
    "fp32 (--precision fp32)": ["--precision", "fp32"],
    "images read from files, 2 workers (--in-memory off)": ["--in-memory", "off", "--workers", "2"],
    "batch 256, lr 4e-3 (instead of 64, 2e-3)": ["--batch-size", "256", "--lr", "4e-3", "--warmup", "12"],
    "glibc's adaptive mmap threshold (--malloc-mmap-threshold-mb 0)": ["--malloc-mmap-threshold-mb", "0"],
}


def epoch_seconds(extra: list[str], work: Path, name: str) -> float:
    env = {**os.environ, "PROTORKD_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "protorkd", "train", "--logs", str(work / "logs"), "--name", name]
    command += ["--epochs", "1", "--zeroshot-frequency", "0", "--linear-frequency", "0"]
    command += ["--retrieval-frequency", "0", "--teacher-cache", str(work / "teacher"), *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-2000:]}")
    log = (work / "logs" / name / "out.log").read_text()
    return float(re.search(r"epoch 1 trained in ([0-9.]+) s", log).group(1))


def channels_last_rates(rounds: int, steps: int = 20) -> dict[str, float]:
    """Student images/s (tiny-cnn, batch 64, 64 px, fwd + bwd + AdamW) with and without channels_last."""
    import statistics

    import torch

    from protorkd.models.tiny import TinyCNN
    from protorkd.precision import Precision

    precision = Precision.resolve("auto", torch.device("cpu"))
    rates: dict[str, list[float]] = {"channels_last": [], "contiguous (NCHW)": []}
    models = {}
    for name in rates:
        torch.manual_seed(0)
        model = TinyCNN()
        if name == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    images = torch.randn(64, 3, 64, 64)

    def run(name: str, count: int) -> float:
        model, optimizer = models[name]
        batch = images.contiguous(memory_format=torch.channels_last) if name == "channels_last" else images
        started = time.perf_counter()
        for _ in range(count):
            with precision.autocast("cpu"):
                loss = model(batch).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return count * 64 / (time.perf_counter() - started)

    for name in rates:
        run(name, 3)  # warm-up
    for _ in range(rounds):
        for name in rates:
            rates[name].append(run(name, steps))
    return {name: statistics.median(values) for name, values in rates.items()} | {"precision": precision}


def levers(rounds: int, out: Path, base: list[str]) -> dict:
    import statistics

    seconds: dict[str, list[float]] = {name: [] for name in LEVERS}
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as folder:
        work = Path(folder)
        epoch_seconds(base, work, "warm-up")  # generates the corpus and fills the teacher cache once
        for round_ in range(rounds):
            for index, (name, extra) in enumerate(LEVERS.items()):
                seconds[name].append(epoch_seconds([*base, *extra], work, f"r{round_}-{index}"))
                print(f"round {round_ + 1} {name}: {seconds[name][-1]:.1f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    reference = medians["all levers on (defaults)"]
    print("\n| configuration | s / epoch | x all levers on |\n|---|---:|---:|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value / reference:.2f} |")
    layout = channels_last_rates(rounds)
    print(f"\nstudent alone ({layout['precision']}): channels_last {layout['channels_last']:.0f} images/s, "
          f"NCHW {layout['contiguous (NCHW)']:.0f} images/s")  # fmt: skip
    return {"seconds_per_epoch": seconds, "medians": medians, "channels_last": layout}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs, one after another (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_demo.json (default: a temp dir)")
    parser.add_argument("--levers", action="store_true", help="time one epoch with each speed lever switched off")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of --levers (default 2)")
    parser.add_argument("extra", nargs="*", help="extra `protorkd train` flags, after --")
    args = parser.parse_args()
    info = machine()
    bf16 = ", ".join(info["bf16_instructions"]) or "no bf16 instructions"
    print(
        f"machine: {info['cpu']} ({bf16}), {info['cores']} cores, load {info['load_before']:.2f}, "
        f"Python {info['python']}"
    )
    if args.levers:
        out = args.out or Path(tempfile.mkdtemp(prefix="bench-levers-out-"))
        out.mkdir(parents=True, exist_ok=True)
        result = {"machine": info, **levers(args.rounds, out, args.extra)}
        (out / "bench_levers.json").write_text(json.dumps(result, indent=1))
        print(f"written {out / 'bench_levers.json'}")
        return 0
    runs = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-demo-") as folder:
            run = run_once(args.extra, Path(folder))
        runs.append(run)
        minutes, seconds = divmod(run["wall_seconds"], 60)
        print(f"run {repeat + 1}: {int(minutes)} min {seconds:.0f} s wall, zero-shot {run['zeroshot_top1']:.2f}")
        print(json.dumps(run, indent=1))
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-demo-out-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_demo.json").write_text(json.dumps({"machine": info, "extra": args.extra, "runs": runs}, indent=1))
    print(f"written {out / 'bench_demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
