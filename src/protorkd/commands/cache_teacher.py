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
`--external-teacher` reads. As ProtoCLIP's `RoBERTa.py` does, each row is L2-normalised before an exact PCA
(faiss' PCAMatrix, fitted on every corpus row; `--no-export-normalize` keeps the raw features). The teacher
pools as it does in training (MiniLM: the mean over the caption's tokens; ProtoCLIP's RoBERTa script
averaged all 77 padded positions, docs/method.md). For example, MiniLM captions reduced to 64 dimensions:

    protorkd cache-teacher --train-data train.tsv --text-model all-MiniLM-L6-v2 --teacher text \\
        --teacher-cache cache/ --export-npy minilm64.npy --pca-dim 64
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

from protorkd.commands.flag_types import integer
from protorkd.config import add_config_arguments, config_from_namespace, validate_config
from protorkd.models.options import TOWER_FLAGS

if TYPE_CHECKING:
    from protorkd.distributed import DistState

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
    "augmentation",
    "in_memory",
    "in_memory_budget_mb",
    "teacher",
    *TOWER_FLAGS,
    "clip_teacher_model",
    "clip_teacher_tag",
    "clip_teacher_images",
    "extra_text_teacher",
    "extra_text_teacher_builder",
    "teacher_views",
    "teacher_views_seed",
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
        "--pca-dim",
        type=integer(0, 16384),
        default=0,
        help="store an exact PCA (faiss PCAMatrix) to this many dimensions (default: 0, none)",
    )
    group.add_argument(
        "--export-npy", default=None, help="write the per-row features of --export-teacher to this .npy file"
    )
    group.add_argument(
        "--export-normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="L2-normalise each row before the PCA and the export, as ProtoCLIP (default: on; "
        "--no-export-normalize: the raw features)",
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
    group.add_argument(
        "--views",
        type=integer(1, 1000),
        default=None,
        help="fill a reinforced cache of this many stored augmented views per image for the run's image teacher "
        "(the same as --teacher-views; train with --teacher-views K)",
    )
    group.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="with --views: fill only every N-th chunk of the reinforced cache, starting at chunk I (run N processes, "
        "e.g. one per GPU, with 0/N ... N-1/N; the last to finish completes the cache). `auto`: this process's "
        "RANK/WORLD_SIZE under torchrun or SLURM, on its LOCAL_RANK's GPU",
    )
    add_config_arguments(parser, shown=CACHE_FLAGS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pathlib import Path

    from protorkd.data.corpus import ShardCorpus
    from protorkd.distributed import resolve_device, state_from_env
    from protorkd.errors import UsageError
    from protorkd.models.build import build_dual_encoder
    from protorkd.models.options import TeacherSide
    from protorkd.teachers.external import export_rows, fit_pca, save_pca, training_rows
    from protorkd.teachers.features import cached_teacher_features, reinforced_teacher_features, teacher_definitions
    from protorkd.train.checks import check_teacher_views
    from protorkd.train.data import in_memory_image_size, open_run_corpus
    from protorkd.train.task import view_recipe

    if args.views is not None:  # --views K is --teacher-views K
        args.teacher_views = args.views
    state = state_from_env()
    shard = _shard(args.shard, state)
    if args.shard is not None and not args.teacher_views:
        raise UsageError("--shard splits the fill of a reinforced cache: give --views K too")
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
    device = resolve_device(cfg.optim.device, state if args.shard == "auto" else None)
    root = Path(cfg.log.teacher_cache)
    recipe, student = None, None
    if cfg.model.teacher_views:  # a reinforced cache for the image teacher: views drawn as training draws them
        model = build_dual_encoder(cfg.model)
        check_teacher_views(cfg, model, streamed=False)
        loads_images = cfg.model.teacher_side is not TeacherSide.IMAGE
        size = in_memory_image_size(cfg.data, corpus, model.image_preprocess.image_size, loads_images)
        recipe, student = view_recipe(cfg, model, size), model.image_preprocess
    caches = {}
    for definition, _ in definitions:
        options = dict(needed=len(definitions), progress=True, batch_size=args.cache_batch_size)
        if recipe is not None and definition.modality == "image":
            cache = reinforced_teacher_features(
                definition, corpus, root, device, recipe, student, shard=shard, **options
            )
            if cache is None:
                print(f"{definition.name}: shard {shard[0]}/{shard[1]} filled; other shards' chunks are still missing")
                continue
        else:
            cache = cached_teacher_features(definition, corpus, root, device, **options)
        caches[definition.name] = cache
        shape = " x ".join(str(size) for size in cache.features.shape)
        print(f"{definition.name}: {cache.folder} ({len(cache.rows)} rows, features {shape})")

    if export_name not in caches:
        return 0
    cache = caches[export_name]
    if (args.pca_dim or args.export_npy) and cache.features.ndim != 2:
        raise UsageError(f"--pca-dim / --export-npy: {export_name}'s cache holds views, not one feature per row")
    pca = None
    if args.pca_dim:
        pca = fit_pca(training_rows(cache, seed=cfg.optim.seed), args.pca_dim, normalize=args.export_normalize)
        path = save_pca(cache, pca)
        print(f"{export_name}: PCA to {args.pca_dim} dimensions in {path}")
    if args.export_npy:
        path = export_rows(cache, Path(args.export_npy), pca=pca, normalize=args.export_normalize)
        width = args.pca_dim or cache.dim
        print(f"{export_name}: per-row features [{len(cache.rows)}, {width}] in {path}")
    return 0


def _shard(text: str | None, state: DistState) -> tuple[int, int]:
    """`--shard I/N` -> (I, N); `auto` -> (rank, world size) of the launcher's environment; none -> (0, 1)."""
    from protorkd.errors import UsageError

    if text is None:
        return 0, 1
    if text == "auto":
        return state.rank, state.world_size
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4, or auto under torchrun")
    return int(index), int(count)
