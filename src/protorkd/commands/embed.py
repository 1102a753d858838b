"""`protorkd embed --model PATH (--images DIR|TSV | --texts FILE) --out FILE.npy`: one embedding per input.

MODEL is a checkpoint, a run folder (its latest checkpoint) or an open_clip export folder. Writes FILE.npy
([N, D] float32, L2-normalised unless --no-normalize) and FILE.ids.txt, one id per row in the same order: an
image's path relative to --images DIR, a TSV's row number, a text file's line number (1-based). Inputs that
cannot be read are skipped and counted as training counts them (missing or corrupt images, unparseable rows,
empty texts); more than --max-bad-fraction of them stops with the first ones named.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from protorkd.commands import common
from protorkd.config import OptimConfig

TABLE_SUFFIXES = (".tsv", ".csv")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed a folder of images, a corpus TSV or a file of texts with a trained model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="a checkpoint, a run folder or an open_clip export folder"
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--images", type=Path, help="a folder of images (searched recursively), or a corpus TSV (its image column)"
    )
    inputs.add_argument(
        "--texts", type=Path, help="a UTF-8 file with one text per line, or a corpus TSV (its caption column)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the .npy file to write (ids go to FILE.ids.txt)")
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="L2-normalise the embeddings, as every protorkd evaluation does (default: normalise)",
    )
    parser.add_argument(
        "--precision",
        choices=next(f for f in dataclasses.fields(OptimConfig) if f.name == "precision").metadata["choices"],
        default="fp32",
        help="fp32; amp / amp_bf16: fp16 / bf16 autocast; bf16: bf16 weights; auto: the fastest the device "
        "computes natively (default: fp32)",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="stop when more than this fraction of the inputs cannot be read (default: 0.01, as training)",
    )
    parser.add_argument("--csv-img-key", default="filepath", help="a TSV's image column (default: filepath)")
    parser.add_argument("--csv-caption-key", default="title", help="a TSV's caption column (default: title)")
    parser.add_argument("--csv-separator", default="\t", help="a TSV's column separator (default: tab)")
    common.add_runtime_arguments(parser, workers=min(4, os.cpu_count() or 1), workers_default="4, at most the CPUs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from protorkd import embedding
    from protorkd.errors import UsageError
    from protorkd.io import atomic_path, atomic_write
    from protorkd.loading import load
    from protorkd.precision import Precision

    if args.out.suffix != ".npy":
        raise UsageError(f"--out {args.out}: expected a .npy file")
    if not 0 <= args.max_bad_fraction <= 1:
        raise UsageError(f"--max-bad-fraction {args.max_bad_fraction}: must be between 0 and 1")
    source, kind = (args.images, "image") if args.images is not None else (args.texts, "text")
    flag = f"--{kind}s"
    if source.is_dir() and kind == "image":
        inputs = embedding.image_folder(source)
    elif source.suffix.lower() in TABLE_SUFFIXES:
        inputs = embedding.corpus_column(source, kind, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                                         separator=args.csv_separator, flag=flag)  # fmt: skip
    elif kind == "text":
        inputs = embedding.text_lines(source)
    else:
        raise UsageError(f"{flag} {source}: expected a folder of images or a corpus .tsv / .csv")
    device = common.device_from(args)
    model, preprocess, tokenizer = load(args.model)
    result = embedding.embed(
        model,
        inputs,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=device,
        precision=Precision.resolve(args.precision, device),
        batch_size=args.batch_size,
        workers=args.workers,
        normalize=args.normalize,
        max_bad_fraction=args.max_bad_fraction,
    )
    result.bad.report(str(source))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        np.save(tmp, result.features)
    ids = args.out.with_suffix(".ids.txt")
    atomic_write(ids, "".join(f"{item}\n" for item in result.ids))
    print(f"wrote {len(result.ids)} embeddings {tuple(result.features.shape)} to {args.out}, ids to {ids}"
          + (f"; skipped {len(result.bad.bad)} unreadable inputs" if result.bad.bad else ""))  # fmt: skip
    return 0
