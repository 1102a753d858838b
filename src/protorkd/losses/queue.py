"""Queue-based distillation: CompRess (Abbasi Koohpayegani et al., NeurIPS 2020) and SEED (Fang et al., ICLR 2021).

The student matches the teacher's similarity distribution over a FIFO memory queue of past
features. Queues are buffers (checkpointed with the loss). Under DDP (`losses.common`), as ITRA: SEED enqueues
every rank's teacher rows, so its queue is identical on all ranks; CompRess keeps a queue of its rank's rows
(`--distill-batch global`: both the gathered global batch).

How a queue starts (`--queue-init`): `random` (the default) is ITRA's (the original ProtoRKD code's): every
row random from the first step, the whole queue scored, the rows overwritten oldest first. CompRess's rows are
uniform in [-stdv, stdv] per entry, stdv = 1/sqrt(D/3) (ITRA's `SampleSimilarities`, from CompRess's code:
about unit norm, not normalised); SEED's are normalised Gaussian rows (ITRA's `SEED`, from MoCo). For
CompRess-1q this is a signal from the first step: teacher and student are scored against the same random
rows. They are drawn from a generator seeded with the run's seed (identical on every rank, a resumed run
reads them from the checkpoint). `empty` starts with no rows and scores only the filled part, so the first
step has nothing to score and returns a connected 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from protorkd.losses.base import LOCAL, LossInputs, LossModule, Scope
from protorkd.losses.common import kl_divergence, soft_cross_entropy, student_teacher, zero_with_grad

QUEUE_INITS = ("random", "empty")


def compress_random_rows(size: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[size, dim] CompRess's initial memory (ITRA `SampleSimilarities`): uniform in [-stdv, stdv] per entry,
    stdv = 1/sqrt(dim/3)."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(size, dim, generator=generator).mul_(2 * stdv).add_(-stdv)


def seed_random_rows(size: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[size, dim] SEED's initial queue (ITRA `SEED`: randn(dim, K) normalised over dim), one unit row per entry."""
    return F.normalize(torch.randn(dim, size, generator=generator), dim=0).T.contiguous()


class FeatureQueue(nn.Module):
    """A FIFO of the last `size` feature rows: buffers features [size, D], pointer, count.

    With `initial` rows [size, D] the queue starts full of them (count = size) and the first push overwrites
    its first rows; without, it starts empty.
    """

    def __init__(self, size: int, dim: int, initial: torch.Tensor | None = None) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be positive, got {size}")
        self.size = size
        features = torch.zeros(size, dim) if initial is None else initial.reshape(size, dim).clone()
        self.register_buffer("features", features)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.tensor(0 if initial is None else size, dtype=torch.long))

    def filled(self) -> torch.Tensor:
        """[M, D] copy of the rows written so far (M <= size); a copy, so later pushes do not affect autograd."""
        return self.features[: int(self.count)].clone()

    @torch.no_grad()
    def push(self, rows: torch.Tensor) -> None:
        """Write [N, D] rows after the newest ones, overwriting the oldest (only the last `size` if N > size)."""
        rows = rows.detach().to(self.features.dtype)[-self.size :]
        n = rows.shape[0]
        positions = (int(self.pointer) + torch.arange(n, device=self.features.device)) % self.size
        self.features[positions] = rows
        self.pointer.fill_((int(self.pointer) + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))


def _check_init(init: str) -> None:
    if init not in QUEUE_INITS:
        raise ValueError(f"queue init must be one of {QUEUE_INITS}, got {init!r}")


class CompRess(LossModule):
    """KL(softmax(t Q_t^T / T) || softmax(s Q^T / T)), batchmean over the global batch.

    Q is the teacher queue (CompRess-1q) or the student's own queue (CompRess-2q, `two_queues`);
    both queues hold the features of the same past samples. T = `temperature` (0.04).
    """

    def __init__(
        self,
        dim: int,
        queue_size: int = 65536,
        temperature: float = 0.04,
        *,
        two_queues: bool,
        weight: float = 1.0,
        init: str = "random",
        seed: int = 0,
        scope: Scope = LOCAL,
    ) -> None:
        super().__init__()
        _check_init(init)
        self.scope = scope
        self.temperature = temperature
        self.two_queues = two_queues
        self.weight = weight
        student_rows = teacher_rows = None
        if init == "random":  # ITRA's CompReSS draws the student's memory, then the teacher's
            generator = torch.Generator().manual_seed(seed)
            student_rows = compress_random_rows(queue_size, dim, generator) if two_queues else None
            teacher_rows = compress_random_rows(queue_size, dim, generator)
        self.teacher_queue = FeatureQueue(queue_size, dim, teacher_rows)
        self.student_queue = FeatureQueue(queue_size, dim, student_rows) if two_queues else None

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student, teacher = student_teacher(inputs, self.scope)
        teacher_memory = self.teacher_queue.filled()
        if teacher_memory.shape[0] == 0 or student.shape[0] == 0:
            loss = zero_with_grad(student)
        else:
            student_memory = self.student_queue.filled() if self.student_queue is not None else teacher_memory
            teacher_logits = teacher @ teacher_memory.T / self.temperature
            student_logits = student @ student_memory.T / self.temperature
            loss = kl_divergence(teacher_logits, student_logits)
        if inputs.update_state:
            self.teacher_queue.push(teacher)
            if self.student_queue is not None:
                self.student_queue.push(student)
        return {"distill_loss": self.weight * loss}


class SEED(LossModule):
    """CE(softmax([<t,t>, t Q^T] / T_t), log_softmax([<s,t>, s Q^T] / T_s)) over a teacher queue Q.

    The first logit is the positive pair; T_s = 0.07, T_t = 1e-4 (a nearly one-hot teacher).
    """

    def __init__(
        self,
        dim: int,
        queue_size: int = 65536,
        student_temperature: float = 0.07,
        teacher_temperature: float = 1e-4,
        *,
        weight: float = 1.0,
        init: str = "random",
        seed: int = 0,
        scope: Scope = LOCAL,
    ) -> None:
        super().__init__()
        _check_init(init)
        self.scope = scope
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.weight = weight
        rows = seed_random_rows(queue_size, dim, torch.Generator().manual_seed(seed)) if init == "random" else None
        self.queue = FeatureQueue(queue_size, dim, rows)

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student, teacher = student_teacher(inputs, self.scope)
        memory = self.queue.filled()
        student_logits = torch.cat([(student * teacher).sum(1, keepdim=True), student @ memory.T], dim=1)
        teacher_logits = torch.cat([(teacher * teacher).sum(1, keepdim=True), teacher @ memory.T], dim=1)
        teacher_probs = torch.softmax(teacher_logits / self.teacher_temperature, dim=1)
        if student.shape[0] == 0:  # a rank with no readable row: a connected 0 (it still enqueues the others')
            loss = zero_with_grad(student)
        else:
            loss = soft_cross_entropy(teacher_probs, student_logits / self.student_temperature)
        every_rank = self.scope.all_rows(teacher)  # ITRA's SEED enqueues every rank's keys (a collective)
        if inputs.update_state:
            self.queue.push(every_rank)
        return {"distill_loss": self.weight * loss}
