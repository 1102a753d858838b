"""Which corpus rows each process sees in an epoch (episode), as a pure function of (seed, epoch).

episode_size 0: a shuffled pass over every row. episode_size N: N rows drawn uniformly with
replacement (ProtoCLIP's episodic training). Either way the epoch's rows are split across ranks the
way DistributedSampler does (rank r takes positions r, r + W, ...), padded to equal length by
repeating the first positions. Being a function of (seed, epoch) is what makes a resumed run see
exactly the rows an uninterrupted run saw.

Each sample is addressed by its *position* in the epoch (ProtoCLIP's "episodic index"): a row drawn
twice has two positions, and per-sample state of one episode (ProtoCLIP's cluster labels) is keyed
by it. A padding sample repeats the position (and so the augmentation) of the sample it duplicates.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

# Added to the epoch in the augmentation seed of ProtoCLIP's feature-extraction pass, so that pass
# draws its own augmentations of the episode, independent of the training pass (as the original,
# which iterates its training DataLoader twice).
EXTRACTION_STREAM = 1 << 20


def episode_indices(dataset_size: int, episode_size: int, seed: int, epoch: int) -> torch.Tensor:
    """[E] corpus rows of the epoch, identical on every rank."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if episode_size <= 0:
        return torch.randperm(dataset_size, generator=generator)
    return torch.randint(0, dataset_size, (episode_size,), generator=generator)


class EpisodeSampler(Sampler[tuple[int, int, int]]):
    """Yields (augmentation stream, position in the episode, corpus row) for this rank.

    The stream is the epoch (`EXTRACTION_STREAM` added for `extraction_pass()`); `CsvCorpus.__getitem__`
    seeds a sample's augmentation from (seed, stream, position).
    """

    def __init__(
        self, dataset_size: int, episode_size: int, *, seed: int, rank: int = 0, world_size: int = 1, stream: int = 0
    ) -> None:
        self.dataset_size = dataset_size
        self.episode_size = episode_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.stream = stream
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def episode(self) -> torch.Tensor:
        return episode_indices(self.dataset_size, self.episode_size, self.seed, self.epoch)

    @property
    def episode_length(self) -> int:
        """Samples in one epoch over all ranks, before padding."""
        return self.episode_size if self.episode_size > 0 else self.dataset_size

    def __len__(self) -> int:
        return -(-self.episode_length // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        rows = self.episode().numpy()  # an int64 array: a list of 12M Python ints would be ~430 MB
        total = len(rows)
        positions = range(self.rank, len(self) * self.world_size, self.world_size)
        stream = self.epoch + self.stream
        return iter((stream, position % total, int(rows[position % total])) for position in positions)

    def extraction_pass(self) -> EpisodeSampler:
        """The same episode, split across ranks the same way, with its own augmentation draws."""
        return _ExtractionSampler(self)


class _ExtractionSampler(EpisodeSampler):
    """Follows `base`'s epoch (read at iteration), seeds augmentations from its own stream."""

    def __init__(self, base: EpisodeSampler) -> None:
        super().__init__(
            base.dataset_size,
            base.episode_size,
            seed=base.seed,
            rank=base.rank,
            world_size=base.world_size,
            stream=EXTRACTION_STREAM,
        )
        self.base = base

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        self.epoch = self.base.epoch
        return super().__iter__()
