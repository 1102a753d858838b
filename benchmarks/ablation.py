"""Loss ablation at equal wall-clock budgets, 3 seeds, hyperparameters chosen on validation splits.

    python benchmarks/ablation.py --out /tmp/ablation                       # the whole study (see docs/ablation.md)
    python benchmarks/ablation.py --out /tmp/ablation --stage plateau       # one stage only
    python benchmarks/ablation.py --out /tmp/ablation --datasets demo --seeds 0

Stages, in order (each run is a `python -m protorkd train` subprocess whose finished folder is reused, so
a killed study resumes where it stopped; OUT/study.json holds everything measured):

  plateau    InfoNCE trained to --plateau-epochs / 4, / 2 and x 1 (each with its own schedule), zero-shot on the
             validation split: the budget is the smallest whose top-1 is within --plateau-tolerance points of
             the best budget's (more training no longer helps). Measured first, per dataset.
  cost       one epoch of every configuration, twice (interleaved with InfoNCE; the faster of the two) ->
             seconds per epoch relative to InfoNCE; a configuration trains round(budget epochs / relative
             cost) epochs (at least 1), so all spend InfoNCE's budget of wall-clock time (to the rounding of
             one epoch).
  tune       each family's key hyperparameter (SEARCH below), seed 0, --tune-fraction of the budget, scored
             on the VALIDATION split (validation zero-shot top-1); the best value of each family goes on.
  test       every family with its chosen value, plus the combinations, --seeds each, on the TEST split:
             mean +- std (sample std over seeds) of zero-shot and linear-probe top-1 beside their mean
             per-class recall, retrieval R@1, and the representation diagnostics of every row.

A loss "wins" only where its balanced metric (mean per-class recall) is more than 2 standard errors of the
difference above InfoNCE's (`verdict`); a top-1 win without one is reported as "top-1 only", never as a win.
`--candidates InfoNCE,SimReg-L1 --budget-epochs N` is a quick check instead of the study: those candidates
only, N epochs each (no cost or tuning stage).

Datasets:
  demo     the built-in shapes corpus (`--demo-size` rows, seed 0). Test: its held-out split `shapes`, the
           compositional split `shapes_unseen` (shape-colour pairs and phrasings never seen in training), both
           balanced, and the unbalanced `shapes_skewed` (seen pairs, Zipf-sized classes, 200 down to 25 images).
           Validation: the held-out split of the demo corpus drawn with seed 1 (other scenes, same
           distribution), never the test scenes.
  cifar10  a caption-supervised CIFAR-10 benchmark: CIFAR-10 train photos (../shared/data/cifar10_jpg), each
           captioned with one random CLIP CIFAR-10 template, which names its class: the "zero-shot" evaluation
           scores the photos against those same templates, so its number is caption-supervised classification,
           not zero-shot (the tables say so). Validation: the last --cifar-val photos per class of the train
           folder, held out of training. Test: the first --cifar-test photos per class of the test folder.
           Linear probes train on --cifar-probe-train training photos per class.

Student: tiny-cnn image tower + linear head; teacher: the locked all-MiniLM-L6-v2 text tower, its features
cached once per corpus (OUT/cache) and shared by every run. The `teacher` stage (after the plateau) trains the
rows' other teachers once per dataset: a CLIP teacher for the CLIP-KD rows (`teachers`) and ProtoCLIP's
external teacher. Prints markdown tables; docs/ablation.md has them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PROTOCLIP_FLAGS = ["--k", "64", "--add-projection-head", "--PBT"]
CLIP_KD_FLAGS = ["--extra-text-teacher", "all-MiniLM-L6-v2"]
# Placeholders `Study.train` fills per dataset: the CLIP teacher the `teacher` stage trained and exported, the
# external teacher ProtoCLIP reads (the study's MiniLM captions, normalised, PCA 64, as ProtoCLIP's RoBERTa), and
# ProtoCLIP's published schedule at the run's epochs (`published_protoclip`).
CLIP_TEACHER, EXTERNAL_TEACHER, PUBLISHED_SCHEDULE = "{clip_teacher}", "{external_teacher}", "{published_schedule}"
REAL_TEACHER = ["--clip-teacher-model", CLIP_TEACHER]

# family -> [(label, train flags)]: the candidates tuned on validation (the first is the family's default).
SEARCH: dict[str, list[tuple[str, list[str]]]] = {
    "contrastive": [("InfoNCE", ["--loss", "InfoNCE"])],
    "regression": [
        ("SimReg", ["--loss", "SimReg"]),
        ("SimReg-L1", ["--loss", "SimReg-L1"]),
        ("SimReg-SmoothL1", ["--loss", "SimReg-SmoothL1"]),
    ],
    "relational": [
        ("RKD d1 a2", ["--loss", "RKD", "--w-rkd-d", "1", "--w-rkd-a", "2"]),
        ("RKD d0.5 a1", ["--loss", "RKD"]),
    ],
    "similarity distribution": [
        ("CompRess-1q", ["--loss", "CompRess-1q"]),
        ("CompRess-2q", ["--loss", "CompRess-2q"]),
        ("SEED", ["--loss", "SEED"]),
    ],
    "redundancy": [("VICReg", ["--loss", "VICReg"]), ("BarlowTwins", ["--loss", "BarlowTwins"])],
    "shared prototypes": [
        ("ProtoRKD", ["--loss", "ProtoRKD"]),
        ("ProtoCPC", ["--loss", "ProtoCPC"]),
        ("DINO", ["--loss", "DINO"]),
    ],
    # CLIP-KD's loss with the MiniLM caption embedding standing in for both teachers: no CLIP teacher (issue 23)
    "CLIP-KD form with a text teacher only": [
        ("CLIP-KD form (MiniLM as both teachers)", ["--loss", "CLIP-KD", *CLIP_KD_FLAGS])
    ],
    # CLIP-KD with a real CLIP teacher: a larger two-tower model protorkd trained on the same corpus for twice the
    # budget (the `teacher` stage), online (CLIP-KD's own form) or from a reinforced cache of 10 views per image
    "CLIP teacher KD online": [("CLIP-KD (CLIP teacher online)", ["--loss", "CLIP-KD", *REAL_TEACHER])],
    "CLIP teacher KD reinforced": [
        ("CLIP-KD (CLIP teacher reinforced)", ["--loss", "CLIP-KD", *REAL_TEACHER, "--teacher-views", "10"])
    ],
    "episodic prototypes": [("ProtoCLIP", ["--loss", "ProtoCLIP", *PROTOCLIP_FLAGS])],
    # ProtoCLIP's published recipe (configs/protoclip-cc2.5m-1gpu.args) scaled to the run's epochs
    "episodic prototypes (published schedule)": [
        ("ProtoCLIP (published schedule)", ["--loss", "ProtoCLIP", PUBLISHED_SCHEDULE])
    ],
    "InfoNCE + relational": [
        ("InfoNCE+RKD 1,0.5", ["--loss", "InfoNCE+RKD", "--loss-weights", "1,0.5"]),
        ("InfoNCE+RKD 1,2", ["--loss", "InfoNCE+RKD", "--loss-weights", "1,2"]),
    ],
    "InfoNCE + prototypes": [
        ("InfoNCE+ProtoRKD 1,0.25", ["--loss", "InfoNCE+ProtoRKD", "--loss-weights", "1,0.25"]),
        ("InfoNCE+ProtoRKD 1,1", ["--loss", "InfoNCE+ProtoRKD", "--loss-weights", "1,1"]),
    ],
    "InfoNCE + relational + prototypes": [
        ("InfoNCE+RKD+ProtoRKD", ["--loss", "InfoNCE+RKD+ProtoRKD", "--loss-weights", "1,0.5,0.25"]),
    ],
}


def write_cifar10(
    out: Path,
    source: Path,
    prompts: Path,
    *,
    val: int,
    probe_train: int,
    test: int,
    val_from_test: bool = False,
    every_template: bool = False,
) -> dict:
    """OUT/cifar10/train.tsv (train photos minus the last `val` per class, one random template caption each,
    shuffled) and two eval roots of symlinks, OUT/cifar10-val and OUT/cifar10-test, each
    `cifar10/{train,test}/<class>/` + zeroshot_metadata.json. The roots share the probe's train images.

    `val_from_test`: train on every train photo and validate on the `val` test photos per class that follow
    the `test` ones (disjoint from the test photos; a larger validation set than the train folder can spare).
    `every_template`: OUT/cifar10/train-every-template.tsv instead, a row per photo and template (18 captions
    of each photo)."""
    entry = json.loads(prompts.read_text())["CIFAR10"]
    classes, templates = entry["classes"], entry["templates"]
    rng = random.Random(0)
    rows, probe, held_out, tests = [], {}, {}, {}
    for name in classes:
        photos = sorted((source / "train" / name).glob("*.jpg"))
        tested = sorted((source / "test" / name).glob("*.jpg"))
        if val_from_test:
            kept, held_out[name] = photos, tested[test : test + val]
        else:
            kept, held_out[name] = photos[:-val], photos[-val:]
        probe[name] = kept[:probe_train]
        tests[name] = tested[:test]
        if every_template:
            rows += [f"{path}\t{template.format(name)}" for path in kept for template in templates]
        else:
            rows += [f"{path}\t{rng.choice(templates).format(name)}" for path in kept]
    rng.shuffle(rows)
    tsv = out / "cifar10" / ("train-every-template.tsv" if every_template else "train.tsv")
    tsv.parent.mkdir(parents=True, exist_ok=True)
    tsv.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    roots = {}
    for kind, evaluated in (("val", held_out), ("test", tests)):
        root = out / f"cifar10-{kind}"
        for split, photos in (("train", probe), ("test", evaluated)):
            for name in classes:
                folder = root / "cifar10" / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for path in photos[name]:
                    link = folder / path.name
                    if not link.exists():
                        link.symlink_to(path)
        (root / "zeroshot_metadata.json").write_text(
            json.dumps({"cifar10": {"classes": classes, "templates": templates}})
        )
        roots[kind] = root
    return {"train": ["--train-data", str(tsv)], "val": roots["val"], "test": roots["test"], "rows": len(rows)}


def demo_data(out: Path, size: int) -> dict:
    """The demo corpus (seed 0) for training and test; the held-out split of seed 1 for validation."""
    sys.path.insert(0, str(ROOT / "src"))
    from protorkd.data.demo import write_demo_corpus

    train = write_demo_corpus(out / "demo-train", size=size, seed=0, progress=False)
    val = write_demo_corpus(out / "demo-val", size=64, seed=1, progress=False)
    return {
        "train": ["--train-data", str(train / "train.tsv")],
        "val": val / "eval",
        "test": train / "eval",
        "rows": size,
    }


def published_protoclip(epochs: int, rows: int, external: str) -> list[str]:
    """configs/protoclip-cc2.5m-1gpu.args's schedule scaled to `epochs` full passes over `rows` rows: InfoNCE alone
    in the first 1 % of the epochs (1 of its 100 episodes), Locked-image tuning in the last 2 % (its
    --lit-start-epoch 99 of 100), k-means with k = 10 % of the samples clustered (its 20,000 of 200,000), PBT
    with the external teacher (64-d) and target temperature 0.01, projection heads 2048 -> 128, k-means 20
    iterations x 3 restarts. Left out, and said so in docs/ablation.md: its episodes of 8 % of the corpus (an
    epoch here is a full pass, as for every loss of the study), its optimiser (lr 5e-5, wd 0.5, 2000 warm-up
    steps: the study gives every loss the same), and RoBERTa-large as the external teacher (the study's MiniLM)."""
    warmup, lit = max(1, round(epochs / 100)), max(1, round(2 * epochs / 100))
    flags = ["--infonce-warmup-epoch", str(warmup), "--k", str(max(2, rows // 10)), "--PBT"]
    flags += ["--target-temperature", "0.01", "--add-projection-head", "--projection-dim", "128"]
    flags += ["--projection-hidden-dim", "2048", "--projection-n-layers", "1", "--kmeans-max-iter", "20"]
    flags += ["--kmeans-nredo", "3", "--external-teacher", external, "--external-teacher-dim", "64"]
    if epochs > warmup + lit:
        flags += ["--lit-start-epoch", str(epochs - lit + 1)]
    return flags


class Study:
    """Runs and remembers: OUT/runs/<name>/ per run, OUT/study.json for everything measured."""

    def __init__(self, out: Path, common: list[str]) -> None:
        self.out = out
        self.common = common
        self.path = out / "study.json"
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.context: dict[str, str] = {}  # the dataset's teachers (`teachers` stage) and corpus rows

    def expand(self, flags: list[str], epochs: int) -> list[str]:
        """`flags` with the placeholders filled: the CLIP teacher, the external teacher, ProtoCLIP's schedule."""
        expanded = []
        for flag in flags:
            if flag == PUBLISHED_SCHEDULE:
                expanded += published_protoclip(epochs, int(self.context["rows"]), self.context["external_teacher"])
            else:
                expanded.append(flag.replace(CLIP_TEACHER, self.context.get("clip_teacher", CLIP_TEACHER)))
        return expanded

    def save(self) -> None:
        """Write this process's datasets into study.json, keeping the others' (two studies may share it)."""
        current = json.loads(self.path.read_text()) if self.path.exists() else {}
        for dataset, state in self.state.items():  # two processes may share a dataset: merge its run records
            merged = current.setdefault(dataset, {})
            for key, value in state.items():
                if key in ("test", "validation") and isinstance(merged.get(key), dict):
                    merged[key].update(value)
                else:
                    merged[key] = value
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def train(
        self,
        name: str,
        flags: list[str],
        *,
        data: list[str],
        eval_root: Path,
        epochs: int,
        seed: int,
        evaluate: str = "last",
        tasks: str = "zeroshot,linear,retrieval",
        keep_checkpoints: bool = False,
    ) -> dict:
        """One run (reused when its folder finished); returns {metrics, results per epoch, seconds per epoch}."""
        flags = self.expand(flags, epochs)
        folder = self.out / "runs" / name
        if not _finished(folder, epochs, evaluated=bool(tasks)):
            if folder.exists():
                shutil.rmtree(folder)
            every = {
                "zeroshot": "--zeroshot-frequency",
                "linear": "--linear-frequency",
                "retrieval": "--retrieval-frequency",
            }
            frequency = 1 if evaluate == "every" else epochs
            eval_flags = []
            for task, flag in every.items():
                eval_flags += [flag, str(frequency if task in tasks.split(",") else 0)]
            command = [
                sys.executable, "-m", "protorkd", "train", *data, "--eval-data-dir", str(eval_root),
                "--logs", str(self.out / "runs"), "--name", name, "--epochs", str(epochs), "--seed", str(seed),
                "--teacher-cache", str(self.out / "cache"), "--report-to", "", "--save-frequency", str(epochs),
                *eval_flags, *self.common, *flags,
            ]  # fmt: skip
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                tail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
                print(f"{name}: exit {result.returncode}: {tail}", file=sys.stderr)
                return {"error": tail}
            if not keep_checkpoints:  # unused here
                shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        results = folder / "results.jsonl"
        lines = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else [{}]
        log = (folder / "out.log").read_text()
        seconds = [float(s) for s in re.findall(r"epoch \d+ trained in ([0-9.]+) s", log)]
        return {"metrics": lines[-1], "curve": lines, "seconds_per_epoch": seconds}


def _finished(folder: Path, epochs: int, *, evaluated: bool) -> bool:
    """Did this run train all its epochs (and write the last evaluation, when it evaluates)?"""
    log, results = folder / "out.log", folder / "results.jsonl"
    if not log.exists() or f"epoch {epochs} trained in" not in log.read_text():
        return False
    if not evaluated:
        return True
    lines = results.read_text().splitlines() if results.exists() else []
    return bool(lines) and json.loads(lines[-1]).get("epoch") == epochs


def zeroshot_key(dataset: str) -> str:
    return {"demo": "zeroshot/shapes/top1", "cifar10": "zeroshot/cifar10/top1"}[dataset]


# dataset -> its test splits: (split, has captions, has a linear probe)
SPLITS = {
    "demo": [("shapes", True, True), ("shapes_unseen", True, False), ("shapes_skewed", True, False)],
    "cifar10": [("cifar10", False, True)],
}
DIAGNOSTICS = [  # (column, metric of the `diagnostics` task)
    ("image erank", "image_effective_rank"),
    ("teacher erank", "teacher_effective_rank"),
    ("alignment", "alignment"),
    ("image uniformity", "image_uniformity"),
    ("student-teacher cos", "student_teacher_cosine"),
]
PREDICTIONS = [("prediction entropy", "prediction_entropy"), ("top-class share %", "top_class_share")]
LINEAR = "linear_clip_benchmark_joint"  # the linear probe's keys: CLIP_benchmark's protocol on joint features
# what the `zeroshot/...` numbers are on each dataset: on cifar10 the training captions are the evaluation's CLIP
# templates filled with the class name, so its score is caption-supervised classification, not zero-shot (issue 23)
SCORED_AS = {"demo": "zero-shot", "cifar10": "caption-supervised"}


def reported(dataset: str) -> list[tuple[str, str]]:
    """(column, metric key) of the classification table: per split, zero-shot top-1 beside its mean per-class
    recall (mpcr, the balanced metric), the linear probe likewise."""
    columns = []
    for split, _, probed in SPLITS[dataset]:
        scored = SCORED_AS[dataset]
        columns += [(f"{split} {scored}", f"zeroshot/{split}/top1"),
                    (f"{split} {scored} mpcr", f"zeroshot/{split}/mean_per_class_recall")]  # fmt: skip
        if probed:
            columns += [(f"{split} linear", f"{LINEAR}/{split}/top1"),
                        (f"{split} linear mpcr", f"{LINEAR}/{split}/mean_per_class_recall")]  # fmt: skip
    return columns


def retrieval_columns(dataset: str) -> list[tuple[str, str]]:
    """(column, metric key) of the retrieval table: R@1 both ways on every captioned split."""
    columns = []
    for split, captioned, _ in SPLITS[dataset]:
        if captioned:
            columns += [(f"{split} R@1 i->t", f"retrieval/{split}/image_to_text_R@1"),
                        (f"{split} R@1 t->i", f"retrieval/{split}/text_to_image_R@1")]  # fmt: skip
    return columns


def balanced_pairs(dataset: str) -> list[tuple[str, str, str]]:
    """(what, top-1 key, balanced key) of every classification result the verdict reads."""
    pairs = []
    for split, _, probed in SPLITS[dataset]:
        pairs.append(
            (f"{SCORED_AS[dataset]} {split}", f"zeroshot/{split}/top1", f"zeroshot/{split}/mean_per_class_recall")
        )
        if probed:
            pairs.append((f"linear {split}", f"{LINEAR}/{split}/top1", f"{LINEAR}/{split}/mean_per_class_recall"))
    return pairs


TEACHER_FLAGS = ["--loss", "InfoNCE", "--image-model-builder", "timm", "--image-model", "resnet18"]


def teachers(study: Study, dataset: str, data: dict, budget: int) -> None:
    """The dataset's teachers for the rows that need them: a CLIP teacher (a timm ResNet-18 image tower, 11.2M
    parameters against tiny-cnn's 1.2M, with the locked MiniLM text tower, InfoNCE for twice the budget, exported
    in open_clip's format) and ProtoCLIP's external teacher (the corpus' MiniLM caption features, L2-normalised,
    exact PCA to 64 dimensions: `protorkd cache-teacher --export-npy`)."""
    epochs = 2 * budget
    name = f"{dataset}-teacher-e{epochs}"
    export = study.out / f"teacher-{dataset}-e{epochs}"
    if not (export / "open_clip_config.json").exists():
        run = study.train(name, TEACHER_FLAGS, data=data["train"], eval_root=data["test"], epochs=epochs, seed=0,
                          keep_checkpoints=True)  # fmt: skip
        if "error" in run:
            raise SystemExit(f"{dataset}: the CLIP teacher failed: {run['error']}")
        exported = _protorkd("export", str(study.out / "runs" / name), "--out", str(export))
        if exported.returncode != 0:
            raise SystemExit(f"{dataset}: its export failed: {exported.stderr.strip().splitlines()[-1:]}")
        study.state.setdefault(dataset, {})["teacher"] = {"epochs": epochs, "metrics": run["metrics"]}
        study.save()
    external = study.out / f"external-{dataset}-pca64.npy"
    if not external.exists():
        filled = _protorkd("cache-teacher", *data["train"], "--teacher-cache", str(study.out / "cache"),
                           "--export-npy", str(external), "--pca-dim", "64", *study.common)  # fmt: skip
        if filled.returncode != 0:
            raise SystemExit(f"{dataset}: the external teacher failed: {filled.stderr.strip().splitlines()[-1:]}")
    study.context.update(clip_teacher=f"local-dir:{export}", external_teacher=str(external))


def _protorkd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "protorkd", *args], env=env, capture_output=True, text=True)


def plateau(study: Study, dataset: str, data: dict, epochs: int, tolerance: float) -> int:
    """InfoNCE trained to budgets of epochs/4, epochs/2 and epochs (each its own warm-up + cosine schedule),
    scored on validation: the budget is the smallest whose zero-shot top-1 is within `tolerance` points of the
    best budget's (more training no longer helps)."""
    budgets = [max(1, epochs // 4), max(1, epochs // 2), epochs]
    scores = {}
    for budget in budgets:
        run = study.train(f"{dataset}-plateau-{budget}", ["--loss", "InfoNCE"], data=data["train"],
                          eval_root=data["val"], epochs=budget, seed=0, tasks="zeroshot")  # fmt: skip
        scores[budget] = run["metrics"][zeroshot_key(dataset)]
        print(f"{dataset} plateau: {budget} epochs -> validation zero-shot {scores[budget]:.2f}", flush=True)
    best = max(scores.values())
    chosen = next(budget for budget in budgets if scores[budget] >= best - tolerance)
    study.state.setdefault(dataset, {})["plateau"] = {
        "validation_zeroshot_by_budget": scores, "budget_epochs": chosen, "tolerance": tolerance,
        "seconds_per_epoch": statistics.median(run["seconds_per_epoch"]),
    }  # fmt: skip
    study.save()
    print(f"{dataset} plateau: budget {chosen} epochs")
    return chosen


def costs(study: Study, dataset: str, data: dict, rounds: int = 2) -> dict[str, float]:
    """Seconds per epoch of each candidate relative to InfoNCE: one epoch each, InfoNCE between every 4
    candidates, `rounds` rounds; each candidate's and InfoNCE's fastest epoch (contention only adds time)."""
    measured: dict[str, list[float]] = {}
    infonce: list[float] = []
    labels = [label for candidates in SEARCH.values() for label, _ in candidates]
    flags = {label: f for candidates in SEARCH.values() for label, f in candidates}
    for round_ in range(rounds):
        suffix = f"-r{round_}" if round_ else ""
        for index, label in enumerate(labels):
            if index % 4 == 0:
                run = study.train(f"{dataset}-cost-InfoNCE-{index}{suffix}", ["--loss", "InfoNCE"], data=data["train"],
                                  eval_root=data["val"], epochs=1, seed=0, tasks="")  # fmt: skip
                infonce += run.get("seconds_per_epoch", [])
            run = study.train(f"{dataset}-cost-{_slug(label)}{suffix}", flags[label], data=data["train"],
                              eval_root=data["val"], epochs=1, seed=0, tasks="")  # fmt: skip
            if "error" not in run:
                measured.setdefault(label, []).append(run["seconds_per_epoch"][0])
    reference = min(infonce)
    relative = {label: min(seconds) / reference for label, seconds in measured.items()}
    study.state.setdefault(dataset, {})["relative_cost"] = relative
    study.state[dataset]["cost_seconds"] = {"InfoNCE (reference)": infonce, **measured}
    study.save()
    print(f"{dataset} relative cost: {json.dumps({k: round(v, 2) for k, v in relative.items()})}", flush=True)
    return relative


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label)


def epochs_for(budget: int, relative: float) -> int:
    return max(1, round(budget / relative))


def cost_of(relative: dict[str, float], label: str) -> float:
    """A candidate's cost relative to InfoNCE. InfoNCE's own is 1 by definition: the budget is InfoNCE's epochs.
    Its measured ratio (its fastest of 2 epochs against the fastest of every reference epoch, 1.17 in the demo
    study) is the timing noise of the cost stage, kept in `cost_seconds`; giving it fewer epochs than the budget
    would handicap the baseline every other row is compared with."""
    return 1.0 if label == "InfoNCE" else relative.get(label, 1.0)


def tune(study: Study, dataset: str, data: dict, budget: int, relative: dict[str, float]) -> dict[str, str]:
    """Each family's candidates at `budget` epochs (the caller passes a fraction of the test budget), seed 0,
    scored by validation zero-shot top-1; ties go to the family's first (default) candidate."""
    chosen: dict[str, str] = {}
    scores = study.state.setdefault(dataset, {}).setdefault("validation", {})
    for family, candidates in SEARCH.items():
        for label, flags in candidates:
            if len(candidates) == 1 or label in scores:
                continue
            epochs = epochs_for(budget, cost_of(relative, label))
            run = study.train(f"{dataset}-val-{_slug(label)}", flags, data=data["train"], eval_root=data["val"],
                              epochs=epochs, seed=0, tasks="zeroshot")  # fmt: skip
            scores[label] = run["metrics"].get(zeroshot_key(dataset), float("nan")) if "error" not in run else None
            study.save()
            print(f"{dataset} validation {label}: {scores[label]}")
        valid = [(scores.get(label) or -1.0, -index, label) for index, (label, _) in enumerate(candidates)]
        chosen[family] = candidates[0][0] if len(candidates) == 1 else max(valid)[2]
    study.state[dataset]["chosen"] = chosen
    study.save()
    return chosen


def test(
    study: Study,
    dataset: str,
    data: dict,
    budget: int,
    relative: dict,
    chosen: dict,
    seeds: list[int],
    families: set[str] | None = None,
) -> dict:
    flags = {label: f for candidates in SEARCH.values() for label, f in candidates}
    results = study.state[dataset].setdefault("test", {})
    for family, label in chosen.items():
        if families and family not in families:
            continue
        epochs = epochs_for(budget, cost_of(relative, label))
        for seed in seeds:
            key = f"{label} seed {seed} epochs {epochs}"  # another budget in the same folder is another run
            if key in results and "error" not in results[key]:  # a failed run is tried again
                continue
            run = study.train(f"{dataset}-test-{_slug(label)}-s{seed}-e{epochs}", flags[label], data=data["train"],
                              eval_root=data["test"], epochs=epochs, seed=seed)  # fmt: skip
            results[key] = {"family": family, "label": label, "seed": seed, "epochs": epochs, **run}
            results[key].pop("curve", None)
            study.save()
            shown = (
                run["error"]
                if "error" in run
                else {n: round(run["metrics"].get(k, -1), 2) for n, k in reported(dataset) + retrieval_columns(dataset)}
            )
            print(f"{dataset} test {key}: {shown}", flush=True)
    return results


def _values(entries: list[dict], key: str) -> list[float]:
    return [e["metrics"][key] for e in entries if "error" not in e and e.get("metrics", {}).get(key) is not None]


def compare(values: list[float], reference: list[float]) -> int:
    """+1 (-1) when the mean of `values` is more than 2 standard errors of the difference above (below) the
    mean of `reference` (sample std over seeds): outside the seed noise. 0 within it or below 2 seeds each."""
    if len(values) < 2 or len(reference) < 2:
        return 0
    error = (statistics.stdev(values) ** 2 / len(values) + statistics.stdev(reference) ** 2 / len(reference)) ** 0.5
    difference = statistics.mean(values) - statistics.mean(reference)
    return 1 if difference > 2 * error else -1 if difference < -2 * error else 0


def verdict(entries: list[dict], baseline: list[dict], dataset: str) -> str:
    """The balanced rule: a win (loss) is a balanced metric (mean per-class recall) outside the seed noise above
    (below) InfoNCE's; a top-1 win whose balanced metric does not win is "top-1 only", not a win."""
    wins, losses, top1_only = [], [], []
    for what, top1, balanced in balanced_pairs(dataset):
        outcome = compare(_values(entries, balanced), _values(baseline, balanced))
        if outcome > 0:
            wins.append(what)
        elif outcome < 0:
            losses.append(what)
        if outcome <= 0 and compare(_values(entries, top1), _values(baseline, top1)) > 0:
            top1_only.append(what)
    parts = [f"wins {', '.join(wins)}"] if wins else []
    parts += [f"loses {', '.join(losses)}"] if losses else []
    parts += [f"top-1 only (not a win) {', '.join(top1_only)}"] if top1_only else []
    return "; ".join(parts) or "within the noise"


def _cell(values: list[float], reference: list[float] | None, digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mark = {1: " ▲", -1: " ▼", 0: ""}[compare(values, reference)] if reference is not None else ""
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}{mark}"


def _rows(study: Study, dataset: str) -> dict[str, list[dict]]:
    """{label: its test runs at the study's budget}, in SEARCH's order."""
    state = study.state[dataset]
    budget, relative = state.get("budget_epochs", 0), state.get("relative_cost", {})
    rows: dict[str, list[dict]] = {}
    for entry in state["test"].values():
        if not budget or entry["epochs"] == epochs_for(budget, cost_of(relative, entry["label"])):
            rows.setdefault(entry["label"], []).append(entry)
    order = [label for candidates in SEARCH.values() for label, _ in candidates]
    return dict(sorted(rows.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def _markdown(header: list[str], lines: list[list[str]], text: set[int]) -> str:
    """A markdown table; the columns in `text` are left-aligned, the others (numbers) right-aligned."""
    rule = "|" + "".join("---|" if index in text else "---:|" for index in range(len(header)))
    return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(line) + " |" for line in lines])


def table(study: Study, dataset: str) -> str:
    """Mean +- sample std over seeds of the runs at the study's budget: zero-shot and linear top-1 beside their
    mean per-class recall (mpcr) with the balanced verdict (`verdict`), then retrieval R@1, each number marked
    ▲ (▼) when outside the seed noise above (below) InfoNCE's (`compare`); then the diagnostics of every split
    (unmarked: a higher or lower value is not better by itself)."""
    rows = _rows(study, dataset)
    baseline = rows.get("InfoNCE", [])
    out = []
    for columns, judged in ((reported(dataset), True), (retrieval_columns(dataset), False)):
        if not columns:
            continue
        lines = []
        for label, entries in rows.items():
            reference = None if label == "InfoNCE" else baseline
            cells = [_cell(_values(entries, key), reference and _values(reference, key)) for _, key in columns]
            line = [entries[0]["family"], label, str(entries[0]["epochs"]), *cells]
            line.append(str(len([e for e in entries if "error" not in e])))
            if judged:
                line.append("(the reference)" if label == "InfoNCE" else verdict(entries, baseline, dataset))
            lines.append(line)
        header = ["family", "loss", "epochs", *(name for name, _ in columns), "seeds"]
        header += ["balanced verdict vs InfoNCE"] if judged else []
        title = "" if judged else "Retrieval, recall@1 % (▲ / ▼ as above):\n\n"
        out.append(title + _markdown(header, lines, {0, 1, len(header) - 1} if judged else {0, 1}))
    for split, captioned, _ in SPLITS[dataset]:
        diagnostics = [(n, f"zeroshot/{split}/{m}") for n, m in PREDICTIONS]
        if captioned:
            diagnostics += [(n, f"diagnostics/{split}/{m}") for n, m in DIAGNOSTICS]
        lines = [
            [label, *(_cell(_values(entries, key), None, digits=2) for _, key in diagnostics)]
            for label, entries in rows.items()
        ]
        out.append(f"Diagnostics on `{split}` (docs/evaluation.md):\n\n")
        out[-1] += _markdown(["loss", *(name for name, _ in diagnostics)], lines, {0})
    return "\n\n".join(out)


def report(study: Study, dataset: str) -> str:
    """Markdown of everything measured for `dataset`: plateau, costs and epochs, the validation search, results."""
    state = study.state.get(dataset, {})
    out = [f"### {dataset}\n"]
    if state.get("check"):
        out.append(f"A quick check (`--candidates`), not the study: {state['budget_epochs']} epochs each, no tuning.\n")
    plateau_state = state.get("plateau")
    if plateau_state and "validation_zeroshot_by_budget" in plateau_state:
        scores = dict(sorted(plateau_state["validation_zeroshot_by_budget"].items(), key=lambda item: int(item[0])))
        out.append("InfoNCE's plateau (validation zero-shot top-1 by budget):\n")
        out.append("| epochs | " + " | ".join(str(k) for k in scores) + " |")
        out.append("|---|" + "---:|" * len(scores))
        out.append("| top-1 | " + " | ".join(f"{v:.1f}" for v in scores.values()) + " |\n")
        out.append(
            f"Budget: {state.get('budget_epochs')} InfoNCE epochs (plateau: {plateau_state['budget_epochs']}).\n"
        )
    relative, validation, chosen = state.get("relative_cost", {}), state.get("validation", {}), state.get("chosen", {})
    if relative:
        budget, tune_budget = state.get("budget_epochs", 0), state.get("tune_budget_epochs", 0)
        out.append(
            "| family | candidate | cost vs InfoNCE | epochs (test) | epochs (validation) | validation zero-shot |"
        )
        out.append("|---|---|---:|---:|---:|---:|")
        for family, candidates in SEARCH.items():
            for label, _ in candidates:
                score = validation.get(label, "pending")
                shown = "-" if len(candidates) == 1 else ("failed" if score is None else score)
                shown = f"{shown:.1f}" if isinstance(shown, float) else shown
                mark = " **(chosen)**" if chosen.get(family) == label and len(candidates) > 1 else ""
                cost = cost_of(relative, label) if label in relative else float("nan")
                out.append(
                    f"| {family} | {label}{mark} | {cost:.2f} | {epochs_for(budget, cost)} | "
                    f"{epochs_for(tune_budget, cost) if len(candidates) > 1 else '-'} | {shown} |"
                )
        out.append("")
    if state.get("test"):
        out.append(table(study, dataset))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="study folder (resumable)")
    parser.add_argument("--datasets", default="demo,cifar10", help="comma-separated: demo, cifar10")
    parser.add_argument(
        "--stage",
        default="all",
        choices=["all", "data", "plateau", "teacher", "cost", "tune", "test", "report"],
        help="data: only write the data; report: print what study.json holds",
    )
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the test stage")
    parser.add_argument(
        "--families", default="", help="test stage: only these families (comma-separated; two processes can share)"
    )
    parser.add_argument("--demo-size", type=int, default=4096, help="demo training rows")
    parser.add_argument("--plateau-epochs", type=int, default=24, help="the largest InfoNCE budget tried, in epochs")
    parser.add_argument(
        "--plateau-tolerance", type=float, default=2.0, help="points below the best budget's validation top-1"
    )
    parser.add_argument("--budget-epochs", type=int, default=0, help="skip the plateau stage: this many InfoNCE epochs")
    parser.add_argument("--max-budget-epochs", type=int, default=0, help="cap the plateau's budget (0 = no cap)")
    parser.add_argument(
        "--tune-fraction", type=float, default=0.5, help="validation runs train this fraction of the budget"
    )
    parser.add_argument(
        "--tune-budget-epochs", type=int, default=0, help="validation runs train this many InfoNCE epochs instead"
    )
    parser.add_argument("--cifar-root", type=Path, default=SHARED / "cifar10_jpg")
    parser.add_argument("--cifar-prompts", type=Path, default=SHARED / "clip_prompts" / "clip_zeroshot_prompts.json")
    parser.add_argument("--cifar-val", type=int, default=50, help="train photos per class held out for validation")
    parser.add_argument("--cifar-probe-train", type=int, default=100, help="linear-probe train photos per class")
    parser.add_argument("--cifar-test", type=int, default=300, help="test photos per class")
    parser.add_argument(
        "--costs-from", default="", help="reuse another dataset's measured relative costs (same student and batch)"
    )
    parser.add_argument("--n-prototypes", type=int, default=16384, help="DINO/ProtoCPC/ProtoRKD prototypes")
    parser.add_argument("--train-args", default="", help="extra `protorkd train` flags for every run, one string")
    parser.add_argument(
        "--candidates",
        default="",
        help="a quick check instead of the study: only these candidates (SEARCH labels, comma-separated), each "
        "trained --budget-epochs epochs on the test splits (no plateau, cost or tuning stage)",
    )
    args = parser.parse_args()
    if args.candidates and not args.budget_epochs:
        parser.error("--candidates needs --budget-epochs")

    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--n-prototypes", str(args.n_prototypes), *args.train_args.split()]
    study = Study(args.out, common)
    datasets = [name for name in args.datasets.split(",") if name]
    study.state = {name: value for name, value in study.state.items() if name in datasets}  # others' stay theirs
    seeds = [int(seed) for seed in args.seeds.split(",")]
    started = time.time()
    for dataset in datasets:
        if dataset == "demo":
            data = demo_data(args.out, args.demo_size)
        elif dataset == "cifar10":
            data = write_cifar10(args.out, args.cifar_root, args.cifar_prompts, val=args.cifar_val,
                                 probe_train=args.cifar_probe_train, test=args.cifar_test)  # fmt: skip
        else:
            raise SystemExit(f"unknown dataset {dataset!r}: demo, cifar10")
        if args.stage == "report":
            print(report(study, dataset) + "\n")
            continue
        if args.stage == "data":
            print(f"{dataset}: training {' '.join(data['train'])}, validation {data['val']}, test {data['test']}")
            continue
        state = study.state.setdefault(dataset, {})
        if args.candidates:  # the quick check: equal epochs, the candidates named
            family_of = {label: family for family, candidates in SEARCH.items() for label, _ in candidates}
            labels = [label.strip() for label in args.candidates.split(",") if label.strip()]
            unknown = [label for label in labels if label not in family_of]
            if unknown:
                raise SystemExit(f"--candidates: unknown {', '.join(unknown)}; valid: {', '.join(family_of)}")
            state.update(budget_epochs=args.budget_epochs, relative_cost={}, check=True)
            study.context["rows"] = str(data["rows"])
            teachers(study, dataset, data, args.budget_epochs)
            test(study, dataset, data, args.budget_epochs, {}, {family_of[label]: label for label in labels}, seeds)
            print(f"\n### {dataset} (check: {args.budget_epochs} epochs each)\n\n{table(study, dataset)}\n", flush=True)
            continue
        budget = args.budget_epochs or state.get("plateau", {}).get("budget_epochs")
        if args.stage in ("all", "plateau") and not args.budget_epochs:
            budget = plateau(study, dataset, data, args.plateau_epochs, args.plateau_tolerance)
        if args.stage == "plateau":
            continue
        if budget is None:
            raise SystemExit(f"{dataset}: run the plateau stage first (or give --budget-epochs)")
        if args.max_budget_epochs and budget > args.max_budget_epochs:
            print(f"{dataset}: plateau budget {budget} epochs capped at --max-budget-epochs {args.max_budget_epochs}")
            budget = args.max_budget_epochs
        state["budget_epochs"] = budget
        study.context["rows"] = str(data["rows"])
        teachers(study, dataset, data, budget)  # the CLIP teacher and ProtoCLIP's external teacher, trained once
        if args.stage == "teacher":
            continue
        relative = state.get("relative_cost") or {}
        if args.costs_from:  # the losses' cost does not depend on the images: same student, size and batch
            relative = json.loads(study.path.read_text())[args.costs_from]["relative_cost"]
            state["relative_cost"], state["relative_cost_from"] = relative, args.costs_from
        elif args.stage in ("all", "cost") or not relative:
            relative = costs(study, dataset, data)
        if args.stage == "cost":
            continue
        chosen = state.get("chosen") or {}
        if args.stage in ("all", "tune") or not chosen:
            tune_budget = args.tune_budget_epochs or max(1, round(budget * args.tune_fraction))
            state["tune_budget_epochs"] = tune_budget
            chosen = tune(study, dataset, data, tune_budget, relative)
        if args.stage == "tune":
            continue
        families = {name.strip() for name in args.families.split(",") if name.strip()} or None
        test(study, dataset, data, budget, relative, chosen, seeds, families)
        print(f"\n### {dataset} (budget {budget} InfoNCE epochs)\n\n{table(study, dataset)}\n", flush=True)
    if args.stage not in ("report", "data"):  # a report never writes: the studies may be running
        for dataset in datasets:
            study.state.setdefault(dataset, {})["wall_minutes"] = round((time.time() - started) / 60, 1)
        study.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
