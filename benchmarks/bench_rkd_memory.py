"""Peak memory and time of the RKD angle term (forward + backward) against batch size, chunked vs unchunked.

Unchunked materialises the [N, N, N] angle tensors (and their gradients); chunked processes a few anchors
at a time under activation checkpointing (protorkd.losses.relational.rkd_angle_loss). Each measurement runs
in a fresh subprocess; on the CPU the peak is the process's max RSS above its level after the inputs were
made, on CUDA torch.cuda.max_memory_allocated.

    python benchmarks/bench_rkd_memory.py [--sizes 128,256,512,1024] [--dim 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(n: int, dim: int, chunk: int, device: str) -> None:
    import torch

    from protorkd.losses.relational import rkd_angle_loss

    torch.manual_seed(0)
    student = torch.nn.functional.normalize(torch.randn(n, dim, device=device), dim=-1).requires_grad_()
    teacher = torch.nn.functional.normalize(torch.randn(n, dim, device=device), dim=-1)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loss = rkd_angle_loss(student, teacher, chunk=chunk)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_bytes": peak, "loss": loss.item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256,512,1024")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--naive-limit", type=int, default=512, help="largest N run unchunked (N^3 floats)")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child[:2], args.child[2], args.device)
        return
    print(f"RKD angle term, forward + backward, D = {args.dim}, device {args.device}")
    print(f"{'N':>6} {'mode':<10} {'peak MiB':>9} {'seconds':>8} {'loss':>12}")
    for n in [int(s) for s in args.sizes.split(",")]:
        for mode, chunk in (("unchunked", n), ("chunked", 0)):
            if mode == "unchunked" and n > args.naive_limit:
                print(f"{n:>6} {mode:<10} {'skipped':>9}   (~{6 * 4 * n**3 / 2**20:.0f} MiB of angle tensors)")
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--child", str(n), str(args.dim), str(chunk)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>6} {mode:<10} {r['peak_bytes'] / 2**20:>9.0f} {r['seconds']:>8.2f} {r['loss']:>12.6g}")


if __name__ == "__main__":
    main()
