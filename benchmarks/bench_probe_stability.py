"""How far a 1-ulp change of the training features moves the linear probes on nearly collapsed features.

    python benchmarks/bench_probe_stability.py [--seeds 12] [--noise-ulps 0,24] [--protocols cv,clip_benchmark]

The features are tests/eval/test_linear_probe.py's `_collapsed` case (300 train / 1,000 test, 128 dims, 10
classes: one shared vector, 16 dimensions varying by 1e-6), with the 112 flat dimensions either constant or
carrying Gaussian noise of `--noise-ulps` ulps. Half the training entries move by one ulp; the table gives,
per protocol and noise level, the test top-1 before and after on each seed, and the largest change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.eval.test_linear_probe import _collapsed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--noise-ulps", default="0,24")
    parser.add_argument("--protocols", default="cv,clip_benchmark")
    args = parser.parse_args()
    from protorkd.eval.linear_clip_benchmark import clip_benchmark_linear_probe
    from protorkd.eval.linear_probe import cv_linear_probe

    probes = {"cv": cv_linear_probe, "clip_benchmark": clip_benchmark_linear_probe}
    torch.set_num_threads(1)
    print("protocol | noise (ulps) | top-1 before -> after a 1-ulp change, per seed | largest change")
    for protocol in args.protocols.split(","):
        for ulps in (float(u) for u in args.noise_ulps.split(",")):
            pairs = []
            for seed in range(args.seeds):
                train, perturbed, labels, test, test_labels = _collapsed(seed=seed, noise_ulps=ulps)
                before, after = (
                    probes[protocol](x, labels, test, test_labels).metrics["top1"] for x in (train, perturbed)
                )
                pairs.append((before, after))
            shown = ", ".join(f"{a:.1f}->{b:.1f}" for a, b in pairs)
            print(f"{protocol} | {ulps:g} | {shown} | {max(abs(a - b) for a, b in pairs):.1f}", flush=True)


if __name__ == "__main__":
    main()
