"""Every flag of `protorkd train`, grouped by concern, parsed and validated (params.txt: `protorkd.params`).

Each group is a dataclass; a field's `metadata["help"]` is its flag help. Flag names are the field
names with `_` turned into `-` (`joint_projection_dim` -> `--joint-projection-dim`). This module is the
only one that sees argparse; library code receives the plain values it needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protorkd.data.captions import DEFAULT_MAX_CAPTION_BYTES, MAX_CAPTION_BYTES
from protorkd.data.images import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_PIXELS, PILLOW_MAX_PIXELS
from protorkd.distributed import DEFAULT_TIMEOUT_MINUTES
from protorkd.errors import UsageError
from protorkd.eval.features import EVAL_PRECISIONS
from protorkd.eval.records import LINEAR_PROTOCOLS
from protorkd.losses.options import LossOptions
from protorkd.models.options import ModelOptions
from protorkd.options import Rule, base_type, flag, violation

REPORT_TARGET_NAMES = ("tensorboard", "wandb", "all")
REPORT_TARGETS = Rule(
    "a comma-separated list of tensorboard, wandb, all (or '' for none)",
    lambda text: all(t.strip() in REPORT_TARGET_NAMES for t in text.split(",") if t.strip()),
)
SINGLE_CHARACTER = Rule("one character other than a newline", lambda text: len(text) == 1 and text not in "\r\n")
BETA = Rule("at least 0 and less than 1", lambda value: 0 <= value < 1)
# Upper bounds of flags whose value sets how much memory a run takes (or that overflow what they feed)
MAX_EPISODE_SIZE = 100_000_000  # an episode's row ids are held in memory (8 bytes each)
MAX_MEMBER_BYTES = 1_000_000_000  # a webdataset member is read into memory whole
MAX_DEMO_SIZE = 1_000_000
MAX_SEED = 1_000_000  # the per-sample augmentation seed (seed * 1_000_003 + epoch) * 10_000_019 + position fits 64 bits
MAX_LR = 10.0  # AdamW moves every weight by about lr per step: above this nothing trains
AUTOMATIC_WARMUP = -1
WARMUP_STEPS = 50


@dataclass
class DataConfig:
    train_data: str | None = flag(
        None, "training corpus: a tab-separated CSV with image paths and captions (default: the built-in demo corpus)"
    )
    dataset_type: str = flag(
        "auto",
        "corpus format: csv, webdataset, or auto (webdataset when --train-data ends in .tar or has {..} braces)",
        ("auto", "csv", "webdataset"),
    )
    train_num_samples: int | None = flag(
        None, "samples per epoch for a webdataset corpus (required for webdataset)", minimum=1
    )
    csv_img_key: str = flag("filepath", "CSV column holding image paths (relative paths resolve against the CSV)")
    csv_caption_key: str = flag("title", "CSV column holding captions")
    csv_separator: str = flag("\t", "CSV column separator (one character)", rule=SINGLE_CHARACTER)
    csv_quoting: str = flag(
        "none",
        "none: every line is one row split on the separator, quotes are part of the text (CC3M, gather-cc); "
        "minimal: each line is parsed as CSV, so quoted fields may hold the separator",
        ("none", "minimal"),
    )
    dataset_size: int | None = flag(None, "use only the first N rows of the corpus", minimum=1)
    episode_size: int = flag(
        0,
        "rows per epoch, drawn uniformly with replacement (0 = one shuffled pass; the episode's row ids are held in "
        "memory)",
        minimum=0,
        maximum=MAX_EPISODE_SIZE,
    )
    max_bad_fraction: float = flag(
        0.01,
        "stop when more than this fraction of an epoch's samples (or of the corpus' rows) is unreadable",
        minimum=0.0,
        maximum=1.0,
        resumable=True,
    )
    max_image_pixels: int = flag(
        DEFAULT_MAX_PIXELS,
        "an image with more pixels is a bad sample, refused before it is decoded (gather-cc's --max-pixels; Pillow "
        "refuses every image above twice its own warning threshold, the maximum here)",
        minimum=1,
        maximum=PILLOW_MAX_PIXELS,
    )
    max_member_bytes: int = flag(
        DEFAULT_MAX_MEMBER_BYTES,
        "a webdataset member larger than this many bytes is a bad sample, skipped without reading it",
        minimum=1,
        maximum=MAX_MEMBER_BYTES,
    )
    max_caption_bytes: int = flag(
        DEFAULT_MAX_CAPTION_BYTES,
        "a longer caption is cut to this many bytes (UTF-8, at a character boundary) as the corpus is read, before "
        "any tokenizer sees it; the cut captions are counted in the log",
        minimum=1,
        maximum=MAX_CAPTION_BYTES,
    )
    augmentation: str | None = flag(
        None,
        "training image augmentation (default: random resized crop 0.9-1.0); protoclip-light: ProtoCLIP's crop 0.5-1, "
        "flip, colour jitter, grey, blur; pad-crop-flip: a random translation by up to 1/8 of the side and a flip",
        (None, "protoclip-light", "pad-crop-flip"),
    )
    mixup_alpha: float = flag(
        0.0,
        "mixup of the training images (batch mode): a batch mixed with its reversed order, lam ~ Beta(alpha, "
        "alpha), InfoNCE's targets mixed alike (i-Mix's virtual labels; docs/method.md); 0 = off. Only losses "
        "whose targets are the pairing take it (InfoNCE, also with --w-simcse)",
        minimum=0.0,
    )
    mixup_prob: float = flag(1.0, "the fraction of batches that --mixup-alpha mixes", minimum=0.0, maximum=1.0)
    caption_ensemble: bool = flag(
        False,
        "with a locked text teacher: every row of an image trains towards one target, the normalised mean of the "
        "teacher features of all the captions the corpus gives that image (rows sharing a path), as CLIP's "
        "zero-shot classifier ensembles its prompts",
    )
    workers: int = flag(
        2,
        "data-loading worker processes per GPU/process (an in-memory corpus uses none: its batches are cheap)",
        minimum=0,
        maximum=256,
        resumable=True,
    )
    in_memory: str = flag(
        "auto",
        "decode every training image once into memory and augment on tensors instead of reading files each "
        "epoch: on, off, or auto (on when the decoded TSV corpus fits --in-memory-budget-mb)",
        ("auto", "on", "off"),
    )
    in_memory_budget_mb: float = flag(
        2048.0, "the most memory an automatic in-memory corpus may take, in MB", minimum=0.0
    )
    demo_size: int = flag(
        10240,
        "training pairs of the built-in demo corpus (with --dataset-size N below it, only its first N are generated: "
        "the same rows)",
        minimum=1,
        maximum=MAX_DEMO_SIZE,
    )
    demo_seed: int = flag(0, "seed of the built-in demo corpus", minimum=0, maximum=MAX_SEED)


@dataclass
class OptimConfig:
    epochs: int = flag(
        4,
        "training epochs (episodes); may change on --resume, which then stretches the cosine schedule",
        minimum=1,
        maximum=100_000,
        resumable=True,
    )
    batch_size: int = flag(64, "batch size per process", minimum=1, maximum=2**20)
    lr: float = flag(2e-3, "peak learning rate", minimum=0.0, maximum=MAX_LR)
    wd: float = flag(0.1, "AdamW weight decay (not applied to biases, norms, temperatures)", minimum=0.0)
    beta1: float = flag(0.9, "AdamW beta1", rule=BETA)
    beta2: float = flag(0.98, "AdamW beta2", rule=BETA)
    eps: float = flag(1e-6, "AdamW epsilon", above=0.0)
    warmup: int = flag(
        AUTOMATIC_WARMUP,
        f"linear warmup steps before the cosine decay ({AUTOMATIC_WARMUP} = automatic: {WARMUP_STEPS} steps, at most "
        "a tenth of the run's steps and at least 1; out.log names the steps used)",
        rule=Rule(
            f"{AUTOMATIC_WARMUP} (automatic) or at least 0", lambda value: value == AUTOMATIC_WARMUP or value >= 0
        ),
    )
    lr_text: float = flag(
        -1.0,
        "peak learning rate of every parameter outside the image tower and its head (-1 = --lr; ProtoCLIP)",
        rule=Rule(
            f"-1 (same as --lr) or at least 0 and at most {MAX_LR}", lambda value: value == -1 or 0 <= value <= MAX_LR
        ),
    )
    text_start_epoch: int = flag(
        0,
        "those parameters have learning rate 0 before this epoch, then their own warmup + cosine (ProtoCLIP)",
        minimum=0,
    )
    text_end_epoch: int = flag(
        -1,
        "their cosine schedule ends at this epoch, 0 after (-1 = --epochs; ProtoCLIP)",
        rule=Rule("-1 (--epochs) or at least 1", lambda value: value == -1 or value >= 1),
    )
    accum_freq: int = flag(
        1,
        "one optimizer step per this many batches, as open_clip: every batch is encoded once without gradients, "
        "then the loss of all of them together is backpropagated batch by batch, so the contrastive negatives and "
        "the gradient are those of one batch this many times larger (docs/training.md)",
        minimum=1,
    )
    max_grad_norm: float = flag(
        0.0, "clip the gradient norm to this value (0 = no clipping; the norm is logged)", minimum=0.0
    )
    precision: str = flag(
        "auto",
        "numeric precision. amp: fp16 autocast on CUDA (fp32 on the CPU); amp_bf16: bf16 autocast on CUDA and "
        "on the CPU; bf16: bf16 weights; fp32; auto: amp_bf16 where the hardware computes bf16 natively (CUDA "
        "with bf16, CPUs with AVX512-BF16 or AMX), amp on other GPUs, fp32 on other CPUs",
        ("auto", "fp32", "amp", "amp_bf16", "bf16"),
    )
    seed: int = flag(
        0, "random seed (larger seeds would overflow the per-sample seeds derived from it)", minimum=0, maximum=MAX_SEED
    )
    device: str = flag("auto", "cpu, cuda, cuda:N, or auto", resumable=True)
    torchcompile: bool = flag(False, "compile the towers with torch.compile", resumable=True)
    malloc_mmap_threshold_mb: int = flag(
        32,
        "CPU runs on Linux (glibc): fix malloc's mmap threshold at this many MiB, so that each step's activations "
        "reuse heap memory instead of fresh zero-filled mappings (up to 1.2x faster CPU epochs measured; a "
        "MALLOC_MMAP_THRESHOLD_ in the environment wins); 0 = glibc's adaptive default",
        minimum=0,
        maximum=32,
        resumable=True,
    )
    dist_timeout_minutes: float = flag(
        DEFAULT_TIMEOUT_MINUTES,
        "minutes a process waits in a collective before the job fails: long enough for rank 0 to fill a "
        "CC3M-scale teacher cache or evaluate while the others wait (docs/distributed.md)",
        above=0.0,
        maximum=60 * 24 * 30,
        resumable=True,
    )


FREQUENCY = dict(minimum=-1, resumable=True)  # an evaluation's period in epochs: N, 0 = never, -1 = the last only


@dataclass
class EvalConfig:
    eval_data_dir: str | None = flag(
        None, "root of downstream datasets (default with the demo corpus: its held-out split)", resumable=True
    )
    zeroshot_frequency: int = flag(
        1, "zero-shot evaluation every N epochs and after the last (0 = never, -1 = after the last only)", **FREQUENCY
    )
    linear_frequency: int = flag(
        -1,
        "linear-probe evaluation every N epochs and after the last (0 = never, -1 = after the last only)",
        **FREQUENCY,
    )
    retrieval_frequency: int = flag(
        -1, "retrieval evaluation every N epochs and after the last (0 = never, -1 = after the last only)", **FREQUENCY
    )
    nlp_eval_frequency: int = flag(
        0, "STS evaluation every N epochs and after the last (0 = never, -1 = after the last only)", **FREQUENCY
    )
    eval_precision: str = flag(
        "auto",
        "precision of the evaluations' forward passes: fp32, amp (fp16 autocast, CUDA), amp_bf16, or auto = amp "
        "on a GPU (CLIP_benchmark's default) and fp32 on the CPU; recorded in results.jsonl",
        EVAL_PRECISIONS,
        resumable=True,
    )
    linear_protocol: str = flag(
        "clip_benchmark",
        "linear-probe protocol: clip_benchmark (CLIP_benchmark's own: AdamW, 10 epochs) or cv (L-BFGS, L2 by "
        "5-fold cross-validation); docs/evaluation.md",
        LINEAR_PROTOCOLS,
        resumable=True,
    )
    zeroshot_metadata: str | None = flag(
        None,
        "JSON {dataset: {classes, templates}} overriding the zero-shot class names and prompts (as protorkd eval)",
        resumable=True,
    )

    def suite_options(self) -> dict[str, Any]:
        """The `eval.suite.EvalOptions` fields these flags set (training's evaluations)."""
        return {
            "precision": self.eval_precision,
            "linear_protocol": self.linear_protocol,
            "zeroshot_metadata": Path(self.zeroshot_metadata) if self.zeroshot_metadata else None,
        }


@dataclass
class LogConfig:
    logs: str = flag(
        "./logs",
        "folder holding experiment directories (--logs-dir is the same flag; use it under torchrun, "
        "whose own --logs-specs makes a bare --logs ambiguous)",
        aliases=("--logs-dir",),
        resumable=True,
    )
    name: str | None = flag(
        None, "experiment name (default: generated from models, loss, batch and time)", resumable=True
    )
    resume: str | None = flag(
        None,
        "checkpoint path, or 'latest' to continue --name: from its epoch_latest.pt, or from scratch in the same "
        "folder (keeping its teacher cache) when it has no checkpoint yet",
        resumable=True,
    )
    save_frequency: int = flag(
        1, "write checkpoints/epoch_N.pt every N epochs (and at the last)", minimum=1, resumable=True
    )
    keep_checkpoints: int = flag(
        0,
        "keep only the N most recent checkpoints/epoch_N.pt (0 = keep all, as ProtoCLIP; `watch` cannot "
        "evaluate an epoch deleted before it got to it)",
        minimum=0,
        resumable=True,
    )
    report_to: str = flag(
        "tensorboard", "comma-separated: tensorboard, wandb, all, or '' for none", rule=REPORT_TARGETS, resumable=True
    )
    wandb_project: str = flag("protorkd", "wandb project when reporting to wandb", resumable=True)
    log_every_n_steps: int = flag(20, "write a progress line to out.log every N steps", minimum=1, resumable=True)
    teacher_cache: str | None = flag(
        None, "folder of precomputed teacher features (default: the experiment's cache/)", resumable=True
    )


GROUPS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelOptions,
    "loss": LossOptions,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "log": LogConfig,
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelOptions = field(default_factory=ModelOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_flat_dict(self) -> dict[str, Any]:
        """{field_name: value} over every group (field names are unique across groups)."""
        flat: dict[str, Any] = {}
        for group in GROUPS:
            flat.update(dataclasses.asdict(getattr(self, group)))
        return flat

    @classmethod
    def from_flat_dict(cls, values: dict[str, Any], *, strict: bool = True) -> Config:
        """Build a config from {field_name: value}; unknown keys are an error when `strict`."""
        known = {f.name for group in GROUPS.values() for f in dataclasses.fields(group)}
        unknown = sorted(set(values) - known)
        if unknown and strict:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        groups = {}
        for group_name, group_cls in GROUPS.items():
            kwargs = {f.name: values[f.name] for f in dataclasses.fields(group_cls) if f.name in values}
            groups[group_name] = group_cls(**kwargs)
        return cls(**groups)


def _field_types(group_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(group_cls)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _add_fields(
    parser: argparse.ArgumentParser,
    group_name: str,
    title: str,
    *,
    defaults: bool,
    shown: Collection[str] | None = None,
) -> None:
    """One flag per field of a config group, help from the field metadata. With `shown`, the other fields' flags
    are accepted but left out of --help: they do not apply to the command (one set of flags serves several)."""
    group_cls = GROUPS[group_name]
    fields = dataclasses.fields(group_cls)
    listed = any(shown is None or f.name in shown for f in fields)
    arg_group = parser.add_argument_group(title) if listed else parser.add_argument_group()
    hints = _field_types(group_cls)
    for f in fields:
        scalar, optional = base_type(hints[f.name])
        rule = f.metadata.get("rule")
        text = f.metadata.get("help", "")
        allowed = [rule.describe] if rule is not None else []
        if scalar is float:
            allowed.append("finite")
        if "(default:" in text:  # the help explains its default itself ("default: the tower's own")
            text += f" ({'; '.join(allowed)})" if allowed else ""
        else:
            text += f" (default: {'; '.join([repr(f.default), *allowed])})"
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": f.default if defaults else argparse.SUPPRESS,
            "help": text if shown is None or f.name in shown else argparse.SUPPRESS,
        }
        choices = f.metadata.get("choices")
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = (lambda s, t=scalar: None if s == "None" else t(s)) if optional else scalar
            kwargs["metavar"] = "{" + ",".join(str(c) for c in choices) + "}" if choices else scalar.__name__.upper()
            if choices:
                kwargs["choices"] = list(choices)
        arg_group.add_argument(flag_name(f), *f.metadata.get("aliases", ()), **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser, shown: Collection[str] | None = None) -> None:
    """Add one flag per config field, grouped by concern, help from the field metadata; with `shown`, only those
    fields are listed in --help (the command ignores the others, which it accepts so that `train`'s flags serve)."""
    for group_name in GROUPS:
        _add_fields(parser, group_name, group_name, defaults=True, shown=shown)


def add_group_arguments(
    parser: argparse.ArgumentParser, group_name: str, *, defaults: bool = True, shown: Collection[str] | None = None
) -> None:
    """Add the flags of one config group only (`protorkd eval` takes the "model" group: the tower flags), with
    `shown` those listed in --help.

    With `defaults=False` an omitted flag stays out of the namespace, so the caller can tell which were given.
    """
    title = f"{group_name} (the same flags as `protorkd train`)"
    _add_fields(parser, group_name, title, defaults=defaults, shown=shown)


def config_from_namespace(namespace: argparse.Namespace) -> Config:
    known = {f.name for group in GROUPS.values() for f in dataclasses.fields(group)}
    return Config.from_flat_dict({k: v for k, v in vars(namespace).items() if k in known})


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for group in GROUPS.values() for f in dataclasses.fields(group)}


def validate_config(cfg: Config) -> None:
    """Check every flag against its choices and range (the field metadata) before anything is created.

    Raises a UsageError naming the first bad flag, its value and what it must be: one line, exit 2.
    """
    values = cfg.to_flat_dict()
    for name, f in _fields().items():
        problem = violation(f.metadata, values[name])
        if problem is not None:
            raise UsageError(f"{flag_name(f)} {values[name]!r}: {problem}")
    targets = {t.strip() for t in cfg.log.report_to.split(",") if t.strip()}
    if targets & {"wandb", "all"}:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UsageError("--report-to wandb needs `pip install wandb` (or protorkd[wandb])")
    if cfg.eval.zeroshot_metadata and not Path(cfg.eval.zeroshot_metadata).is_file():
        raise UsageError(f"--zeroshot-metadata {cfg.eval.zeroshot_metadata}: no such file")


def default_eval_root(cfg: Config) -> Path | None:
    """The downstream data root of a run: its --eval-data-dir, else for a demo run (no --train-data) the
    demo corpus' held-out split, else None. `train`, `eval` and `watch` all ask this one function."""
    if cfg.eval.eval_data_dir:
        return Path(cfg.eval.eval_data_dir)
    if cfg.data.train_data is None:
        from protorkd.data.demo import demo_eval_root

        return demo_eval_root(cfg.data.demo_size, cfg.data.dataset_size, cfg.data.demo_seed)
    return None
