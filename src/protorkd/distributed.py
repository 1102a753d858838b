"""Distributed state and the few collectives the library uses.

Everything runs with world size 1 and no process group; the collectives below are then identities.
The state comes from the environment that torchrun or SLURM sets (RANK/WORLD_SIZE/LOCAL_RANK or
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from protorkd.errors import UsageError


@dataclass(frozen=True)
class DistState:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def state_from_env(env: dict[str, str] | None = None) -> DistState:
    """Read rank, local rank and world size from torchrun's or SLURM's variables."""
    env = dict(os.environ) if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistState(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistState(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return DistState()


def resolve_device(name: str, state: DistState | None = None) -> torch.device:
    """The device `--device NAME` means for this process: "auto" is CUDA when available, else the CPU;
    "cuda" under several processes is this process's local GPU. A CUDA device becomes the current one."""
    state = state or DistState()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and state.distributed:
        name = f"cuda:{state.local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name}: not a device name (cpu, cuda, cuda:N or auto)") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
        if device.index is None:  # set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


DEFAULT_TIMEOUT_MINUTES = 180.0


def init_process_group(state: DistState, device_type: str, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU) when more than one process runs.

    `timeout_minutes` bounds every collective, barriers included. It is generous on purpose: rank 0 alone
    fills the teacher cache and evaluates while the other ranks wait in a barrier, and NCCL's own default
    (10 minutes) would kill a job whose rank 0 fills a CC3M-scale cache (docs/distributed.md)."""
    if not state.distributed or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ and "SLURM_NODELIST" in os.environ:
        # SLURM without torchrun: the first host of the allocation is the rendezvous point.
        import subprocess

        host = subprocess.check_output(["scontrol", "show", "hostnames", os.environ["SLURM_NODELIST"]], text=True)
        os.environ["MASTER_ADDR"] = host.split()[0]
        os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", str(state.rank))
    os.environ.setdefault("WORLD_SIZE", str(state.world_size))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend, rank=state.rank, world_size=state.world_size, timeout=timedelta(minutes=timeout_minutes)
    )


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Barrier then destroy the group; without this gloo workers often abort at interpreter exit."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_cat(tensor: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """Concatenate `tensor` ([B, ...]) from every rank along dim 0, in rank order.

    Ranks may hold different B (a batch that lost unreadable samples): rows are padded to the largest
    B for the collective and the padding is removed again. With `with_grad`, gradients flow back to
    every rank's slice (torch.distributed.nn); otherwise only the local slice keeps its gradient.
    """
    if not is_initialized() or world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device))
    counts = [int(size.item()) for size in sizes]
    largest = max(counts)
    padded = tensor
    if tensor.shape[0] < largest:
        padding = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, padding], dim=0)
    if with_grad:
        import torch.distributed.nn as dist_nn

        gathered = list(dist_nn.all_gather(padded))
    else:
        gathered = [torch.zeros_like(padded) for _ in range(world_size())]
        dist.all_gather(gathered, padded.contiguous())
        gathered[rank()] = padded
    return torch.cat([part[:count] for part, count in zip(gathered, counts)], dim=0)


def gather_cat(tensor: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
    """Concatenate `tensor` ([B, ...], no gradient) from every rank on rank `dst` only, in rank order; None on the
    other ranks. Ranks may hold different B (padded for the collective). Every rank must call it."""
    if not is_initialized() or world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device))
    counts = [int(size.item()) for size in sizes]
    padded = tensor.detach()
    if tensor.shape[0] < max(counts):
        padded = torch.cat([padded, padded.new_zeros((max(counts) - tensor.shape[0], *tensor.shape[1:]))], dim=0)
    parts = [torch.empty_like(padded) for _ in counts] if rank() == dst else None
    dist.gather(padded.contiguous(), parts, dst=dst)
    if parts is None:
        return None
    return torch.cat([part[:count] for part, count in zip(parts, counts)], dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (no gradient); identity without a process group."""
    if not is_initialized() or world_size() == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced)
    return reduced / world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if not is_initialized() or world_size() == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced)
    return reduced


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast in place from `src`; returns the tensor for chaining."""
    if is_initialized() and world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (for parameters DDP does not own, e.g. a loss's)."""
    if not is_initialized() or world_size() == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.copy_(all_reduce_mean(parameter.grad))


def check_same_on_all_ranks(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Raise when the parameters differ between ranks: a silent divergence would make checkpoints rank-dependent."""
    with torch.no_grad():
        fingerprint = torch.stack([p.detach().double().sum() for p in parameters])
    gathered = all_gather_cat(fingerprint[None])
    if not torch.equal(gathered.min(dim=0).values, gathered.max(dim=0).values):
        raise RuntimeError("model parameters differ between ranks at the end of training")
