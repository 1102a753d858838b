"""The main command as a new user runs it: `protorkd train` with no arguments, from an empty cache.

    python benchmarks/bench_demo.py                 # one run, ~2.5 min on 2 cores
    python benchmarks/bench_demo.py --repeats 2 -- --batch-size 128   # extra train flags after --

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


def machine() -> dict:
    return {
        "cpu": cpu_model(),
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
        **measured,
        "other_seconds": round(wall - accounted, 1),
        "zeroshot_top1": final.get("zeroshot/shapes/top1"),
        "zeroshot_unseen_top1": final.get("zeroshot/shapes_unseen/top1"),
        "linear_top1": final.get("linear_joint/shapes/top1"),
        "unseen_text_to_image_R@1": final.get("retrieval/shapes_unseen/text_to_image_R@1"),
        "unseen_image_to_text_R@1": final.get("retrieval/shapes_unseen/image_to_text_R@1"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs, one after another (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_demo.json (default: a temp dir)")
    parser.add_argument("extra", nargs="*", help="extra `protorkd train` flags, after --")
    args = parser.parse_args()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_before']:.2f}, Python {info['python']}")
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
