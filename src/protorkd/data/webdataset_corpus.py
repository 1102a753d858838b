"""Stream webdataset shards (e.g. from `gather-cc --format webdataset`) as training batches.

Follows open_clip's recipe: under DDP every rank and loader worker draws shards *with replacement*
from the whole list (`resampled=True`), so ranks never run dry at different times and an epoch is
simply `num_samples` samples; without resampling the shards are shuffled per epoch and split by rank
and worker. Samples are shuffled in a buffer of raw bytes, then decoded.

Batches use the project's format (see data/tsv.py's `collate`):
`{"indices": LongTensor[b], "images": FloatTensor[b, 3, H, W], "captions": list[str],
"bad": list[(source, reason)]}`. A sample whose image does not decode, that has no image, or whose
caption is empty or not UTF-8, whose image has more than `max_pixels` pixels, or whose image or caption
member is larger than `max_member_bytes` (skipped without being read: members are streamed) is skipped and
reported in "bad" as ('shard 00003.tar key 000012345', reason); an unreadable shard is reported as
('shard 00003.tar', reason). Nothing crashes a worker.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import multiprocessing
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from protorkd.data.captions import DEFAULT_MAX_CAPTION_BYTES, cut_caption
from protorkd.data.images import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_PIXELS, to_rgb, too_many_pixels
from protorkd.errors import BadDataError, UsageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt",)


def expand_shards(urls: str | list[str]) -> list[str]:
    """`dir/{00000..00012}.tar` or `a.tar::b.tar` (or a list) -> shard list; local shards must exist."""
    from webdataset.shardlists import expand_urls

    shards = list(urls) if isinstance(urls, (list, tuple)) else expand_urls(urls)
    if not shards:
        raise UsageError(f"--train-data {urls!r}: names no shards; expected e.g. DIR/{{00000..00012}}.tar")
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not os.path.exists(s)]
    if missing:
        raise UsageError(
            f"--train-data {urls!r}: {len(missing)} of {len(shards)} shards do not exist (first: {missing[0]}); "
            "check the brace range against the folder (gather-cc writes it to stats.json as outputs.shards)"
        )
    return shards


class SharedEpoch:
    """The epoch number, shared with persistent loader workers (open_clip's SharedEpoch)."""

    def __init__(self, epoch: int = 0) -> None:
        self.value = multiprocessing.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


def _as_is(batch: dict) -> dict:
    """DataLoader collate for already-batched items (module level so spawned workers can pickle it)."""
    return batch


def _shuffled(samples: Iterable[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Buffer shuffle: keep `buffer_size` samples, emit a random one as each new one arrives."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        pick = rng.randrange(buffer_size)
        buffer[pick], sample = sample, buffer[pick]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _first(sample: dict, extensions: tuple[str, ...]) -> bytes | None:
    return next((sample[ext] for ext in extensions if ext in sample), None)


_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's key / extension split


def tar_samples(urls: Iterable[str], *, max_member_bytes: int, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset samples ({"__key__", "__url__", ext: bytes}) of the tar shards at `urls`, read as a stream.

    Consecutive members with the same key (`dir/000012.jpg`, `dir/000012.txt`) form a sample, as in
    webdataset. A member over `max_member_bytes` is not read (tarfile skips its data block by block); the
    sample lists it under "__too_large__" ({ext: size}). An error in a shard goes to `handler`, which returns
    True to go on with the next shard (the rest of that shard is skipped) or False to raise.
    """
    from webdataset.gopen import gopen

    for url in urls:
        stream = None
        try:
            stream = gopen(url, "rb")
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                sample: dict | None = None
                for member in tar:
                    match = _MEMBER_NAME.match(member.name)
                    if not member.isreg() or match is None:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if sample is None or sample["__key__"] != key:
                        if sample is not None:
                            yield sample
                        sample = {"__key__": key, "__url__": url}
                    if member.size > max_member_bytes:
                        sample.setdefault("__too_large__", {})[ext] = member.size
                        continue
                    handle = tar.extractfile(member)
                    sample[ext] = handle.read() if handle is not None else b""
                if sample is not None:
                    yield sample
        except Exception as error:  # an unreadable or truncated shard
            if not handler(error):
                raise
        finally:
            if stream is not None:
                stream.close()


class ShardStream(IterableDataset):
    """One loader worker's stream of ready batches (dicts); see the module docstring for the format."""

    def __init__(
        self,
        shards: list[str],
        *,
        image_transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        batches_per_worker: int,
        seed: int,
        epoch: SharedEpoch,
        rank: int,
        world_size: int,
        resampled: bool,
        shuffle_buffer: int,
        drop_last: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
    ) -> None:
        super().__init__()
        self.shards, self.image_transform, self.batch_size = shards, image_transform, batch_size
        self.batches_per_worker, self.seed, self.epoch = batches_per_worker, seed, epoch
        self.rank, self.world_size, self.resampled = rank, world_size, resampled
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        self.max_pixels, self.max_member_bytes = max_pixels, max_member_bytes
        self.max_caption_bytes = max_caption_bytes

    def _shard_urls(self, epoch: int, stream: int, streams: int, rng: random.Random) -> Iterator[str]:
        if self.resampled:  # with replacement, independently per (rank, worker), forever
            return (rng.choice(self.shards) for _ in itertools.count())
        order = list(self.shards)
        random.Random(f"{self.seed}-{epoch}").shuffle(order)  # the same permutation on every rank
        return iter(order[stream::streams])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch.get()
        stream, streams = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(f"{self.seed}-{epoch}-{stream}")
        current = {"url": "", "samples": 0, "empty_in_a_row": 0}
        bad: list[tuple[str, str]] = []
        max_empty = max(8, 2 * len(self.shards))

        def opened(urls: Iterator[str]) -> Iterator[str]:
            for url in urls:
                if current["url"]:  # resampling unreadable shards would otherwise loop forever
                    current["empty_in_a_row"] = 0 if current["samples"] else current["empty_in_a_row"] + 1
                    if current["empty_in_a_row"] >= max_empty:
                        raise BadDataError(
                            f"{max_empty} shards in a row gave no sample (last: {current['url']}); first problems: "
                            f"{bad[:3]}. Check the shards, e.g. `tar tf {current['url']}`"
                        )
                current["url"], current["samples"] = url, 0
                yield url

        def counted(samples: Iterable[dict]) -> Iterator[dict]:
            for sample in samples:
                current["samples"] += 1
                yield sample

        def on_shard_error(error: Exception) -> bool:
            message = error.args[0] if error.args else ""
            shard = f"shard {os.path.basename(current['url'])}"
            bad.append((shard, f"unreadable shard ({type(error).__name__}: {message})"))
            return True  # skip the rest of this shard, go on with the next

        urls = opened(self._shard_urls(epoch, stream, streams, rng))
        samples = counted(tar_samples(urls, max_member_bytes=self.max_member_bytes, handler=on_shard_error))
        images: list[torch.Tensor] = []
        captions: list[str] = []
        indices: list[int] = []
        counter = batches = cut = 0
        for sample in _shuffled(samples, self.shuffle_buffer, rng):
            source = f"shard {os.path.basename(sample.get('__url__', current['url']))} key {sample.get('__key__')}"
            image, caption, problem = self._decode(sample)
            if problem is not None:
                bad.append((source, problem))
                continue
            shortened = cut_caption(caption, self.max_caption_bytes)
            if shortened is not None:
                cut += 1
                if cut in (1, 1000, 1_000_000):  # counted in the log without a line per sample
                    log.warning(
                        "%d captions longer than %d bytes cut to that length before tokenizing so far in this "
                        "loader worker (this one: %s; --max-caption-bytes)",
                        cut,
                        self.max_caption_bytes,
                        source,
                    )
                caption = shortened.strip()
            images.append(image)
            captions.append(caption)
            indices.append(counter * streams + stream)  # a running counter, unique across ranks and workers
            counter += 1
            if len(captions) == self.batch_size:
                yield self._batch(indices, images, captions, bad)
                images, captions, indices, bad[:] = [], [], [], []
                batches += 1
                if batches == self.batches_per_worker:
                    return
        if captions and not self.drop_last:
            yield self._batch(indices, images, captions, bad)
        elif bad:
            log.warning("skipped %d unreadable samples after the last full batch: %s", len(bad), bad[:5])

    def _decode(self, sample: dict) -> tuple[torch.Tensor | None, str, str | None]:
        """(image [3, H, W], caption, None) or (None, caption, reason)."""
        too_large = sample.get("__too_large__", {})
        for extensions in (CAPTION_EXTENSIONS, IMAGE_EXTENSIONS):
            skipped = next((ext for ext in extensions if ext in too_large), None)
            if skipped is not None and _first(sample, extensions) is None:
                size = too_large[skipped]
                return None, "", f"member .{skipped} of {size} bytes (> --max-member-bytes {self.max_member_bytes})"
        caption_bytes = _first(sample, CAPTION_EXTENSIONS)
        try:
            caption = caption_bytes.decode("utf-8").strip() if caption_bytes else ""
        except UnicodeDecodeError as error:
            return None, "", f"caption not UTF-8 (byte 0x{caption_bytes[error.start]:02x} at {error.start + 1})"
        if not caption:
            return None, caption, "empty caption"
        data = _first(sample, IMAGE_EXTENSIONS)
        if data is None:
            return None, caption, "missing image"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides below
                image = Image.open(io.BytesIO(data))
            with image:
                problem = too_many_pixels(image, self.max_pixels)
                if problem is not None:
                    return None, caption, problem
                rgb = to_rgb(image)  # forces the full decode, so truncated files fail here
        except Exception as error:  # PIL raises many types for corrupt / truncated files
            return None, caption, f"unreadable image ({type(error).__name__}: {error})"
        return self.image_transform(rgb), caption, None

    @staticmethod
    def _batch(indices: list[int], images: list[torch.Tensor], captions: list[str], bad: list) -> dict:
        return {
            "indices": torch.tensor(indices, dtype=torch.long),
            "images": torch.stack(images),
            "captions": list(captions),
            "bad": list(bad),
        }


class WebDatasetLoader:
    """A DataLoader over a ShardStream with `len()` (batches per epoch on this rank) and `set_epoch()`."""

    def __init__(self, loader: DataLoader, epoch: SharedEpoch, num_batches: int, num_samples: int) -> None:
        self.loader, self.epoch = loader, epoch
        self.num_batches, self.num_samples = num_batches, num_samples

    def set_epoch(self, epoch: int) -> None:
        """Reseeds shard choice and shuffling; persistent workers see it at their next epoch."""
        self.epoch.set(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)


def webdataset_loader(
    urls: str | list[str],
    *,
    image_transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_samples: int,
    workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    resampled: bool = True,
    shuffle_buffer: int = 2000,
    drop_last: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
) -> WebDatasetLoader:
    """Batches of `batch_size` from the shards in `urls`; one epoch is `num_samples` samples over all ranks.

    Each rank yields ceil(num_samples / (batch_size * world_size)) batches, rounded up to a multiple of
    `workers` (every worker yields the same count, as in open_clip). Without `resampled` a worker stops
    early when its shards run out, so use `resampled=True` under DDP.
    """
    shards = expand_shards(urls)
    if batch_size < 1 or num_samples < 1:
        raise UsageError(f"batch size {batch_size} and --train-num-samples {num_samples} must be positive")
    streams = world_size * max(1, workers)
    if not resampled and len(shards) < streams:
        raise UsageError(
            f"{len(shards)} shards cannot feed {world_size} ranks x {max(1, workers)} workers without resampling; "
            "use resampled shards, fewer --workers, or write smaller shards (gather-cc --shard-size)"
        )
    batches_per_worker = math.ceil(math.ceil(num_samples / (batch_size * world_size)) / max(1, workers))
    shared_epoch = SharedEpoch(epoch)
    dataset = ShardStream(
        shards,
        image_transform=image_transform,
        batch_size=batch_size,
        batches_per_worker=batches_per_worker,
        seed=seed,
        epoch=shared_epoch,
        rank=rank,
        world_size=world_size,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        drop_last=drop_last,
        max_pixels=max_pixels,
        max_member_bytes=max_member_bytes,
        max_caption_bytes=max_caption_bytes,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=_as_is,
    )
    num_batches = batches_per_worker * max(1, workers)
    return WebDatasetLoader(loader, shared_epoch, num_batches, num_batches * batch_size * world_size)
