"""`protorkd elevater`: ELEVATER image classification (20 datasets) of a checkpoint, zero-shot or linear probe.

Reads the datasets in their published format under --dataset-root (docs/elevater.md: how to download them,
the layout, the metrics, the protocol). Each dataset is scored with its official metric; zero-shot uses the
toolkit's class names and templates; --mode linear_probe with --num-shots N samples N training images per
class for each seed and reports the mean and std over seeds. Writes, under EXP_DIR/ELEVATER_evaluation/
{zeroshot | linear_probe | N-shot}/ (EXP_DIR: the folder holding the checkpoint's checkpoints/ folder), one
<dataset>.json per dataset, summary.csv (one row per dataset and the average), clip_benchmark/ (one
CLIP_benchmark result file per dataset, as `protorkd eval --output`) and log.txt.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import time
from pathlib import Path

from protorkd.commands import common
from protorkd.errors import UsageError
from protorkd.eval.elevater import PROBES

log = logging.getLogger(__name__)
MODES = ("zeroshot", "linear_probe")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "elevater",
        help="ELEVATER image classification: zero-shot or linear probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("ELEVATER")
    common.add_checkpoint_argument(group)
    group.add_argument(
        "--dataset-root",
        type=Path,
        help="folder holding the downloaded datasets (classification/<name>_<date>/ or "
        "<name>/ folders; see docs/elevater.md)",
    )
    group.add_argument("--mode", choices=MODES, help="zeroshot or linear_probe (required)")
    group.add_argument(
        "--num-shots",
        type=int,
        default=-1,
        help="linear_probe: training images per class (ELEVATER uses 5, 20, 50), -1 for all (default: -1)",
    )
    group.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds of the few-shot subsets and validation splits; the mean and "
        "std over them is reported (default: 0,1,2 with --num-shots, else 0)",
    )
    group.add_argument(
        "--datasets",
        default=None,
        help="comma-separated datasets (default: every ELEVATER dataset found under "
        "--dataset-root); `--datasets list` prints the names",
    )
    group.add_argument(
        "--definitions",
        type=Path,
        default=None,
        help="the download's vision_datasets.json, to take folder and index-file names from "
        "(default: DATASET_ROOT/vision_datasets.json when present, else the standard names)",
    )
    group.add_argument(
        "--zeroshot-metadata",
        type=Path,
        default=None,
        help="JSON {dataset: {classes, templates}} overriding class names and prompts (keys: our "
        "dataset names or the hub names; default: the ELEVATER toolkit's class names and templates, "
        "shipped with protorkd)",
    )
    common.add_linear_features_argument(group)
    group.add_argument(
        "--probe",
        choices=PROBES,
        default="toolkit",
        help="linear_probe: toolkit (the toolkit's own head: BatchNorm, a linear layer initialised with the text "
        "embeddings, SGD over 6 learning rates x the L2 search, 10 epochs, 50 in the final run) or lbfgs "
        "(logistic regression solved to convergence, the same split and L2 search) (default: toolkit)",
    )
    common.add_eval_precision_argument(group)
    group.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="write results here instead of EXP_DIR/ELEVATER_evaluation/<mode>/",
    )
    group.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write the CLIP_benchmark result files (one per dataset) into DIR",
    )
    common.add_runtime_arguments(group, workers=4, items="images or prompts")
    parser.set_defaults(func=run)


def _seeds(args: argparse.Namespace) -> tuple[int, ...]:
    if args.seeds is None:
        return (0, 1, 2) if args.mode == "linear_probe" and args.num_shots > 0 else (0,)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError as error:
        raise UsageError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from error
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {args.seeds!r}: give at least one seed, each once")
    return seeds


def _check_args(args: argparse.Namespace) -> None:
    missing = [
        flag
        for flag, value in (
            ("--checkpoint", args.checkpoint),
            ("--dataset-root", args.dataset_root),
            ("--mode", args.mode),
        )
        if value is None
    ]
    if missing:
        raise UsageError(
            f"{', '.join(missing)} required (e.g. --checkpoint RUN/checkpoints/epoch_32.pt "
            "--dataset-root DATA --mode zeroshot)"
        )
    if args.num_shots == 0 or args.num_shots < -1:
        raise UsageError(f"--num-shots {args.num_shots}: give a positive number of images per class, or -1 for all")
    if args.mode == "zeroshot" and args.num_shots != -1:
        raise UsageError("--num-shots applies to --mode linear_probe only; drop it for zeroshot")
    if not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    if not args.dataset_root.is_dir():
        raise UsageError(f"--dataset-root {args.dataset_root}: no such folder (see docs/elevater.md)")
    for flag, path in (("--definitions", args.definitions), ("--zeroshot-metadata", args.zeroshot_metadata)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {args.output}: not a folder (CLIP_benchmark results are one file each)")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")


def _select(args: argparse.Namespace, definitions: dict | None) -> list:
    """[(spec, layout)] of the datasets to evaluate; a named dataset that is absent is an error."""
    from protorkd.eval.elevater_format import ELEVATER_DATASETS, candidate_folders, locate

    names = [n.strip() for n in args.datasets.split(",") if n.strip()] if args.datasets else None
    chosen = []
    for name in names or ELEVATER_DATASETS.names():
        spec = ELEVATER_DATASETS.get(name)
        layout = locate(args.dataset_root, spec, definitions)
        if layout is None and names:
            looked = ", ".join(str(p / spec.test_index) for p in candidate_folders(args.dataset_root, spec)[-4:])
            raise UsageError(
                f"{spec.name} is not under {args.dataset_root}: found no "
                f"classification/{spec.folder_prefix}_<date>/{spec.test_index}, nor {looked}"
            )
        if layout is None:
            log.info("%s: not under %s, skipped", spec.name, args.dataset_root)
            continue
        chosen.append((spec, layout))
    if not chosen:
        raise UsageError(
            f"no ELEVATER dataset under {args.dataset_root} (expected e.g. "
            "classification/cifar_10_20211007/test.txt; see docs/elevater.md)"
        )
    return chosen


def _prompts(spec, split, metadata: dict | None) -> tuple[list, list[str], str]:
    """(class names, templates, where they came from) for zero-shot."""
    from protorkd.eval.elevater import toolkit_prompts
    from protorkd.eval.zeroshot import DEFAULT_TEMPLATES, find_metadata_entry

    entry = find_metadata_entry(metadata, (spec.name, spec.hub_name)) if metadata else None
    if entry is not None:
        if len(entry["classes"]) != len(split.classnames):
            raise UsageError(
                f"--zeroshot-metadata entry for {spec.name} lists {len(entry['classes'])} classes; "
                f"{split.index_file.parent} has {len(split.classnames)}"
            )
        return list(entry["classes"]), list(entry.get("templates") or DEFAULT_TEMPLATES), "--zeroshot-metadata"
    classnames, templates = toolkit_prompts(spec.hub_name, len(split.classnames))
    return classnames, templates, "ELEVATER toolkit"


def _experiment_dir(checkpoint: Path, loaded) -> Path:
    if loaded.experiment_dir is not None:
        return Path(loaded.experiment_dir)
    folder = checkpoint.resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.datasets == "list":
        from protorkd.eval.elevater_format import ELEVATER_DATASETS

        for name in ELEVATER_DATASETS.names():
            spec = ELEVATER_DATASETS.get(name)
            print(f"{name:15s} {spec.metric:15s} hub name {spec.hub_name}")
        return 0
    _check_args(args)
    seeds = _seeds(args)
    from protorkd.data.transforms import eval_transform
    from protorkd.eval import elevater
    from protorkd.eval.datasets import load_zeroshot_metadata
    from protorkd.eval.elevater_format import DEFINITIONS_FILE, load_definitions, read_split
    from protorkd.eval.features import resolve_eval_precision
    from protorkd.eval.records import elevater_record, to_json, write_records
    from protorkd.io import atomic_open, atomic_write

    definitions_file = args.definitions or (args.dataset_root / DEFINITIONS_FILE)
    definitions = load_definitions(definitions_file) if definitions_file.is_file() else None
    selected = _select(args, definitions)
    metadata = load_zeroshot_metadata(args.zeroshot_metadata) if args.zeroshot_metadata else None

    from protorkd.loading import load_model_from_checkpoint

    device = common.device_from(args)
    precision = resolve_eval_precision(args.eval_precision, device)
    loaded = load_model_from_checkpoint(args.checkpoint)
    model = loaded.model.to(device)
    transform = eval_transform(model.image_preprocess)

    out = args.results_dir or elevater.results_folder(
        _experiment_dir(args.checkpoint, loaded), args.mode, args.num_shots
    )
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        log.info(
            "ELEVATER %s%s of %s (epoch %s) on %d dataset(s) -> %s",
            args.mode,
            f" {args.num_shots}-shot" if args.num_shots > 0 else "",
            args.checkpoint,
            loaded.epoch,
            len(selected),
            out,
        )
        results, records = {}, []
        for spec, layout in selected:
            started = time.time()
            test = read_split(layout, spec, "test")
            info = {
                "dataset": spec.name,
                "hub_name": spec.hub_name,
                "metric": spec.metric,
                "mode": args.mode,
                "folder": str(layout.folder),
                "checkpoint": str(args.checkpoint),
                "epoch": loaded.epoch,
                "test_images": len(test),
                "classes": len(test.classnames),
                "precision": precision.value,
            }
            if args.mode == "zeroshot":
                classnames, templates, source = _prompts(spec, test, metadata)
                metrics = elevater.evaluate_zeroshot(
                    model,
                    test,
                    classnames=classnames,
                    templates=templates,
                    metric=spec.metric,
                    transform=transform,
                    device=device,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    precision=precision,
                )
                info.update(prompts_from=source, templates=len(templates))
            else:
                train = read_split(layout, spec, "train")
                text_head = args.probe == "toolkit" and args.linear_features == "joint"  # the toolkit's init
                classnames, templates, source = _prompts(spec, test, metadata) if text_head else ([], [], "")
                metrics = elevater.evaluate_linear_probe(
                    model,
                    train,
                    test,
                    metric=spec.metric,
                    transform=transform,
                    device=device,
                    num_shots=args.num_shots,
                    seeds=seeds,
                    features=args.linear_features,
                    probe=args.probe,
                    text_prompts=(classnames, templates) if text_head else None,
                    full_search_shots=spec.full_search_shots,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    precision=precision,
                )
                info.update(
                    num_shots=args.num_shots,
                    seeds=list(seeds),
                    features=args.linear_features,
                    probe=args.probe,
                    train_images_available=len(train),
                )
                if text_head:
                    info.update(head_initialised_by=source, templates=len(templates))
            info.update(metrics=metrics, seconds=round(time.time() - started, 2))
            atomic_write(out / f"{spec.name}.json", to_json(info))
            log.info("%s: %s %.2f", spec.name, spec.metric, metrics["score"])
            results[spec.name] = metrics
            records.append(
                elevater_record(
                    spec.name,
                    metrics,
                    official_metric=spec.metric,
                    linear_probe=args.mode == "linear_probe",
                    model=f"protorkd:{loaded.name}",
                    pretrained=str(args.checkpoint),
                    features=args.linear_features,
                    num_shots=args.num_shots,
                    seeds=seeds,
                    protocol="elevater" if args.probe == "toolkit" else f"elevater_{args.probe}",
                    precision=precision.value,
                )
            )

        rows = elevater.summary_rows(results, {spec.name: spec.metric for spec, _ in selected})
        with atomic_open(out / "summary.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
        write_records(out / "clip_benchmark", records)
        if args.output is not None:
            write_records(args.output, records)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)).rstrip())
    print(f"results: {out}")
    if args.output is not None:
        print(f"wrote {args.output}")
    return 0
