"""The training corpus, one of two typed kinds, and the batches an epoch draws from it.

* `TsvCorpus`: a tab-separated file of image paths and captions (the CC3M layout, or the built-in demo
  corpus). Rows are addressable, so teacher features can be cached per row and episodes resampled.
* `ShardCorpus`: webdataset shards, streamed; `samples_per_epoch` samples make an epoch, and rows have
  no stable identity (no cached teacher features, no clustering by row).

`training_batches` turns either into `TrainBatches`: an iterable of `collate`-format batch dicts with
`len()` (batches per epoch on this rank), `set_epoch()` and `describe()` (where a bad sample came from).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from protorkd.data.captions import DEFAULT_MAX_CAPTION_BYTES
from protorkd.data.demo import demo_corpus_for
from protorkd.data.images import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_PIXELS
from protorkd.data.sampling import EpisodeSampler
from protorkd.data.tsv import CsvCorpus, collate, read_corpus_table
from protorkd.data.views import ViewReplay
from protorkd.errors import UsageError

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class TsvCorpus:
    """Rows of a tab-separated corpus: image paths (resolved) and captions, in file order (columns of bytes,
    `data.columns`); `lines` holds each row's line in the file and `problems` the rows that could not be parsed
    (row -> reason)."""

    images: Sequence[str]
    captions: Sequence[str]
    source: str  # the file, as users know it
    lines: Sequence[int] | None = None
    problems: dict[int, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class ShardCorpus:
    """webdataset shards (a brace pattern or `a.tar::b.tar`), streamed `samples_per_epoch` at a time."""

    pattern: str
    samples_per_epoch: int

    @property
    def source(self) -> str:
        return self.pattern

    @property
    def rows(self) -> int:
        return self.samples_per_epoch


Corpus = TsvCorpus | ShardCorpus


def is_webdataset(train_data: str | None, dataset_type: str) -> bool:
    """`--dataset-type`, or for "auto" the look of `--train-data` (ends in .tar, has `::` or `{..}`)."""
    if dataset_type != "auto":
        return dataset_type == "webdataset"
    data = train_data or ""
    return data.endswith(".tar") or ".tar::" in data or ("{" in data and ".tar" in data)


def open_corpus(
    train_data: str | None,
    *,
    dataset_type: str = "auto",
    samples_per_epoch: int | None = None,
    img_key: str = "filepath",
    caption_key: str = "title",
    separator: str = "\t",
    dataset_size: int | None = None,
    demo_size: int = 10240,
    demo_seed: int = 0,
    max_bad_fraction: float | None = None,
    quoting: str = "none",
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
) -> Corpus:
    """The training CSV, webdataset shards, or (no `train_data`) the built-in demo corpus, generated and
    cached on first use (only its first `dataset_size` rows when fewer than `demo_size` are used: the same rows).
    A TSV with more unparsable rows than `max_bad_fraction` is a UsageError; captions are cut to
    `max_caption_bytes` bytes."""
    if train_data is not None and is_webdataset(train_data, dataset_type):
        from protorkd.data.webdataset_corpus import expand_shards

        if not samples_per_epoch:
            raise UsageError("a webdataset corpus needs --train-num-samples N (samples per epoch)")
        expand_shards(train_data)  # names no shard, or missing shards: a clear error now
        return ShardCorpus(train_data, samples_per_epoch)
    if train_data is None:
        path = demo_corpus_for(demo_size, dataset_size, demo_seed) / "train.tsv"
    else:
        path = Path(train_data)
    table = read_corpus_table(
        path, img_key, caption_key, separator, dataset_size, max_bad_fraction, quoting, max_caption_bytes
    )
    return TsvCorpus(table.images, table.captions, str(path), table.lines, table.problems)


@dataclass
class TrainBatches:
    """One rank's batches of an epoch. `sampler` is the TSV episode sampler (None for shards)."""

    loader: DataLoader | Iterator
    sampler: EpisodeSampler | None
    describe: Callable[[int | str], str]
    on_epoch: Callable[[int], None]  # reseeds sampling and augmentation for an epoch
    length: int  # batches per epoch on this rank

    def set_epoch(self, epoch: int) -> None:
        self.on_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)


def training_batches(
    corpus: Corpus,
    *,
    transform: Transform,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    episode_size: int = 0,
    load_images: bool = True,
    bad_rows: set[int] | None = None,
    views: int = 1,
    pin_memory: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
    in_memory_size: int | None = None,
    view_replay: ViewReplay | None = None,
) -> TrainBatches:
    """The one place that turns a corpus into training batches.

    With `in_memory_size` S (a TSV corpus whose images are loaded), every image is decoded once into memory
    at S x S and augmented on tensors (`data.decoded_corpus.DecodedCorpus`) instead of read from its file each epoch.

    Batches are `collate`'s dicts: indices [b], captions, images [b, 3, H, W] unless `load_images` is
    False, images_view2 (a second augmented view) when `views` is 2, and bad [(row or source, reason)].
    An image over `max_pixels` pixels, or a shard member over `max_member_bytes` bytes, is a bad sample.
    With `view_replay` (a reinforced teacher cache) every image is the stored view its (epoch, row) picks, and
    batches carry views [b].
    """
    if isinstance(corpus, ShardCorpus):
        from protorkd.data.webdataset_corpus import webdataset_loader

        if views != 1:
            raise UsageError("--byol needs a TSV corpus (a webdataset stream yields one view per sample)")
        stream = webdataset_loader(
            corpus.pattern,
            image_transform=transform,
            batch_size=batch_size,
            num_samples=corpus.samples_per_epoch,
            workers=workers,
            seed=seed,
            rank=rank,
            world_size=world_size,
            max_pixels=max_pixels,
            max_member_bytes=max_member_bytes,
            max_caption_bytes=max_caption_bytes,
        )
        return TrainBatches(stream, None, str, stream.set_epoch, len(stream))
    options = dict(
        load_images=load_images,
        views=views,
        source=corpus.source,
        bad_rows=bad_rows,
        problems=corpus.problems,
        lines=corpus.lines,
        max_pixels=max_pixels,
        seed=seed,
        view_replay=view_replay,
    )
    if in_memory_size is not None and load_images:
        from protorkd.data.decoded_corpus import DecodedCorpus, decode_images

        known_bad = set(bad_rows or ()) | set(corpus.problems)
        decoded, failed = decode_images(corpus.images, in_memory_size, skip=known_bad, max_pixels=max_pixels)
        dataset = DecodedCorpus(corpus.images, corpus.captions, transform, decoded=decoded, failed=failed, **options)
    else:
        dataset = CsvCorpus(corpus.images, corpus.captions, transform, **options)
    sampler = EpisodeSampler(len(dataset), episode_size, seed=seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return TrainBatches(loader, sampler, dataset.describe, sampler.set_epoch, len(loader))
