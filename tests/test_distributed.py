"""The process group's timeout is the --dist-timeout-minutes flag, not NCCL's 10-minute default."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from protorkd import distributed
from protorkd.config import Config, OptimConfig
from protorkd.distributed import DistState


def test_the_process_group_timeout_comes_from_the_flag(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    for name in ("RANK", "WORLD_SIZE"):  # init_process_group sets them: recorded (absent), so gone again after the
        monkeypatch.setenv(name, "")  # test; left behind, every later in-process run thinks it is one of 2 processes
        monkeypatch.delenv(name)
    distributed.init_process_group(DistState(rank=1, local_rank=1, world_size=2), "cuda", timeout_minutes=7)
    distributed.init_process_group(DistState(rank=0, local_rank=0, world_size=2), "cpu")
    assert calls == [
        {"backend": "nccl", "rank": 1, "world_size": 2, "timeout": timedelta(minutes=7)},
        {"backend": "gloo", "rank": 0, "world_size": 2, "timeout": timedelta(hours=3)},
    ]
    assert Config(optim=OptimConfig()).optim.dist_timeout_minutes == 180  # the flag's default: 3 hours
