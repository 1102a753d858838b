"""`protorkd cache-teacher`: compute the locked teachers' features for a corpus once, before training.

It takes the same flags as `protorkd train` (--help lists those that decide the cache; the others are accepted
and ignored, so one command line or @file serves both) and fills `--teacher-cache DIR` with one
folder per teacher that such a training run uses (the student's locked tower, a `--clip-teacher-model`,
an `--extra-text-teacher`): fp16 memory-mapped features plus a manifest (corpus hash, teacher spec,
transform, dims, progress). An interrupted run resumes where it stopped; a cache whose manifest does not
match is refused with the differing fields. Train with the same flags and `--teacher-cache DIR` to read
it instead of running the teachers.

`--pca-dim D` stores a PCA of one teacher's features beside its cache; `--export-npy FILE` writes that
teacher's per-row features ([corpus rows, D] float32, PCA-reduced with --pca-dim), the layout ProtoCLIP's
`--external-teacher` reads. For example, MiniLM captions reduced to 64 dimensions:

    protorkd cache-teacher --train-data train.tsv --text-model all-MiniLM-L6-v2 --teacher text \\
        --teacher-cache cache/ --export-npy minilm64.npy --pca-dim 64
"""

from __future__ import annotations

import argparse
import logging
import os

from protorkd.commands.flag_types import integer
from protorkd.config import add_config_arguments, config_from_namespace, validate_config
from protorkd.models.options import TOWER_FLAGS

log = logging.getLogger(__name__)

# The `train` flags that decide which teacher features a run caches (what corpus, which teachers, how its images
# are read): a cache filled with them is the one `train` with the same flags reads. The others are accepted, not
# listed.
CACHE_FLAGS = (
    "train_data",
    "dataset_type",
    "csv_img_key",
    "csv_caption_key",
    "csv_separator",
    "csv_quoting",
    "dataset_size",
    "max_bad_fraction",
    "max_image_pixels",
    "max_caption_bytes",
    "demo_size",
    "demo_seed",
    "teacher",
    *TOWER_FLAGS,
    "clip_teacher_model",
    "clip_teacher_tag",
    "clip_teacher_images",
    "extra_text_teacher",
    "extra_text_teacher_builder",
    "seed",
    "device",
    "teacher_cache",
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache-teacher",
        help="compute the locked teachers' features for a corpus once (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("cache-teacher")
    group.add_argument(
        "--pca-dim", type=integer(0, 16384), default=0, help="store a PCA to this many dimensions (default: 0, none)"
    )
    group.add_argument(
        "--export-npy", default=None, help="write the per-row features of --export-teacher to this .npy file"
    )
    group.add_argument(
        "--export-teacher",
        default=None,
        help="which teacher --pca-dim / --export-npy use: text, image, clip-image, clip-text or extra-text "
        "(default: the first one of the run)",
    )
    group.add_argument(
        "--cache-batch-size", type=integer(1, 65536), default=256, help="teacher batch size (default: 256)"
    )
    add_config_arguments(parser, shown=CACHE_FLAGS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pathlib import Path

    from protorkd.data.corpus import ShardCorpus
    from protorkd.distributed import resolve_device
    from protorkd.errors import UsageError
    from protorkd.teachers.cache import export_rows, pca_projection, save_pca
    from protorkd.teachers.features import cached_teacher_features, teacher_definitions
    from protorkd.train.data import open_run_corpus

    cfg = config_from_namespace(args)
    validate_config(cfg)
    if not cfg.log.teacher_cache:
        raise UsageError("--teacher-cache DIR is required: the folder to fill (train later with the same flag)")
    definitions = teacher_definitions(cfg.model)
    if not definitions:
        raise UsageError(
            "these flags use no locked teacher: give --teacher text|image, --clip-teacher-model or --extra-text-teacher"
        )
    names = [definition.name for definition, _ in definitions]
    export_name = args.export_teacher or names[0]
    if export_name not in names:
        raise UsageError(f"--export-teacher {export_name}: this run's teachers are {', '.join(names)}")

    corpus = open_run_corpus(cfg.data)
    if isinstance(corpus, ShardCorpus):
        raise UsageError("cache-teacher needs a TSV corpus: teacher features are cached per row, shards have no rows")
    device = resolve_device(cfg.optim.device)
    root = Path(cfg.log.teacher_cache)
    caches = {}
    for definition, _ in definitions:
        cache = cached_teacher_features(
            definition,
            corpus,
            root,
            device,
            needed=len(definitions),
            progress=True,
            batch_size=args.cache_batch_size,
        )
        caches[definition.name] = cache
        unique = cache.features.shape[0]
        print(f"{definition.name}: {cache.folder} ({len(cache.rows)} rows, {unique} unique x {cache.dim})")

    cache = caches[export_name]
    pca = None
    if args.pca_dim:
        pca = pca_projection(cache.features, args.pca_dim, seed=cfg.optim.seed)
        path = save_pca(cache, pca)
        print(f"{export_name}: PCA to {args.pca_dim} dimensions in {path}")
    if args.export_npy:
        path = export_rows(cache, Path(args.export_npy), pca=pca)
        width = args.pca_dim or cache.dim
        print(f"{export_name}: per-row features [{len(cache.rows)}, {width}] in {path}")
    return 0
