"""Pack gathered images into webdataset tar shards, one shard per `shard_size` consecutive input rows.

Shard s holds the gathered images of input rows [s * shard_size, (s + 1) * shard_size) in input
order, as `{key}.jpg` (the JPEG), `{key}.txt` (the caption) and `{key}.json` (row metadata). Images
are staged under `images/<shard>/` while their shard fills; the tar is written to a temporary name
and moved into place (fsynced rename) only when every row of the shard is done, so an existing
`00042.tar` is always complete. Member times are fixed, so the same rows give byte-identical shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from protorkd.io import atomic_write, replace


def shard_name(shard: int) -> str:
    return f"{shard:05d}.tar"


def pack_shard(out_dir: Path, shard: int, samples: list[dict], tmp_dir: Path) -> int:
    """Write `out_dir/<shard>.tar` from `samples` ({"key", "caption", "image_path", "meta"}); returns the count.

    The staging folder `out_dir/images/<shard>/` is removed afterwards.
    """
    import webdataset as wds  # imports torch (~1 s); only the webdataset format needs it

    tmp_path = tmp_dir / shard_name(shard)
    with open(tmp_path, "wb") as handle, wds.TarWriter(handle, mtime=0.0, user="protorkd", group="protorkd") as writer:
        for sample in samples:
            writer.write(
                {
                    "__key__": sample["key"],
                    "jpg": Path(sample["image_path"]).read_bytes(),
                    "txt": sample["caption"],
                    "json": json.dumps(sample["meta"], ensure_ascii=False, sort_keys=True),
                }
            )
    replace(tmp_path, out_dir / shard_name(shard))
    shutil.rmtree(out_dir / "images" / f"{shard:05d}", ignore_errors=True)
    return len(samples)


def shards_spec(num_shards: int) -> str:
    """The brace pattern naming every shard, e.g. `{00000..00330}.tar` (what --train-data takes)."""
    return f"{{{0:05d}..{num_shards - 1:05d}}}.tar" if num_shards > 1 else shard_name(0)


def write_sizes(out_dir: Path, sizes: dict[int, int]) -> None:
    """`sizes.json` ({"00000.tar": n, ...}), which open_clip reads to learn a shard folder's sample count."""
    payload = {shard_name(shard): count for shard, count in sorted(sizes.items())}
    atomic_write(out_dir / "sizes.json", json.dumps(payload, indent=1) + "\n")
