"""`protorkd eval`: zero-shot, linear probe, retrieval, STS and feature analysis of a model.

The model is a checkpoint (`--checkpoint`, rebuilt from the config stored in it or its experiment's
params.txt) or the towers named by the same flags as `train` (a pretrained open_clip model, a
sentence-transformers model), evaluated without training. Tasks whose data is absent under
--eval-data-dir are reported as skipped. Prints a table; appends one JSON line to the experiment's
results.jsonl when evaluating an experiment's checkpoint; --output DIR writes one CLIP_benchmark result
file per dataset and task (`clip_benchmark build DIR` reads them).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from protorkd.commands import common
from protorkd.commands.flag_types import integer
from protorkd.config import Config, add_group_arguments
from protorkd.errors import UsageError
from protorkd.io import append_line, atomic_open
from protorkd.models.options import ARCHITECTURE_FLAGS, ModelOptions
from protorkd.train.logs import without_float_noise

if TYPE_CHECKING:
    from protorkd.eval.records import SuiteResult
    from protorkd.models.dual_encoder import DualEncoder

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint or a pretrained model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("evaluation")
    common.add_checkpoint_argument(group)
    common.add_eval_data_dir_argument(group)
    common.add_tasks_argument(group)
    group.add_argument(
        "--datasets",
        default=None,
        help="comma-separated image datasets to use (default: every one present; a named dataset "
        "that is absent is an error)",
    )
    group.add_argument(
        "--zeroshot-metadata",
        type=Path,
        help="JSON {dataset: {classes, templates}} overriding zero-shot class names and prompts "
        "(default: ROOT/zeroshot_metadata.json when it has the dataset, else OpenAI CLIP's names and "
        "templates shipped for every registered dataset; a generic folder dataset falls back to its "
        "folder names, with a warning)",
    )
    common.add_linear_probe_arguments(group)
    common.add_eval_precision_argument(group)
    group.add_argument(
        "--analysis-clusters",
        type=integer(2, 10_000),
        default=10,
        help="k of the image / text k-means compared by the analysis task (default: 10; at least 2)",
    )
    common.add_runtime_arguments(
        group, workers=min(4, os.cpu_count() or 1), workers_default="4, at most the number of CPUs"
    )
    group.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="also write one CLIP_benchmark result file per dataset and task into the folder DIR "
        "({dataset}_{pretrained}_{model}_{language}_{task}.json, fractions, CLIP_benchmark's metric names, "
        "95%% intervals)",
    )
    group.add_argument(
        "--per-class",
        action="store_true",
        help="with --output: also write each classification result's per-class recall beside its result "
        "file, as DIR/<its name, .per_class.csv for .json>",
    )
    group.add_argument(
        "--cache-dir",
        type=Path,
        help="where zero-shot classifiers and linear-probe features are cached (default: the "
        "experiment's cache/eval, else $PROTORKD_CACHE/eval)",
    )
    group.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    add_group_arguments(parser, "model", defaults=False, shown=ARCHITECTURE_FLAGS)
    parser.set_defaults(func=run)


@dataclasses.dataclass
class _Model:
    """The model to evaluate and what the records and the default data root need to know about it."""

    model: DualEncoder
    name: str  # the CLIP_benchmark record's "model"
    pretrained: str  # the CLIP_benchmark record's "pretrained"
    epoch: int | None = None
    experiment: Path | None = None
    training_run: Config | None = None  # for its default data root


def _load_model(args: argparse.Namespace, tower_flags: dict) -> _Model:
    if args.checkpoint is not None:
        from protorkd.loading import load_model_from_checkpoint

        if tower_flags:
            raise UsageError(
                "--checkpoint rebuilds the model from its own config; drop the tower flags "
                f"({', '.join('--' + k.replace('_', '-') for k in sorted(tower_flags))})"
            )
        loaded = load_model_from_checkpoint(args.checkpoint)
        log.info("model from %s (epoch %s, config: %s)", args.checkpoint, loaded.epoch, loaded.config_source)
        return _Model(
            loaded.model,
            f"protorkd:{loaded.name}",
            str(args.checkpoint),
            loaded.epoch,
            loaded.experiment_dir,
            common.training_run(loaded),
        )
    from protorkd.models.build import build_dual_encoder

    options = ModelOptions(**tower_flags)
    model = build_dual_encoder(options)
    model.eval()
    name = f"{options.image_model_builder}:{options.image_model}+{options.text_model_builder}:{options.text_model}"
    return _Model(model, name, options.image_model_tag or options.text_model_tag)


def format_table(result: SuiteResult) -> str:
    """The results as an aligned task / dataset / metric / value / 95 % interval table, then the skipped tasks."""
    rows = [("task", "dataset", "metric", "value", "95% CI")]
    for record in result.results:
        for metric, value in record.metrics.items():
            shown = f"{value:.4g}" if metric in ("l2", "weight_decay") else f"{value:.2f}"
            low, high = record.intervals.get(metric, (None, None))
            interval = f"[{low:.2f}, {high:.2f}]" if low is not None else ""
            rows.append((record.task, record.dataset, metric, shown, interval))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(width) if i < 3 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for task, reason in result.skipped.items():
        lines.append(f"skipped {task}: {reason}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from protorkd.eval.features import FeatureCache
    from protorkd.eval.records import per_class_rows, suite_records, write_records
    from protorkd.eval.suite import run_suite

    tasks = common.parse_tasks(args.tasks)
    common.check_zeroshot_metadata(args.zeroshot_metadata)
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {args.output}: not a folder (CLIP_benchmark results are one file each)")
    if args.per_class and args.output is None:
        raise UsageError("--per-class writes its CSV files beside the result files: give --output DIR too")
    model_fields = {f.name for f in dataclasses.fields(ModelOptions)}
    tower_flags = {k: v for k, v in vars(args).items() if k in model_fields}
    if args.checkpoint is None and not tower_flags:
        raise UsageError(
            "give --checkpoint PATH, or tower flags (e.g. --text-model-builder sbert --text-model "
            "all-MiniLM-L6-v2) to evaluate a model without training"
        )
    device = common.device_from(args)
    loaded = _load_model(args, tower_flags)
    root = common.eval_root(args.eval_data_dir, loaded.training_run)
    model = loaded.model.to(device)

    cache = None
    if not args.no_cache:
        from protorkd.data.demo import default_cache_root

        experiment = loaded.experiment
        cache = FeatureCache(
            args.cache_dir or (experiment / "cache" / "eval" if experiment else default_cache_root() / "eval")
        )
    options = common.eval_options(
        args, device, datasets=common.split_list(args.datasets), analysis_clusters=args.analysis_clusters, cache=cache
    )
    result = run_suite(model, root, tasks=tasks, options=options)
    print(format_table(result))

    metrics = result.metrics
    if loaded.experiment is not None and metrics:
        line = {
            "epoch": loaded.epoch,
            "evaluated_by": "protorkd eval",
            "checkpoint": str(args.checkpoint),
            "eval_data_dir": str(root),
            **options.record_fields(),
            **without_float_noise(metrics),
        }
        append_line(loaded.experiment / "results.jsonl", json.dumps(line))  # appended: earlier lines stay
        print(f"appended to {loaded.experiment / 'results.jsonl'}")
    if args.output is not None:
        paths = write_records(args.output, suite_records(result, model=loaded.name, pretrained=loaded.pretrained))
        print(f"wrote {len(paths)} CLIP_benchmark result files to {args.output}")
        if args.per_class:
            tables = [(path, r) for path, r in zip(paths, result.results) if r.per_class is not None]
            for path, record in tables:
                with atomic_open(path.with_suffix(".per_class.csv"), "w", newline="") as handle:
                    csv.writer(handle).writerows(per_class_rows(record))
            print(f"wrote {len(tables)} per-class CSV files beside them")
    return 0
