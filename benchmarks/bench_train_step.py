"""Training-step throughput and peak memory: ProtoRKD's InfoNCE step vs open_clip's own step.

Both train the same open_clip architecture (image + text towers, random init) on the same in-memory
batches with AdamW and the same precision; the two are interleaved in one process (A B A B ...) so
machine noise hits both alike. ProtoRKD's side is its DualEncoder (open_clip towers) + InfoNCE loss,
stepped the way `protorkd.train.loop` steps it (channels_last + fused AdamW on CUDA); open_clip's side is
`open_clip.create_model` + `open_clip.loss.ClipLoss`, as open_clip_train steps it.

    python benchmarks/bench_train_step.py                      # CPU: protorkd-tiny-clip, batch 64, fp32
    python benchmarks/bench_train_step.py --precision amp_bf16 # CPU with bf16 autocast (--precision auto's choice)
    python benchmarks/bench_train_step.py --model ViT-B-32 --batch-size 256 --precision amp_bf16   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import open_clip
import torch
from open_clip.loss import ClipLoss

from protorkd.losses import LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.models.build import build_dual_encoder
from protorkd.models.open_clip_models import register_open_clip_configs
from protorkd.models.options import ModelOptions
from protorkd.precision import Precision


def autocast(device: torch.device, precision: str):
    """open_clip_train's autocast (`torch.amp.autocast(device_type=...)`): amp_bf16 autocasts on the CPU too."""
    if precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda" and precision == "amp":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def make_protorkd_step(model_name, device, precision, lr):
    model = build_dual_encoder(
        ModelOptions(
            image_model_builder="open_clip",
            image_model=model_name,
            text_model_builder="open_clip",
            text_model=model_name,
            teacher="none",
            image_head_n_layers=0,
            text_head_n_layers=0,
        )
    ).to(device)
    loss_fn = build_loss("InfoNCE", LossOptions(), model.embed_dim).to(device)
    model.image_tower.to(memory_format=torch.channels_last)  # as train/run.py does, on every device
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and precision == "amp" else None
    model.train()

    def step(images, tokens):
        images = images.contiguous(memory_format=torch.channels_last)  # as train/task.py does
        with Precision(precision).autocast(device):  # protorkd's own choice (train/task.py)
            out = model(images=images, tokens={"input_ids": tokens})
            total = sum(loss_fn(LossInputs(out.image, out.text, teacher="none")).values())
        (scaler.scale(total) if scaler else total).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def make_open_clip_step(model_name, device, precision, lr):
    model = open_clip.create_model(model_name, device=device)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and precision == "amp" else None
    model.train()

    def step(images, tokens):
        with autocast(device, precision):
            image_features, text_features, logit_scale = model(images, tokens)
            total = loss_fn(image_features, text_features, logit_scale)
        (scaler.scale(total) if scaler else total).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        return total

    return step


def measure(step, batches, device, steps):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        images, tokens = batches[i % len(batches)]
        step(images, tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return steps * batches[0][0].shape[0] / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="protorkd-tiny-clip", help="open_clip architecture")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per measurement round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per side")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp", "amp_bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    register_open_clip_configs()
    device = torch.device(args.device)
    torch.manual_seed(0)
    size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]
    context = open_clip.get_model_config(args.model)["text_cfg"].get("context_length", 77)
    vocab = open_clip.get_model_config(args.model)["text_cfg"].get("vocab_size", 49408)
    batches = [
        (
            torch.randn(args.batch_size, 3, size, size, device=device),
            torch.randint(1, vocab, (args.batch_size, context), device=device),
        )
        for _ in range(4)
    ]
    sides = {
        "protorkd": make_protorkd_step(args.model, device, args.precision, 1e-4),
        "open_clip": make_open_clip_step(args.model, device, args.precision, 1e-4),
    }
    for step in sides.values():  # warm-up (allocator, kernels)
        measure(step, batches, device, 3)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, step in sides.items():
            results[name].append(measure(step, batches, device, args.steps))
    rate = {name: statistics.median(r[0] for r in rows) for name, rows in results.items()}
    peak = {name: max(r[1] for r in rows) for name, rows in results.items()}
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), model {args.model}, "
        f"batch {args.batch_size}, precision {args.precision}, {args.rounds} interleaved rounds x {args.steps} steps"
    )
    print(f"{'side':<10} {'samples/s':>10} {'peak GiB':>9}")
    for name in sides:
        print(f"{name:<10} {rate[name]:>10.1f} {peak[name]:>9.2f}")
    print(f"ratio protorkd/open_clip samples/s: {rate['protorkd'] / rate['open_clip']:.3f}")


if __name__ == "__main__":
    main()
