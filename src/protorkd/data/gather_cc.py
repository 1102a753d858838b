"""The library behind `protorkd gather-cc`: download CC3M (caption<TAB>url) into a training TSV or shards.

The download loop (gather_loop) keeps `concurrency` rows in flight and appends every finished row
to `DIR/state.jsonl` at once, so a killed run resumes where it stopped and ends with the same output
as an uninterrupted one. Outputs, all written atomically (tmp + os.replace):

- `--format tsv`: `DIR/images/<shard>/<row>.jpg` and `DIR/train.tsv` (title, filepath; input order),
  plus `DIR/train_subset<N>_seed<S>.tsv` with `--subset N --seed S`.
- `--format webdataset`: `DIR/00000.tar ...` (`{key}.jpg/.txt/.json`), `DIR/sizes.json`.
- Both: `DIR/stats.json` with the failure breakdown.

Why not img2dataset: see docs/gather_cc.md (its pins conflict with ours, and it lacks a byte cap,
row-level resume and an input-ordered TSV).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

from protorkd import __version__
from protorkd.data.gather_addresses import AddressPolicy
from protorkd.data.gather_fetch import is_transient
from protorkd.data.gather_image import DEFAULT_MAX_PIXELS, decode_bytes_at_most
from protorkd.data.gather_loop import GatherLoop, image_relpath
from protorkd.data.gather_rows import OK, PENDING, STATE_VERSION, StateLog, iter_rows, scan_tsv
from protorkd.data.gather_shards import shard_name, shards_spec, write_sizes
from protorkd.errors import UsageError
from protorkd.io import atomic_open, atomic_write

log = logging.getLogger(__name__)

DEFAULT_USER_AGENT = f"Mozilla/5.0 (compatible; protorkd-gather-cc/{__version__})"
FORMATS = ("tsv", "webdataset")
# The staging folder of a run, marked as gather-cc's own: a folder of that name without the mark is the user's
# and is never deleted (the run stops instead).
STAGING = ".gather-cc-tmp"
STAGING_MARK = ".created-by-protorkd-gather-cc"
# Upper bounds of the settings: what each in-flight request, decode or shard may hold in memory stays bounded
LIMITS = {
    "concurrency": 4096,
    "retries": 100,
    "max_bytes": 1_000_000_000,
    "max_pixels": 2 * DEFAULT_MAX_PIXELS,  # Pillow refuses every larger image itself
    "max_side": 16384,
    "shard_size": 1_000_000,
    "decode_threads": 256,
}


def default_decode_threads(max_pixels: int, memory_bytes: int | None = None, cpus: int | None = None) -> int:
    """Decoding threads such that every one decoding an image of `max_pixels` pixels at once (the worst case a
    URL list can force: a small PNG of a huge blank image) takes at most a quarter of the machine's memory; at
    most one per CPU."""
    cpus = cpus or os.cpu_count() or 4
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
            memory_bytes = 4 * 2**30
    return max(1, min(cpus, memory_bytes // 4 // decode_bytes_at_most(max_pixels)))


def gather_cc(
    tsv_path: str | Path,
    out_dir: str | Path,
    *,
    output_format: str = "tsv",
    concurrency: int = 128,
    timeout: float = 20.0,
    retries: int = 2,
    backoff: float = 1.0,
    max_bytes: int = 20_000_000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = 512,
    min_side: int = 64,
    jpeg_quality: int = 90,
    shard_size: int = 10_000,
    decode_threads: int | None = None,
    subset: int | None = None,
    seed: int = 0,
    retry_failed: bool = False,
    user_agent: str = DEFAULT_USER_AGENT,
    progress: bool = True,
    allow_private_hosts: bool | list[str] | tuple[str, ...] = False,
) -> dict:
    """Gather the images of a CC3M-style URL list into `out_dir`; returns the stats also in stats.json.

    Resumes from `out_dir/state.jsonl` when present. `retry_failed` re-attempts rows whose recorded
    failure may be transient (timeouts, connection and DNS errors, HTTP 429/5xx); in webdataset
    format only rows of shards not yet written. Only public addresses are fetched (`blocked_address`
    otherwise, after DNS and on every redirect); `allow_private_hosts` True allows every address, a list
    of `ADDRESS[:PORT]` allows those endpoints (a local mirror).
    """
    _check_settings(
        output_format,
        subset,
        timeout,
        backoff,
        concurrency=(concurrency, 1),
        retries=(retries, 0),
        max_bytes=(max_bytes, 1),
        max_pixels=(max_pixels, 1),
        max_side=(max_side, 1),
        min_side=(min_side, 0),
        jpeg_quality=(jpeg_quality, 1),
        shard_size=(shard_size, 1),
        decode_threads=(decode_threads, 1),
    )
    if jpeg_quality > 100:
        raise UsageError(f"--jpeg-quality {jpeg_quality}: must be at most 100 (Pillow recommends <= 95)")
    try:
        if isinstance(allow_private_hosts, bool):
            policy = AddressPolicy(allow_private=allow_private_hosts)
        else:
            policy = AddressPolicy.from_flags(False, list(allow_private_hosts))
    except ValueError as error:
        raise UsageError(f"--allow-private-host {allow_private_hosts}: {error}; use ADDRESS[:PORT]") from None
    tsv_path, out_dir = Path(tsv_path), Path(out_dir)
    num_lines, blank_lines = scan_tsv(tsv_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {
        "version": STATE_VERSION,
        "input_bytes": tsv_path.stat().st_size,
        "input_lines": num_lines,
        "format": output_format,
        "shard_size": shard_size,
        "max_side": max_side,
        "min_side": min_side,
        "max_pixels": max_pixels,
        "jpeg_quality": jpeg_quality,
    }
    state = StateLog(out_dir / "state.jsonl", header, num_lines, blank_lines)
    webdataset = output_format == "webdataset"
    num_shards = (num_lines + shard_size - 1) // shard_size
    packed = {s for s in range(num_shards) if (out_dir / shard_name(s)).exists()} if webdataset else set()
    for shard in packed:  # a kill between a shard's rename and the removal of its staging folder left it behind
        shutil.rmtree(out_dir / "images" / f"{shard:05d}", ignore_errors=True)
    extras = state.load(keep_extras=(lambda row: row // shard_size not in packed) if webdataset else None)
    if retry_failed:
        transient = {code for reason, code in state.codes.items() if is_transient(reason)}
        for index, code in enumerate(state.status):
            if code in transient and index // shard_size not in packed:
                state.status[index] = PENDING
    tmp_dir = _fresh_staging(out_dir)
    threads = decode_threads or default_decode_threads(max_pixels)
    if decode_threads is None:
        log.info("gather-cc: %d decode threads (at most one per CPU, and N images of --max-pixels decoded at once "
                 "fit a quarter of the memory)", threads)  # fmt: skip

    gatherer = GatherLoop(
        tsv_path,
        out_dir,
        state,
        staging=tmp_dir,
        webdataset=webdataset,
        shard_size=shard_size,
        num_shards=num_shards,
        packed=packed,
        extras=extras,
        fetch_options=dict(timeout=timeout, max_bytes=max_bytes, retries=retries, backoff=backoff, policy=policy),
        image_options=dict(max_side=max_side, min_side=min_side, max_pixels=max_pixels, quality=jpeg_quality),
        concurrency=concurrency,
        workers=threads,
        user_agent=user_agent,
        progress=progress,
    )
    started = time.perf_counter()
    state.open()
    try:
        asyncio.run(gatherer.run())
    finally:
        state.close()
        gatherer.close()
    seconds = time.perf_counter() - started

    outputs = _write_outputs(tsv_path, out_dir, state, webdataset, shard_size, num_shards, subset, seed)
    counts = state.counts()
    ok = counts.pop("ok", 0)
    stats = {
        "input": str(tsv_path),
        "format": output_format,
        "rows": num_lines - len(blank_lines),
        "ok": ok,
        "failed": sum(counts.values()),
        "failures": dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))),
        "outputs": outputs,
        "this_run": {
            "rows": gatherer.finished,
            "seconds": round(seconds, 3),
            "rows_per_s": round(gatherer.finished / seconds, 1) if seconds > 0 else None,
        },
        "settings": {
            **header,
            "concurrency": concurrency,
            "timeout": timeout,
            "retries": retries,
            "max_bytes": max_bytes,
            "user_agent": user_agent,
            "allow_private_hosts": allow_private_hosts
            if isinstance(allow_private_hosts, bool)
            else list(allow_private_hosts),
        },
    }
    atomic_write(out_dir / "stats.json", json.dumps(stats, indent=1) + "\n")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # ours: `_fresh_staging` made it
    log.info(
        "gather-cc: %d of %d rows gathered, %d failed (%s); this run %d rows in %.1f s",
        ok,
        stats["rows"],
        stats["failed"],
        ", ".join(f"{k} {v}" for k, v in stats["failures"].items()) or "-",
        gatherer.finished,
        seconds,
    )
    if subset is not None and subset > ok:
        raise UsageError(
            f"--subset {subset} but only {ok} images were gathered into {out_dir}; choose N <= {ok} "
            "(rerunning is instant: finished rows are skipped)"
        )
    return stats


def _fresh_staging(out_dir: Path) -> Path:
    """An empty staging folder for half-written files, marked as gather-cc's. One a killed run left (marked) is
    cleared; a folder of that name gather-cc did not create stops the run instead of being deleted."""
    tmp_dir = out_dir / STAGING
    if tmp_dir.exists():
        if not (tmp_dir / STAGING_MARK).is_file():
            raise UsageError(
                f"{tmp_dir} exists but was not created by gather-cc; move it away (gather-cc stages its half-written "
                "files there and deletes that folder when done)"
            )
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    (tmp_dir / STAGING_MARK).touch()
    return tmp_dir


def _check_settings(
    output_format: str, subset: int | None, timeout: float, backoff: float, **at_least: tuple[int | None, int]
) -> None:
    """UsageError for a value a run cannot use; `at_least` maps a flag name to (value, minimum), `LIMITS` gives
    the maximum of some."""
    if output_format not in FORMATS:
        raise UsageError(f"--format {output_format!r}: choose one of {', '.join(FORMATS)}")
    for name, (value, low) in at_least.items():
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least {low}")
        high = LIMITS.get(name)
        if value is not None and high is not None and value > high:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at most {high}")
    if not (math.isfinite(timeout) and timeout > 0):  # NaN compares false: every request would time out
        raise UsageError(f"--timeout {timeout}: must be a positive, finite number of seconds")
    if not (math.isfinite(backoff) and backoff >= 0):
        raise UsageError(f"--backoff {backoff}: must be a finite number of seconds, at least 0")
    if subset is not None and (subset < 1 or output_format != "tsv"):
        raise UsageError(f"--subset {subset}: needs a positive N and --format tsv")


def _write_outputs(
    tsv_path: Path,
    out_dir: Path,
    state: StateLog,
    webdataset: bool,
    shard_size: int,
    num_shards: int,
    subset: int | None,
    seed: int,
) -> dict:
    """train.tsv (+ subset) or sizes.json; returns their names for stats.json."""
    if webdataset:
        if (out_dir / "images").is_dir() and not any((out_dir / "images").iterdir()):
            (out_dir / "images").rmdir()  # every shard is packed: the staging folder is empty
        sizes = {s: state.status[s * shard_size : (s + 1) * shard_size].count(OK) for s in range(num_shards)}
        write_sizes(out_dir, sizes)
        return {
            "shards": shards_spec(num_shards),
            "num_shards": num_shards,
            "num_samples": sum(sizes.values()),
            "sizes": "sizes.json",
        }
    outputs = {"tsv": "train.tsv"}
    chosen: set[int] = set()
    ok_rows = [index for index, code in enumerate(state.status) if code == OK]
    if subset is not None and subset <= len(ok_rows):
        chosen = set(random.Random(seed).sample(ok_rows, subset))
        outputs["subset"] = f"train_subset{subset}_seed{seed}.tsv"
    names = ["tsv", "subset"] if chosen else ["tsv"]
    with contextlib.ExitStack() as stack:
        handles = {
            name: stack.enter_context(atomic_open(out_dir / outputs[name], "w", encoding="utf-8", newline=""))
            for name in names
        }
        for handle in handles.values():
            handle.write("title\tfilepath\n")
        for row in iter_rows(tsv_path):
            if state.status[row.index] == OK:
                # plain tab-separated, no quoting (what the training reader expects): a caption read from a
                # caption<TAB>url line holds no tab or newline, and its quote characters are kept as they are
                line = f"{row.caption}\t{image_relpath(row.index, shard_size)}\n"
                handles["tsv"].write(line)
                if row.index in chosen:
                    handles["subset"].write(line)
    return outputs
