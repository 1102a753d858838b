"""Peak memory (RSS) of the linear probes on synthetic features of ImageNet's size: 1,281,167 x 512 by default.

    python benchmarks/bench_probe_memory.py [--rows 1281167] [--dim 512] [--classes 10] [--test-rows 50000]
        [--protocols cv,clip_benchmark] [--max-iter 5] [--epochs 1] [--before-rev REV]

Each measurement runs in a fresh process: it draws the features (float32 Gaussian blobs, `--classes` classes),
notes its peak RSS (`resource.getrusage`: the features alone), runs the probe, and notes the peak again. The
table gives both, their difference (what the probe adds) and that difference in units of the training
features' size. Memory does not depend on how long the solver runs, so the run is shortened to keep it to
minutes on a CPU: the cv probe searches 3 L2 values (`L2Grid(-6, 2, 3, 3)`, each still 5 folds + the refit) with
at most `--max-iter` L-BFGS iterations per fit; CLIP_benchmark's probe trains `--epochs` epochs.
`--before-rev REV` also measures the cv probe as it was at git revision REV (its logistic.py and
linear_probe.py, imported from `git show`), e.g. 93142bd, the last commit before the streaming solver.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def synthetic(rows: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, dim] float32 blobs around `classes` centres, drawn in place (no float64 or second copy)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % classes
    features = torch.randn(rows, dim, generator=generator)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 0.3
    for start in range(0, rows, 1 << 16):
        features[start : start + (1 << 16)] += centres[labels[start : start + (1 << 16)]]
    return features, labels


def before_module(rev: str):
    """The cv probe of git revision `rev`, importable without touching the installed package."""
    folder = Path(tempfile.mkdtemp())
    for name in ("logistic", "linear_probe"):
        text = subprocess.run(
            ["git", "-C", str(HERE.parent), "show", f"{rev}:src/protorkd/eval/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        text = text.replace("from protorkd.eval.logistic import", "from before_logistic import")
        (folder / f"before_{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("before_linear_probe")


def child(args: argparse.Namespace) -> None:
    from protorkd.eval import logistic
    from protorkd.eval.linear_clip_benchmark import clip_benchmark_linear_probe
    from protorkd.eval.linear_probe import L2Grid, cv_linear_probe

    train_x, train_y = synthetic(args.rows, args.dim, args.classes, 0)
    test_x, test_y = synthetic(args.test_rows, args.dim, args.classes, 1)
    features_peak = peak_rss_bytes()
    grid = L2Grid(-6.0, 2.0, 3, 3)
    started = time.perf_counter()
    if args.child in ("cv", "before"):
        module = before_module(args.before_rev) if args.child == "before" else None
        target = (
            sys.modules["before_logistic"].LogisticRegressionProblem if module else logistic.LogisticRegressionProblem
        )
        fit = target.fit
        target.fit = lambda self, l2, init=None, **kw: fit(self, l2, init, max_iter=args.max_iter)
        if module:
            result = module.linear_probe(train_x, train_y, test_x, test_y, grid=module.L2Grid(-6.0, 2.0, 3, 3))
        else:
            result = cv_linear_probe(train_x, train_y, test_x, test_y, grid=grid).metrics
    else:
        result = clip_benchmark_linear_probe(train_x, train_y, test_x, test_y, epochs=args.epochs).metrics
    print(
        json.dumps(
            {
                "features_peak": features_peak,
                "peak": peak_rss_bytes(),
                "train_bytes": train_x.numel() * 4,
                "seconds": time.perf_counter() - started,
                "top1": result["top1"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--test-rows", type=int, default=50_000)
    parser.add_argument("--protocols", default="cv,clip_benchmark", help="comma-separated: cv, clip_benchmark")
    parser.add_argument("--max-iter", type=int, default=5, help="L-BFGS iterations per cv fit (memory is the same)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of CLIP_benchmark's probe (memory is the same)")
    parser.add_argument("--before-rev", help="also measure the cv probe of this git revision")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    runs = args.protocols.split(",") + (["before"] if args.before_rev else [])
    gib = 1 << 30
    print(f"{args.rows} x {args.dim} float32 training features ({args.rows * args.dim * 4 / gib:.2f} GiB), "
          f"{args.test_rows} test, {args.classes} classes, torch {torch.__version__}")  # fmt: skip
    print("probe | peak RSS, features only | peak RSS, probe | probe adds | in training-feature sizes | seconds")
    for run in runs:
        command = [sys.executable, __file__, "--child", run, *sys.argv[1:]]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        added = r["peak"] - r["features_peak"]
        name = f"cv @ {args.before_rev}" if run == "before" else run
        print(
            f"{name} | {r['features_peak'] / gib:.2f} GiB | {r['peak'] / gib:.2f} GiB | {added / gib:.2f} GiB | "
            f"{added / r['train_bytes']:.2f} | {r['seconds']:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
