"""gather-cc's download loop: rows in input order, `concurrency` in flight, each recorded as it finishes.

One asyncio event loop fetches (aiohttp; the job is network-bound); worker threads decode, shrink and
write the JPEGs (Pillow releases the GIL, so threads scale with cores); a single packer thread writes
finished webdataset shards. Each finished row is appended to the resume log before the next one is
looked at, so a kill loses at most the rows in flight.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import aiohttp
from tqdm import tqdm

from protorkd.data.gather_fetch import fetch, make_session
from protorkd.data.gather_image import ImageOutcome, process_image
from protorkd.data.gather_rows import BLANK, OK, PENDING, Row, StateLog, iter_rows
from protorkd.data.gather_shards import pack_shard

log = logging.getLogger(__name__)


def image_relpath(index: int, shard_size: int) -> str:
    """Where row `index`'s JPEG lives, relative to the output folder."""
    return f"images/{index // shard_size:05d}/{index:09d}.jpg"


class GatherLoop:
    """The download loop: reads rows in order, keeps `concurrency` in flight, records each as it finishes."""

    def __init__(
        self,
        tsv_path: Path,
        out_dir: Path,
        state: StateLog,
        *,
        staging: Path,
        webdataset: bool,
        shard_size: int,
        num_shards: int,
        packed: set[int],
        extras: dict[int, dict],
        fetch_options: dict,
        image_options: dict,
        concurrency: int,
        workers: int,
        user_agent: str,
        progress: bool,
    ) -> None:
        self.tsv_path, self.out_dir, self.state, self.staging = tsv_path, out_dir, state, staging
        self.webdataset, self.shard_size, self.num_shards, self.packed = webdataset, shard_size, num_shards, packed
        self.extras = extras  # ok rows of unpacked shards -> sizes (webdataset json metadata)
        self.fetch_options, self.image_options = fetch_options, image_options
        self.concurrency, self.user_agent = concurrency, user_agent
        self.images = ThreadPoolExecutor(workers, thread_name_prefix="gather-image")
        self.packer = ThreadPoolExecutor(1, thread_name_prefix="gather-pack")
        self.pack_futures: list[Future] = []
        # rows of each unpacked shard seen so far (webdataset) and how many are still unresolved
        self.shard_rows: dict[int, list[Row]] = {}
        self.unresolved = {
            s: state.status[s * shard_size : (s + 1) * shard_size].count(PENDING)
            for s in range(num_shards)
            if webdataset and s not in packed
        }
        self.current_shard = -1
        self.made_dirs: set[int] = set()
        self.finished = 0
        self.rng = random.Random()
        done = sum(state.counts().values())
        self.ok = state.status.count(OK)
        self.failed = done - self.ok
        self.bar = tqdm(
            total=len(state.status) - state.status.count(BLANK),
            initial=done,
            unit="row",
            smoothing=0.05,
            dynamic_ncols=True,
            disable=None if progress else True,
            desc="gather-cc",
        )
        self.last_postfix = self.last_log = time.monotonic()

    async def run(self) -> None:
        in_flight: set[asyncio.Task] = set()
        policy = self.fetch_options.get("policy")
        async with make_session(concurrency=self.concurrency, user_agent=self.user_agent, policy=policy) as session:
            for row in iter_rows(self.tsv_path):
                shard = row.index // self.shard_size
                if shard != self.current_shard:
                    self._passed_shards_before(shard)
                if shard in self.packed:
                    continue
                status = self.state.status[row.index]
                if self.webdataset and status in (PENDING, OK):
                    self.shard_rows.setdefault(shard, []).append(row)
                if status != PENDING:
                    continue
                if not row.caption:
                    self._finish(row, ImageOutcome("empty_caption"))
                    continue
                while len(in_flight) >= self.concurrency:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        self._finish(*task.result())
                in_flight.add(asyncio.create_task(self._gather_one(session, row)))
            while in_flight:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._finish(*task.result())
        self._passed_shards_before(self.num_shards)
        for future in self.pack_futures:
            await asyncio.wrap_future(future)

    async def _gather_one(self, session: aiohttp.ClientSession, row: Row) -> tuple[Row, ImageOutcome]:
        """Fetch one row and turn it into a JPEG (in a worker thread); failures come back as outcomes."""
        result = await fetch(session, row.url, rng=self.rng, **self.fetch_options)
        if result.reason != "ok":
            return row, ImageOutcome(result.reason)
        shard = row.index // self.shard_size
        destination = self.out_dir / image_relpath(row.index, self.shard_size)
        if shard not in self.made_dirs:
            destination.parent.mkdir(parents=True, exist_ok=True)
            self.made_dirs.add(shard)
        work = functools.partial(
            process_image, result.data, destination, self.staging / f"{row.key}.jpg", **self.image_options
        )
        return row, await asyncio.get_running_loop().run_in_executor(self.images, work)

    def _finish(self, row: Row, outcome: ImageOutcome) -> None:
        """Record a resolved row (state line, counters, progress) and pack its shard when it is complete."""
        if outcome.reason == "ok":
            sizes = dict(
                width=outcome.width,
                height=outcome.height,
                original_width=outcome.original_width,
                original_height=outcome.original_height,
            )
            self.state.record(row.index, "ok", **sizes)
            if self.webdataset:
                self.extras[row.index] = sizes
            self.ok += 1
        else:
            self.state.record(row.index, outcome.reason)
            self.failed += 1
        self.finished += 1
        if self.webdataset:
            shard = row.index // self.shard_size
            self.unresolved[shard] -= 1
            if shard < self.current_shard and self.unresolved[shard] == 0:
                self._pack(shard)
        self.bar.update()
        now = time.monotonic()
        if now - self.last_postfix >= 0.5:
            self.bar.set_postfix_str(f"ok={self.ok} failed={self.failed}", refresh=False)
            self.last_postfix = now
        if self.bar.disable and now - self.last_log >= 60:  # no terminal (a job log): one line a minute
            log.info("gather-cc: %d rows done (ok %d, failed %d)", self.ok + self.failed, self.ok, self.failed)
            self.last_log = now

    def _passed_shards_before(self, shard: int) -> None:
        """The row reader moved to `shard`: every earlier shard whose rows are all resolved can be packed."""
        self.current_shard = shard
        if not self.webdataset:
            return
        for earlier in [s for s, left in self.unresolved.items() if s < shard and left == 0 and s not in self.packed]:
            self._pack(earlier)

    def _pack(self, shard: int) -> None:
        """Hand a complete shard to the packer thread (after surfacing any earlier packing error)."""
        for future in self.pack_futures:
            if future.done():
                future.result()  # e.g. a full disk: stop now rather than at the end of the run
        self.pack_futures = [future for future in self.pack_futures if not future.done()]
        self.packed.add(shard)
        samples = []
        for row in self.shard_rows.pop(shard, []):
            if self.state.status[row.index] != OK:
                continue
            sizes = self.extras.pop(row.index, {})
            samples.append(
                {
                    "key": row.key,
                    "caption": row.caption,
                    "image_path": self.out_dir / image_relpath(row.index, self.shard_size),
                    "meta": {"row": row.index, "key": row.key, "caption": row.caption, "url": row.url, **sizes},
                }
            )
        self.pack_futures.append(self.packer.submit(pack_shard, self.out_dir, shard, samples, self.staging))

    def close(self) -> None:
        self.bar.close()
        self.images.shutdown(wait=True, cancel_futures=True)
        self.packer.shutdown(wait=True)
