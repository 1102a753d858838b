"""A caption-supervised CIFAR-10 speed benchmark: the best template-classifier top-1 within a wall-clock budget of
training (issue 14: 3 minutes). Not zero-shot, and not evidence for a method (issue 23): the training captions are
the 18 evaluation templates filled with the class name, so the score is that of caption-supervised training read
through the classifier it trained towards.

    python benchmarks/cifar_proxy.py --out /tmp/cifar-proxy                      # the recorded recipe, on test
    python benchmarks/cifar_proxy.py --out /tmp/cifar-proxy --split val -- --lr 4e-3   # a candidate, on validation

Data (`ablation.write_cifar10`): all 5,000 training photos of ../shared/data/cifar10_jpg, each captioned with
every one of the 18 CLIP CIFAR-10 templates (a row each, 90,000 rows; an epoch draws 5,000 rows with
replacement; `--captions one`: one random template per photo, seed 0); validation: test photos 300-599 of each
class; test: the first 300 of each class (disjoint). The linear probe trains on 100 training photos per class;
the template classifier (the zero-shot protocol's, run on a student trained on its templates) uses all 18. The
teacher is the locked all-MiniLM-L6-v2, its caption features cached once
in OUT/cache. With the recipe's --caption-ensemble every photo trains towards the mean of its 18 captions'
features, which on this data is its class's prompt-ensemble classifier vector (docs/ablation.md says what that
means).

How the budget is kept: a 2-epoch run of the same recipe measures one epoch (the second; the first pays
start-up costs), then the run trains floor(budget / epoch seconds) epochs with its own warm-up and cosine
schedule; the report's training seconds show whether the epochs did fit (epochs on this machine class drift
by up to 15 % within minutes, so check them). Reported: each epoch's training seconds and their sum (what the
budget limits; evaluation, the corpus and the teacher cache are outside it), template-classifier and linear-probe
top-1 (`caption_supervised_top1`: the `zeroshot/cifar10/top1` metric of a student trained on the templates),
the CPU model and the load.
Run it on a quiet machine: the epoch count comes from a timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from ablation import SHARED, Study, write_cifar10
from bench_demo import machine

# The best recipe found on the validation split (docs/ablation.md lists the search), with --captions every.
RECIPE = [
    *("--image-model", "resnet9-tiny", "--image-size", "32", "--augmentation", "pad-crop-flip"),
    *("--batch-size", "256", "--lr", "6e-3", "--mixup-alpha", "1", "--mixup-prob", "0.5", "--caption-ensemble"),
]


def train(study: Study, name: str, data: dict, eval_root: Path, epochs: int, flags: list[str], tasks: str) -> dict:
    """One `protorkd train` run through the loss study's runner (a finished run folder is reused)."""
    run = study.train(name, flags, data=data["train"], eval_root=eval_root, epochs=epochs, seed=0, tasks=tasks)
    if "error" in run:
        raise SystemExit(f"{name}: {run['error']}")
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the data, the teacher cache and the runs")
    parser.add_argument("--split", choices=["val", "test"], default="test", help="evaluate on validation or test")
    parser.add_argument("--budget-seconds", type=float, default=180.0, help="training wall-clock budget")
    parser.add_argument("--epochs", type=int, default=0, help="skip the timing: train this many epochs")
    parser.add_argument(
        "--name",
        default="",
        help="run folder name under OUT/runs (default: split and time; a finished run of that name is reused)",
    )
    parser.add_argument(
        "--captions",
        choices=["one", "every"],
        default="every",
        help="every CLIP template as a caption of each photo (a row each; epochs of 5,000 rows drawn with "
        "replacement), or one random template per photo (the previous recipes)",
    )
    parser.add_argument("--cifar-root", type=Path, default=SHARED / "cifar10_jpg")
    parser.add_argument("--cifar-prompts", type=Path, default=SHARED / "clip_prompts" / "clip_zeroshot_prompts.json")
    parser.add_argument(
        "flags", nargs="*", help="after --: `protorkd train` flags added to (and overriding) the recipe"
    )
    args = parser.parse_args()

    if not args.cifar_root.exists():
        raise SystemExit(f"{args.cifar_root} not found: the proxy needs ../shared/data/cifar10_jpg")
    args.out.mkdir(parents=True, exist_ok=True)
    every = args.captions == "every"
    data = write_cifar10(args.out, args.cifar_root, args.cifar_prompts, val=300, probe_train=100, test=300,
                         val_from_test=True, every_template=every)  # fmt: skip
    flags = [*RECIPE, *(("--episode-size", "5000") if every else ()), *args.flags]
    name = args.name or f"{args.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    report: dict = {"machine": machine(), "recipe": flags, "split": args.split, "budget_seconds": args.budget_seconds}
    study = Study(args.out, common=[])
    epochs = args.epochs
    if not epochs:
        timing = train(study, f"{name}-timing", data, data["val"], 2, flags, tasks="")
        epoch_seconds = timing["seconds_per_epoch"][-1]
        epochs = max(1, math.floor(args.budget_seconds / epoch_seconds))
        report["timing_epoch_seconds"] = epoch_seconds
        print(f"one epoch: {epoch_seconds:.1f} s -> {epochs} epochs in {args.budget_seconds:.0f} s", flush=True)
    run = train(study, name, data, data[args.split], epochs, flags, tasks="zeroshot,linear")
    metrics = run["metrics"]
    report.update(
        epochs=epochs,
        seconds_per_epoch=run["seconds_per_epoch"],
        training_seconds=round(sum(run["seconds_per_epoch"]), 1),
        caption_supervised_top1=metrics.get("zeroshot/cifar10/top1"),  # its training captions are the templates
        linear_top1=metrics.get("linear_clip_benchmark_joint/cifar10/top1"),
        load_after=os.getloadavg()[0],
    )
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
