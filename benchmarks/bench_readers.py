"""What the reliability changes cost the corpus readers: time ratios, interleaved in one run.

* TSV: `read_corpus_table` (one row per line, split on the tab, UTF-8 checked per line) against the
  previous reader (`csv.reader` with QUOTE_MINIMAL, which an unbalanced quote could derail), on a
  CC3M-sized synthetic file.
* Shards: `tar_samples` (members streamed, each checked against --max-member-bytes before it is read)
  against webdataset's `tarfile_samples` (reads every member whole), sample grouping only (no decoding).

    python benchmarks/bench_readers.py --rows 1000000 --repeats 3

Prints the median time of each reader and the ratio; absolute times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from protorkd.data.tsv import read_corpus_table
from protorkd.data.webdataset_corpus import tar_samples


def previous_tsv_reader(path: Path) -> int:
    """The reader before issue 11 (csv.reader, QUOTE_MINIMAL, errors='replace'), for comparison only."""
    images, captions = [], []
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        header = next(reader)
        img_col, cap_col = header.index("filepath"), header.index("title")
        for row in reader:
            if not row:
                continue
            image = row[img_col] if img_col < len(row) else ""
            images.append(str(path.parent / image) if image and not Path(image).is_absolute() else image)
            captions.append((row[cap_col] if cap_col < len(row) else "").strip())
    return len(images)


def write_tsv(path: Path, rows: int) -> None:
    rng = random.Random(0)
    words = 'a the photo of person dog cat city street view "old" new red blue at in on with and'.split()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("title\tfilepath\n")
        for i in range(rows):
            caption = " ".join(rng.choice(words) for _ in range(rng.randint(5, 15)))
            handle.write(f"{caption}\timages/{i // 10000:05d}/{i:09d}.jpg\n")


def write_shards(folder: Path, shards: int, samples: int) -> list[str]:
    urls = []
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(samples):
                for ext, size in (("jpg", 40_000), ("txt", 60), ("json", 200)):
                    info = tarfile.TarInfo(f"{shard:05d}{i:06d}.{ext}")
                    info.size = size
                    tar.addfile(info, io.BytesIO(bytes(size)))
        urls.append(str(path))
    return urls


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="TSV rows (default: 1000000)")
    parser.add_argument("--shards", type=int, default=4, help="tar shards (default: 4)")
    parser.add_argument("--samples", type=int, default=5000, help="samples per shard (default: 5000)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (default: 3)")
    args = parser.parse_args()
    from webdataset.tariterators import tarfile_samples

    with tempfile.TemporaryDirectory(prefix="bench_readers_") as tmp:
        tsv = Path(tmp) / "train.tsv"
        write_tsv(tsv, args.rows)
        urls = write_shards(Path(tmp), args.shards, args.samples)
        readers = {
            "TSV, previous csv.reader": lambda: previous_tsv_reader(tsv),
            "TSV, read_corpus_table": lambda: read_corpus_table(tsv, "filepath", "title"),
            "shards, webdataset tarfile_samples": lambda: sum(1 for _ in tarfile_samples({"url": u} for u in urls)),
            "shards, protorkd tar_samples": lambda: sum(
                1 for _ in tar_samples(urls, max_member_bytes=20_000_000, handler=lambda error: False)
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.repeats):
            for name, reader in readers.items():
                times[name].append(timed(reader))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"| reader | median s ({args.repeats} interleaved runs) | ratio to the previous reader |")
    print("|---|---|---|")
    for name, baseline in (
        ("TSV, read_corpus_table", "TSV, previous csv.reader"),
        ("shards, protorkd tar_samples", "shards, webdataset tarfile_samples"),
    ):
        print(f"| {baseline} | {median[baseline]:.2f} | 1.00 |")
        print(f"| {name} | {median[name]:.2f} | {median[name] / median[baseline]:.2f} |")


if __name__ == "__main__":
    main()
