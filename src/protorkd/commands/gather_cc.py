"""`protorkd gather-cc`: download CC3M (caption<TAB>url) into a training TSV or webdataset shards.

The flags and exit code; the downloading itself is `protorkd.data.gather_cc.gather_cc` (docs/gather_cc.md).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from protorkd.commands.flag_types import integer, real
from protorkd.data.gather_cc import DEFAULT_USER_AGENT, FORMATS, LIMITS, gather_cc
from protorkd.data.gather_image import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)


def _byte_size(text: str) -> int:
    """`20MB`, `512k`, `1e6` or `20000000` -> bytes (decimal units), at least 1 and at most LIMITS["max_bytes"]."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9}
    cleaned = text.strip().lower().removesuffix("b")
    try:
        if cleaned and cleaned[-1] in units:
            size = int(float(cleaned[:-1]) * units[cleaned[-1]])
        else:
            size = int(float(cleaned))
    except (ValueError, OverflowError):  # OverflowError: inf; ValueError: nan and words
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 20MB, 512kB or 20000000") from None
    if not 1 <= size <= LIMITS["max_bytes"]:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1 byte and at most {LIMITS['max_bytes']} (1GB)")
    return size


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gather-cc",
        help="download CC3M (caption<TAB>url) into a training TSV or webdataset shards",
        description="Download a CC3M-style URL list (caption<TAB>url, no header) into DIR: shrunk JPEGs and "
        "DIR/train.tsv (usable as --train-data), or webdataset shards. Resumable: rerun the same command.",
    )
    add = parser.add_argument
    add("tsv", type=Path, metavar="TSV", help="the URL list, e.g. Train_GCC-training.tsv (caption<TAB>url, no header)")
    add("--out", type=Path, required=True, metavar="DIR", help="output folder; rerunning resumes it")
    add(
        "--format",
        dest="output_format",
        choices=FORMATS,
        default="tsv",
        help="tsv: DIR/images/ + DIR/train.tsv; webdataset: DIR/00000.tar ... (default: tsv)",
    )
    # downloading
    add(
        "--concurrency",
        type=integer(1, LIMITS["concurrency"]),
        default=128,
        metavar="N",
        help=f"requests in flight (default: 128; at most {LIMITS['concurrency']})",
    )
    add(
        "--timeout",
        type=real(above=0, maximum=3600),
        default=20.0,
        metavar="S",
        help="seconds per request attempt (default: 20; finite, at most 3600)",
    )
    add(
        "--retries",
        type=integer(0, LIMITS["retries"]),
        default=2,
        metavar="N",
        help="extra attempts after a connection error or HTTP 429/5xx (default: 2)",
    )
    add(
        "--backoff",
        type=real(0, 3600),
        default=1.0,
        metavar="S",
        help="the first retry waits about S seconds, doubling each time (default: 1)",
    )
    add(
        "--max-bytes",
        type=_byte_size,
        default=20_000_000,
        metavar="SIZE",
        help="largest response accepted, e.g. 20MB; bigger ones count as too_large (default: 20MB)",
    )
    add("--user-agent", default=DEFAULT_USER_AGENT, help="User-Agent header sent with each request")
    add(
        "--allow-private-hosts",
        action="store_true",
        help="also fetch from loopback, private, link-local and other non-public addresses (refused by default "
        "and counted as blocked_address, after DNS and on every redirect); for a local mirror",
    )
    add(
        "--allow-private-host",
        action="append",
        default=[],
        metavar="ADDRESS[:PORT]",
        help="allow one non-public endpoint, e.g. 10.0.0.5:8080 or [fd00::1]:80 (repeatable); safer than "
        "--allow-private-hosts, which allows them all",
    )
    # images
    add(
        "--max-pixels",
        type=integer(1, LIMITS["max_pixels"]),
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images with more pixels, read from the header before decoding: decompression bombs "
        f"(default: {DEFAULT_MAX_PIXELS}; at most {LIMITS['max_pixels']}, where Pillow refuses every image)",
    )
    add(
        "--max-side",
        type=integer(1, LIMITS["max_side"]),
        default=512,
        metavar="PX",
        help="shrink so the longer side is at most PX (default: 512)",
    )
    add(
        "--min-side",
        type=integer(0),
        default=64,
        metavar="PX",
        help="drop images whose shorter side is below PX (default: 64)",
    )
    add(
        "--jpeg-quality",
        type=integer(1, 100),
        default=90,
        metavar="Q",
        help="JPEG quality of the stored images (default: 90)",
    )
    add(
        "--decode-threads",
        type=integer(1, LIMITS["decode_threads"]),
        default=None,
        metavar="N",
        help="threads decoding and resizing images (default: one per CPU, but no more than the number whose worst "
        "case, each decoding an image of --max-pixels at 4 bytes a pixel, fits a quarter of the memory)",
    )
    # outputs and resuming
    add(
        "--shard-size",
        type=integer(1, LIMITS["shard_size"]),
        default=10_000,
        metavar="N",
        help="input rows per images/ subfolder or per tar shard (default: 10000)",
    )
    add(
        "--subset",
        type=integer(1),
        default=None,
        metavar="N",
        help="also write DIR/train_subset<N>_seed<S>.tsv with N random gathered rows (tsv format)",
    )
    add("--seed", type=integer(0), default=0, metavar="S", help="random seed of --subset (default: 0)")
    add(
        "--retry-failed",
        action="store_true",
        help="on resume, retry rows that failed with timeouts, connection/DNS errors or HTTP 429/5xx",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    stats = gather_cc(
        args.tsv,
        args.out,
        output_format=args.output_format,
        concurrency=args.concurrency,
        timeout=args.timeout,
        retries=args.retries,
        backoff=args.backoff,
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        max_side=args.max_side,
        min_side=args.min_side,
        jpeg_quality=args.jpeg_quality,
        shard_size=args.shard_size,
        decode_threads=args.decode_threads,
        subset=args.subset,
        seed=args.seed,
        retry_failed=args.retry_failed,
        user_agent=args.user_agent,
        allow_private_hosts=True if args.allow_private_hosts else args.allow_private_host,
    )
    if stats["ok"] == 0:
        log.error(
            "gather-cc: no image could be gathered; see %s (is the network reachable?)", Path(args.out) / "stats.json"
        )
        return 1
    return 0
