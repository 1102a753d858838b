"""Data loading vs what the model consumes, on the built-in demo corpus.

Prints images/s of the TSV loader (protorkd.data.tsv) and of the webdataset loader (shards written from
the same corpus) for several worker counts, next to the training throughput of the demo student
(tiny-cnn forward + backward + AdamW step with cached teacher features). The loader must not be the
bottleneck in the demo configuration.

    python benchmarks/bench_loader.py [--size 4096] [--workers 0,1,2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from protorkd.data.demo import ensure_demo_corpus
from protorkd.data.sampling import EpisodeSampler
from protorkd.data.transforms import image_transform
from protorkd.data.tsv import CsvCorpus, collate, read_corpus_table
from protorkd.data.webdataset_corpus import webdataset_loader
from protorkd.models.image_towers import OPENAI_MEAN, OPENAI_STD
from protorkd.models.tiny import tiny_cnn

BATCH = 64


def rate_of(loader, limit: int) -> float:
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    seen, start = 0, time.perf_counter()
    for batch in iterator:
        seen += len(batch["indices"])
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def write_shards(images: list[str], captions: list[str], folder: Path, shard_size: int = 1000) -> str:
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i, (path, caption) in enumerate(zip(images, captions)):
            sink.write({"__key__": f"{i:09d}", "jpg": Path(path).read_bytes(), "txt": caption})
    count = len(list(folder.glob("*.tar")))
    return str(folder / f"{{00000..{count - 1:05d}}}.tar")


def model_rate(steps: int = 20) -> float:
    model, size = tiny_cnn()
    head = torch.nn.Linear(model.output_dim, 384)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()))
    images, teacher = torch.randn(BATCH, 3, size, size), torch.nn.functional.normalize(torch.randn(BATCH, 384), dim=-1)
    start = None
    for step in range(steps + 3):
        if step == 3:
            start = time.perf_counter()
        student = torch.nn.functional.normalize(head(model(images)), dim=-1)
        logits = 20 * student @ teacher.T
        labels = torch.arange(BATCH)
        loss = torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="demo corpus rows to read")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    args = parser.parse_args()
    root = ensure_demo_corpus()
    table = read_corpus_table(root / "train.tsv", "filepath", "title", "\t", args.size)
    images, captions = table.images, table.captions
    transform = image_transform(64, OPENAI_MEAN, OPENAI_STD, train=True, interpolation="bilinear")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(images, captions, Path(tmp))
        for workers in [int(w) for w in args.workers.split(",")]:
            dataset = CsvCorpus(images, captions, transform, source=str(root / "train.tsv"))
            sampler = EpisodeSampler(len(dataset), 0, seed=0)
            tsv = DataLoader(
                dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, collate_fn=collate, drop_last=True
            )
            rows.append(("tsv", workers, rate_of(tsv, args.size - 2 * BATCH)))
            web = webdataset_loader(
                shards, image_transform=transform, batch_size=BATCH, num_samples=args.size, workers=workers
            )
            rows.append(("webdataset", workers, rate_of(web, args.size - 4 * BATCH)))
    consumed = model_rate()
    print(f"{'loader':<11} {'workers':>7} {'images/s':>9} {'x model':>8}")
    for name, workers, rate in rows:
        print(f"{name:<11} {workers:>7} {rate:>9.0f} {rate / consumed:>8.2f}")
    print(
        f"{'model':<11} {'':>7} {consumed:>9.0f}   "
        f"(tiny-cnn 64 px train step, batch {BATCH}, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
