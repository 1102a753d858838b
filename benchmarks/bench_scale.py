"""The training data path at CC3M and CC12M scale, by simulation: start-up time, peak memory and time to the first
batch of `protorkd train` on synthetic corpora of 10k to 12M rows, and the disk a K=10 reinforced cache would take.

    python benchmarks/bench_scale.py --out /tmp/bench-scale [--rows 10000,100000,1000000,3300000,12000000]

Each corpus is a TSV whose image paths repeat a small real set (the demo corpus' first 256 images) and whose
captions are all different (what CC3M's are), with a complete teacher cache of the right shape for the locked
MiniLM text tower (384-d fp16, one row per caption) written as a sparse file: nobody should encode 12M captions
on 2 cores, and a sparse file costs only what is read. The run is the demo's student (tiny-cnn + MiniLM, InfoNCE,
`--in-memory off`, no evaluation), stopped by a failpoint right after its first training step; `/usr/bin/time -v`
gives its peak resident memory; out.log gives the phases. The reinforced cache's size is computed from its format
(`teachers/reinforced.py`): images x K x (2 D + 4 P) + 8 bytes a row, for D = 768 and the default crop's P = 4.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_demo import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(out: Path, rows: int, images: list[str]) -> Path:
    """OUT/corpus-<rows>.tsv: `rows` rows over the given image files, every caption different."""
    path = out / f"corpus-{rows}.tsv"
    if path.exists():
        return path
    words = ["red", "blue", "small", "large", "circle", "square", "photo", "of", "a", "two", "green", "star"]
    with open(path.with_suffix(".tmp"), "w") as handle:
        handle.write("filepath\ttitle\n")
        for start in range(0, rows, 100_000):
            block = [
                f"{images[i % len(images)]}\t{words[i % 12]} {words[(i // 12) % 12]} {words[(i // 144) % 12]} no. {i}\n"
                for i in range(start, min(rows, start + 100_000))
            ]
            handle.write("".join(block))
    os.replace(path.with_suffix(".tmp"), path)
    return path


def write_text_cache(out: Path, corpus: Path, rows: int) -> tuple[Path, float]:
    """A complete MiniLM caption cache for `corpus` as training would look it up (spec, corpus hash, manifest),
    its features a sparse file of the right shape. Returns (cache root, seconds to write it)."""
    sys.path.insert(0, str(ROOT / "src"))
    from protorkd.data.tsv import read_corpus_table
    from protorkd.teachers.cache import cache_folder, corpus_hash
    from protorkd.teachers.definitions import TeacherDef

    root = out / f"cache-{rows}"
    started = time.perf_counter()
    table = read_corpus_table(corpus, "filepath", "title")
    spec = TeacherDef("text", "text", "sbert", "all-MiniLM-L6-v2", "", "mean", 0).spec()
    folder = cache_folder(root, "text", spec, corpus_hash(table.captions))
    if not (folder / "manifest.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        unique = len(set(table.captions))
        features = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float16, shape=(unique, 384))
        del features  # never written: a sparse file
        np.save(folder / "rows.npy", np.arange(rows, dtype=np.int64))  # every caption different
        manifest = {
            "format": 1, "modality": "text", "teacher": spec, "corpus_sha256": corpus_hash(table.captions),
            "rows": rows, "unique": unique, "dim": 384, "done": unique, "complete": True, "bad_unique": [],
        }  # fmt: skip
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return root, time.perf_counter() - started


def measure(out: Path, corpus: Path, cache: Path, rows: int) -> dict:
    """`protorkd train` on the corpus until its first training step: wall, peak RSS, the phases."""
    name = f"run-{rows}"
    logs = out / "runs"
    subprocess.run(["rm", "-rf", str(logs / name)], check=True)
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "protorkd", "train", "--train-data", str(corpus)]
    command += ["--teacher-cache", str(cache), "--in-memory", "off", "--workers", "0", "--report-to", ""]
    command += ["--zeroshot-frequency", "0", "--linear-frequency", "0", "--retrieval-frequency", "0"]
    command += ["--eval-data-dir", str(out), "--logs", str(logs), "--name", name, "--epochs", "1"]
    env = {**os.environ, "PROTORKD_FAILPOINTS": "train-step=1:raise", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    log = (logs / name / "out.log").read_text() if (logs / name / "out.log").exists() else ""

    def phase(pattern: str) -> float | None:
        found = re.search(pattern, log)
        return float(found.group(1)) if found else None

    return {
        "rows": rows,
        "wall_to_first_step_s": round(wall, 1),
        "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
        "corpus_s": phase(r"rows \(ready in ([\d.]+) s\)"),
        "teacher_s": phase(r"teacher features ready in ([\d.]+) s"),
        "batches_s": phase(r"training batches ready in ([\d.]+) s"),
        "reached_first_step": "failpoint train-step" in result.stderr,
    }


def reinforced_bytes(images: int, views: int = 10, dim: int = 768, params: int = 4, rows: int | None = None) -> int:
    """Bytes of a reinforced cache: features fp16 [images, K, D] + views float32 [images, K, P] + rows int64 [N]."""
    return images * views * (2 * dim + 4 * params) + 8 * (rows if rows is not None else images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default="10000,100000,1000000,3300000,12000000")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    from protorkd.data.demo import ensure_demo_corpus

    demo = ensure_demo_corpus(10240, 0)
    images = [str(demo / line.split("\t")[0]) for line in (demo / "train.tsv").read_text().splitlines()[1:257]]
    (args.out / "eval-empty").mkdir(exist_ok=True)
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        corpus = write_corpus(args.out, rows, images)
        cache, seconds = write_text_cache(args.out, corpus, rows)
        measured = measure(args.out, corpus, cache, rows)
        measured["tsv_mb"] = round(corpus.stat().st_size / 2**20)
        measured["reinforced_k10_768d_gb"] = round(reinforced_bytes(rows) / 1e9, 2)
        results.append(measured)
        print(json.dumps(measured), flush=True)
        (args.out / "results.json").write_text(json.dumps({"machine": cpu_model(), "results": results}, indent=1))
    print(f"\n{cpu_model()}, {os.cpu_count()} cores")
    print("| rows | TSV MB | corpus s | teacher cache s | batches s | wall to first step s | peak RSS MB | "
          "K=10 768-d reinforced cache GB |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['tsv_mb']} | {r['corpus_s']} | {r['teacher_s']} | {r['batches_s']} | "
              f"{r['wall_to_first_step_s']} | {r['peak_rss_mb']} | {r['reinforced_k10_768d_gb']} |")  # fmt: skip


if __name__ == "__main__":
    main()
