"""`protorkd eval`: zero-shot, linear probe, retrieval, STS and feature analysis of a model.

The model is a checkpoint (`--checkpoint`, rebuilt from the config stored in it or its experiment's
params.txt) or the towers named by the same flags as `train` (a pretrained open_clip model, a
sentence-transformers model), evaluated without training. Tasks whose data is absent under
--eval-data-dir are reported as skipped. Prints a table; appends one JSON line to the experiment's
results.jsonl when evaluating an experiment's checkpoint; --output writes CLIP_benchmark's schema.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from protorkd.config import ModelConfig, add_group_arguments
from protorkd.errors import UsageError

log = logging.getLogger(__name__)
TASKS = ("zeroshot", "linear", "retrieval", "sts", "analysis")
CLIP_BENCHMARK_TASKS = {
    "zeroshot": "zeroshot_classification",
    "linear": "linear_probe",
    "retrieval": "zeroshot_retrieval",
    "sts": "sts",
    "analysis": "feature_analysis",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint or a pretrained model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("evaluation")
    group.add_argument("--checkpoint", type=Path, help="checkpoint to evaluate (<experiment>/checkpoints/epoch_N.pt)")
    group.add_argument(
        "--eval-data-dir",
        type=Path,
        help="data root (layout: docs/data.md; default: the checkpoint's --eval-data-dir, or the "
        "demo corpus' eval/ folder for a demo run)",
    )
    group.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help="comma-separated tasks among " + ", ".join(TASKS) + " (default: all; a task whose "
        "data is absent is skipped)",
    )
    group.add_argument(
        "--datasets",
        default=None,
        help="comma-separated image datasets to use (default: every one present; a named dataset "
        "that is absent is an error)",
    )
    group.add_argument(
        "--zeroshot-metadata",
        type=Path,
        help="JSON {dataset: {classes, templates}} with zero-shot class names and prompts, e.g. "
        "CLIP's clip_zeroshot_prompts.json (default: ROOT/zeroshot_metadata.json, open_clip's "
        "ImageNet lists, then the dataset's own class names)",
    )
    group.add_argument(
        "--linear-solver",
        choices=("torch", "sklearn"),
        default="torch",
        help="linear-probe solver: torch L-BFGS (fast) or sklearn (reference) (default: torch)",
    )
    group.add_argument(
        "--analysis-clusters",
        type=int,
        default=10,
        help="k of the image / text k-means compared by the analysis task (default: 10)",
    )
    group.add_argument("--batch-size", type=int, default=256, help="images or texts per batch (default: 256)")
    group.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="data-loading worker processes (default: 4, at most the number of CPUs)",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: auto)")
    group.add_argument(
        "--output",
        type=Path,
        help="also write the results as a JSON list of CLIP_benchmark "
        "records (dataset, model, pretrained, task, metrics)",
    )
    group.add_argument(
        "--cache-dir",
        type=Path,
        help="where zero-shot classifiers and linear-probe features are cached (default: the "
        "experiment's cache/eval, else $PROTORKD_CACHE/eval)",
    )
    group.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    add_group_arguments(parser, "model", defaults=False)
    parser.set_defaults(func=run)


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    return items or None


def _default_root(config_values: dict) -> Path | None:
    """The data root a training run used: its --eval-data-dir, or the demo corpus' eval/ folder."""
    if not config_values:
        return None
    if config_values.get("eval_data_dir"):
        return Path(config_values["eval_data_dir"])
    if config_values.get("train_data") is None:
        from protorkd.data.demo import demo_corpus_dir

        root = demo_corpus_dir(config_values.get("demo_size", 10240), config_values.get("demo_seed", 0)) / "eval"
        return root if root.is_dir() else None
    return None


def _load_model(args: argparse.Namespace, tower_flags: dict):
    """(model, description dict for the records, experiment dir or None, training config values)."""
    if args.checkpoint is not None:
        if tower_flags:
            raise UsageError(
                "--checkpoint rebuilds the model from its own config; drop the tower flags "
                f"({', '.join('--' + k.replace('_', '-') for k in sorted(tower_flags))})"
            )
        from protorkd.eval.loading import load_model_from_checkpoint

        loaded = load_model_from_checkpoint(args.checkpoint)
        log.info("model from %s (epoch %s, config: %s)", args.checkpoint, loaded.epoch, loaded.config_source)
        description = {"model": f"protorkd:{loaded.name}", "pretrained": str(args.checkpoint), "epoch": loaded.epoch}
        return loaded.model, description, loaded.experiment_dir, loaded.train_config
    from protorkd.models.build import build_dual_encoder

    config = ModelConfig(**tower_flags)
    model = build_dual_encoder(config)
    model.eval()
    description = {
        "model": f"{config.image_model_builder}:{config.image_model}+{config.text_model_builder}:{config.text_model}",
        "pretrained": config.image_model_tag or config.text_model_tag,
    }
    return model, description, None, {}


def format_table(result) -> str:
    rows = [("task", "dataset", "metric", "value")]
    for record in result.results:
        for metric, value in record.metrics.items():
            rows.append((record.task, record.dataset, metric, f"{value:.4g}" if metric == "l2" else f"{value:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) if i < 3 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for task, reason in result.skipped.items():
        lines.append(f"skipped {task}: {reason}")
    return "\n".join(lines)


def clip_benchmark_records(result, description: dict) -> list[dict]:
    """CLIP_benchmark's result schema: metrics as fractions, its metric names where it has them."""
    renames = {
        "zeroshot": {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"},
        "linear": {
            "top1": "lp_acc1",
            "top5": "lp_acc5",
            "mean_per_class_recall": "lp_mean_per_class_recall",
            "val_top1": "lp_val_acc1",
        },
    }
    records = []
    for record in result.results:
        metrics: dict[str, float] = {}
        for key, value in record.metrics.items():
            if record.task in renames and key in renames[record.task]:
                metrics[renames[record.task][key]] = value / 100.0
            elif record.task == "retrieval" and "_R@" in key:
                direction, k = key.split("_R@")
                name = "image_retrieval_recall" if direction == "text_to_image" else "text_retrieval_recall"
                metrics[f"{name}@{k}"] = value / 100.0
            else:
                metrics[key] = value
        records.append(
            {
                "dataset": record.clip_benchmark_name or record.dataset,
                "model": description["model"],
                "pretrained": description["pretrained"],
                "task": CLIP_BENCHMARK_TASKS[record.task],
                "metrics": metrics,
                "language": "en",
            }
        )
    return records


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from protorkd.eval.features import FeatureCache
    from protorkd.eval.suite import EvalOptions, run_suite

    tasks = _split(args.tasks) or list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UsageError(f"--tasks: unknown {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    if args.zeroshot_metadata is not None and not args.zeroshot_metadata.is_file():
        raise UsageError(f"--zeroshot-metadata {args.zeroshot_metadata}: no such file")
    model_fields = {f for f in ModelConfig.__dataclass_fields__}
    tower_flags = {k: v for k, v in vars(args).items() if k in model_fields}
    if args.checkpoint is None and not tower_flags:
        raise UsageError(
            "give --checkpoint PATH, or tower flags (e.g. --text-model-builder sbert --text-model "
            "all-MiniLM-L6-v2) to evaluate a model without training"
        )
    from protorkd.distributed import DistState
    from protorkd.train.setup import resolve_device

    device = resolve_device(args.device, DistState())
    model, description, experiment, train_values = _load_model(args, tower_flags)
    root = args.eval_data_dir or _default_root(train_values)
    if root is None:
        raise UsageError("--eval-data-dir is required (the data root; see docs/data.md)")
    if not Path(root).is_dir():
        raise UsageError(f"--eval-data-dir {root}: no such folder")
    model.to(device)

    cache = None
    if not args.no_cache:
        from protorkd.data.demo import default_cache_root

        cache = FeatureCache(
            args.cache_dir or (experiment / "cache" / "eval" if experiment else default_cache_root() / "eval")
        )
    options = EvalOptions(
        device=device,
        batch_size=args.batch_size,
        workers=args.workers,
        datasets=_split(args.datasets),
        zeroshot_metadata=args.zeroshot_metadata,
        linear_solver=args.linear_solver,
        analysis_clusters=args.analysis_clusters,
        cache=cache,
    )
    result = run_suite(model, Path(root), tasks=tasks, options=options)
    print(format_table(result))

    metrics = result.metrics
    if experiment is not None and metrics:
        line = {
            "epoch": description.get("epoch"),
            "evaluated_by": "protorkd eval",
            "checkpoint": str(args.checkpoint),
            "eval_data_dir": str(root),
            **metrics,
        }
        with open(experiment / "results.jsonl", "a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(f"appended to {experiment / 'results.jsonl'}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(clip_benchmark_records(result, description), indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0
