"""Which corpus rows each process sees in an epoch (episode), as a pure function of (seed, epoch).

episode_size 0: a shuffled pass over every row. episode_size N: N rows drawn uniformly with
replacement (ProtoCLIP's episodic training). Either way the epoch's rows are split across ranks the
way DistributedSampler does (rank r takes positions r, r + W, ...), padded to equal length. Being a
function of (seed, epoch) is what makes a resumed run see exactly the rows an uninterrupted run saw.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def episode_indices(dataset_size: int, episode_size: int, seed: int, epoch: int) -> torch.Tensor:
    """[E] corpus rows of the epoch, identical on every rank."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if episode_size <= 0:
        return torch.randperm(dataset_size, generator=generator)
    return torch.randint(0, dataset_size, (episode_size,), generator=generator)


class EpisodeSampler(Sampler[tuple[int, int, int]]):
    """Yields (epoch, position in the epoch, corpus row) for this rank; see CsvCorpus.__getitem__."""

    def __init__(self, dataset_size: int, episode_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.dataset_size = dataset_size
        self.episode_size = episode_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def episode(self) -> torch.Tensor:
        return episode_indices(self.dataset_size, self.episode_size, self.seed, self.epoch)

    def __len__(self) -> int:
        total = self.episode_size if self.episode_size > 0 else self.dataset_size
        return -(-total // self.world_size)

    def __iter__(self):
        rows = self.episode()
        per_rank = len(self)
        padded = (
            torch.cat([rows, rows[: per_rank * self.world_size - len(rows)]]) if len(rows) % self.world_size else rows
        )
        rows_list = padded.tolist()
        positions = range(self.rank, per_rank * self.world_size, self.world_size)
        return iter((self.epoch, position, rows_list[position]) for position in positions)
