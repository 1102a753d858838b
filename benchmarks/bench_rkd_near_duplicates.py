"""RKD on a batch with two near-duplicate student rows: the original code's loss and gradient against ours.

The original is ITRA's `itra/loss/RKD.py` (the RKD of the original ProtoRKD code; its angle term is Park et
al.'s lenscloth/RKD `metric/loss.py:RKdAngle` after an L2 normalisation), as transcribed in
tests/losses/test_relational_loss.py: difference vectors x_j - x_i formed explicitly, `F.normalize`d (eps
1e-12), angles by `bmm`.
"fp32" runs everything in float32; "bf16" rounds the features to bfloat16 (what a bf16 model emits)
and runs the original under CPU bf16 autocast (as the original's amp does), ours on those rows cast to
float32 (as `Task.forward` hands them to the loss). Both sides are L2-normalised first, as ITRA and our
`RKD` do. Rows 0 and 1 of the student are `delta` apart (row 1 = row 0 plus a random direction of length
delta, renormalised); the other rows and the teacher's are random unit rows.

    python benchmarks/bench_rkd_near_duplicates.py [--n 8] [--dim 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from protorkd.losses.relational import rkd_angle_loss, rkd_distance_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.losses.test_relational_loss import itra_rkd  # noqa: E402  (the transcription of the original)


def original_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return itra_rkd(teacher, student, w_rkd_d=1.0)[0]


def original_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return itra_rkd(teacher, student)[1]


def ours_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return rkd_distance_loss(F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1))


def ours_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return rkd_angle_loss(F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1))


def batch(n: int, dim: int, delta: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
    direction = F.normalize(torch.randn(dim, generator=generator), dim=0)
    student[1] = F.normalize(student[0] + delta * direction, dim=0)
    teacher = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
    return student, teacher


def measure(loss_fn, student: torch.Tensor, teacher: torch.Tensor, precision: str) -> tuple[float, float]:
    """(loss, gradient norm w.r.t. the float32 student rows)."""
    leaf = student.clone().requires_grad_()
    if precision == "bf16":
        inputs, target = leaf.to(torch.bfloat16), teacher.to(torch.bfloat16)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if loss_fn.__name__.startswith("original") else None
    else:
        inputs, target, context = leaf, teacher, None
    with context or contextlib.nullcontext():
        loss = loss_fn(inputs, target)
    loss.float().backward()
    return float(loss.detach()), float(leaf.grad.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    functions = {
        "angle: original": original_angle_loss,
        "angle: protorkd": ours_angle_loss,
        "distance: original": original_distance_loss,
        "distance: protorkd": ours_distance_loss,
    }
    print(f"RKD, N = {args.n}, D = {args.dim}, seed {args.seed}: loss (gradient norm) with rows 0 and 1 delta apart")
    deltas = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 0.0)
    print(f"{'term':<20} {'prec':<5}" + "".join(f"{f'delta={d:g}':>24}" for d in deltas))
    for name, function in functions.items():
        for precision in ("fp32", "bf16"):
            cells = []
            for delta in deltas:
                student, teacher = batch(args.n, args.dim, delta, args.seed)
                value, gradient = measure(function, student, teacher, precision)
                cells.append(f"{value:>10.4g} ({gradient:>9.3g})")
            print(f"{name:<20} {precision:<5}" + "".join(f"{cell:>24}" for cell in cells))


if __name__ == "__main__":
    main()
