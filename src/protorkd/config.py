"""Every flag of `protorkd train`, grouped by concern, and params.txt written and read back.

Each group is a dataclass; a field's `metadata["help"]` is its flag help. Flag names are the field
names with `_` turned into `-` (`joint_projection_dim` -> `--joint-projection-dim`). This module is the
only one that sees argparse; library code receives the plain values it needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def flag(
    default: Any,
    help: str,
    choices: tuple[Any, ...] | None = None,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A dataclass field that is also a command-line flag."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": name, "aliases": aliases})


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
    train_num_samples: int | None = flag(None, "samples per epoch for a webdataset corpus (required for webdataset)")
    csv_img_key: str = flag("filepath", "CSV column holding image paths (relative paths resolve against the CSV)")
    csv_caption_key: str = flag("title", "CSV column holding captions")
    csv_separator: str = flag("\t", "CSV column separator")
    dataset_size: int | None = flag(None, "use only the first N rows of the corpus")
    episode_size: int = flag(0, "rows per epoch, drawn uniformly with replacement (0 = one shuffled pass)")
    max_bad_fraction: float = flag(0.01, "stop when more than this fraction of an epoch's samples is unreadable")
    augmentation: str | None = flag(
        None, "training image augmentation (default: random resized crop 0.9-1.0)", (None, "protoclip-light")
    )
    workers: int = flag(2, "data-loading worker processes per GPU/process")
    demo_size: int = flag(10240, "training pairs of the built-in demo corpus")
    demo_seed: int = flag(0, "seed of the built-in demo corpus")


@dataclass
class ModelConfig:
    image_model_builder: str = flag("custom", "image tower library", ("open_clip", "timm", "torchvision", "custom"))
    image_model: str = flag("tiny-cnn", "image tower architecture name within its builder")
    image_model_tag: str = flag(
        "",
        "pretrained weights: an open_clip pretrained tag, a torchvision weights name, 'pretrained' for timm, "
        "or a local checkpoint path",
    )
    image_size: int | None = flag(None, "input resolution (default: the tower's own)")
    text_model_builder: str = flag("sbert", "text tower library", ("open_clip", "huggingface", "sbert", "custom"))
    text_model: str = flag("all-MiniLM-L6-v2", "text tower name: a hub id, a local folder, or an architecture name")
    text_model_tag: str = flag("", "open_clip pretrained tag or local checkpoint path for an open_clip text tower")
    text_pooler: str = flag("mean", "pooling of a huggingface text tower", ("cls", "cls_before_pooler", "mean"))
    max_seq_length: int = flag(0, "truncate captions to this many tokens (0 = the tower's default)")
    lock_image_model: bool = flag(False, "freeze the image tower (eval mode, no gradients)")
    lock_text_model: bool = flag(False, "freeze the text tower (eval mode, no gradients)")
    teacher: str = flag(
        "text",
        "which tower is the locked teacher (it is locked automatically); none = train both CLIP-style",
        ("text", "image", "none"),
    )
    image_head_n_layers: int = flag(1, "image projection head: 0 identity, 1 linear, >=2 MLP")
    text_head_n_layers: int = flag(0, "text projection head: 0 identity, 1 linear, >=2 MLP")
    head_hidden_dim: int = flag(2048, "hidden width of MLP heads")
    joint_projection_dim: int = flag(-1, "joint embedding width (-1: the width of a tower whose head is identity)")
    adapter: str | None = flag(None, "parameter-efficient adapter for a trainable text tower", (None, "lora"))
    lora_r: int = flag(8, "LoRA rank")
    lora_alpha: int = flag(16, "LoRA scaling alpha")
    lora_dropout: float = flag(0.1, "LoRA dropout")
    grad_checkpointing: bool = flag(False, "gradient checkpointing in towers that support it")
    # Separate locked teachers (CLIP-KD); their features are computed once into the teacher cache
    clip_teacher_model: str = flag(
        "", "CLIP-KD: open_clip architecture of a locked CLIP teacher, e.g. ViT-B-32 ('' = no CLIP teacher)"
    )
    clip_teacher_tag: str = flag("", "CLIP-KD: the CLIP teacher's open_clip pretrained tag (e.g. openai) or checkpoint")
    extra_text_teacher: str = flag(
        "", "CLIP-KD: a locked text-only teacher distilled alongside (e.g. all-MiniLM-L6-v2; '' = none)"
    )
    extra_text_teacher_builder: str = flag(
        "sbert", "library of --extra-text-teacher", ("open_clip", "huggingface", "sbert", "custom")
    )


@dataclass
class LossConfig:
    loss: str = flag("InfoNCE", "distillation loss (see `protorkd train --list-losses`)")
    w_distill: float = flag(1.0, "weight of the main distillation loss")
    temperature: float = flag(
        0.07, "initial value of learnable temperatures (InfoNCE, CLIP-KD's student, ProtoCLIP's InfoNCE and prototypes)"
    )
    gather_with_grad: bool = flag(
        True,
        "let gradients flow through the cross-process feature gather, so N processes compute the gradient of "
        "one process on the concatenated batch (--no-gather-with-grad: open_clip's cheaper default)",
    )
    local_loss: bool = flag(False, "score only local rows against the global batch (memory-saving, same gradient)")
    # Relational KD (RKD; also the optional relational term of CLIP-KD)
    w_rkd_d: float = flag(0.5, "RKD: weight of the distance-wise term")
    w_rkd_a: float = flag(1.0, "RKD: weight of the angle-wise term (0 skips its O(B^3) computation)")
    rkd_angle_chunk: int = flag(
        0, "RKD: anchors per chunk of the angle term (0 = automatic, about 2^26 triplets per chunk)"
    )
    # Queue-based KD (CompRess-1q, CompRess-2q, SEED)
    queue_size: int = flag(65536, "CompRess/SEED: memory-queue length (features of past global batches)")
    queue_temperature: float = flag(0.04, "CompRess: temperature of the similarity distributions over the queue")
    seed_student_temperature: float = flag(0.07, "SEED: student temperature")
    seed_teacher_temperature: float = flag(1e-4, "SEED: teacher temperature")
    # Redundancy reduction (VICReg, BarlowTwins)
    vicreg_invariance: float = flag(25.0, "VICReg: weight of the invariance (MSE) term")
    vicreg_variance: float = flag(25.0, "VICReg: weight of the variance (std hinge) term")
    vicreg_covariance: float = flag(1.0, "VICReg: weight of the covariance term")
    barlow_lambda: float = flag(0.0051, "BarlowTwins: weight of the off-diagonal (redundancy) term")
    # Shared-prototype KD (DINO, ProtoCPC, ProtoRKD)
    n_prototypes: int = flag(65536, "DINO/ProtoCPC/ProtoRKD: learnable prototypes shared by teacher and student")
    dino_teacher_temp: float = flag(0.04, "DINO/ProtoCPC/ProtoRKD: teacher (sharpening) temperature")
    dino_student_temp: float = flag(0.1, "DINO/ProtoCPC/ProtoRKD: student temperature")
    center_momentum: float = flag(0.9, "DINO/ProtoRKD: EMA momentum of the teacher centre; ProtoCPC: of the prior")
    # Auxiliary terms that combine with any loss
    w_simcse: float = flag(0.0, "weight of dropout SimCSE on the text tower (needs a trainable text tower)")
    byol: bool = flag(False, "add BYOL-style MSE of a second augmented image view onto the detached first view")
    w_byol: float = flag(1.0, "weight of the --byol term")
    # CLIP-KD (locked CLIP teacher -> CLIP student)
    w_clip: float = flag(1.0, "ProtoCLIP/CLIP-KD: weight of InfoNCE between the student image and text features")
    w_clip_kd_logit: float = flag(1.0, "CLIP-KD: weight of the image-text logit distillation (KL, both directions)")
    w_clip_kd_fd: float = flag(
        4.0, "CLIP-KD: weight of feature distillation, mean squared L2 distance (CLIP-KD's 2000 x MSE = 4000/D_t)"
    )
    w_clip_kd_icl: float = flag(1.0, "CLIP-KD: weight of interactive contrastive learning (student vs teacher)")
    w_clip_kd_intra: float = flag(0.0, "CLIP-KD: weight of intra-modal similarity-distribution KL")
    w_clip_kd_rkd: float = flag(0.0, "CLIP-KD: weight of intra-modal RKD (uses --w-rkd-d/--w-rkd-a)")
    clip_kd_teacher_dim: int = flag(
        -1,
        "CLIP-KD: width of the CLIP teacher's features (set from the teacher in training; 0 = no CLIP teacher, "
        "-1 = the student's joint width)",
    )
    clip_kd_text_teacher_dim: int = flag(
        0, "CLIP-KD: width of the --extra-text-teacher features (set from the teacher in training; 0 = none)"
    )
    w_clip_kd_text_teacher: float = flag(
        1.0, "CLIP-KD: weight of the --extra-text-teacher terms (it stands in for both modalities)"
    )
    clip_kd_teacher_temperature: float = flag(
        0.01, "CLIP-KD: teacher temperature when the loop provides no extra['teacher_logit_scale']"
    )
    # ProtoCLIP (k-means prototypes, back translation, external teacher)
    w_proto: float = flag(1.0, "ProtoCLIP: weight of the prototype loss")
    w_proto_external: float = flag(1.0, "ProtoCLIP: weight of the external-teacher prototype loss (needs --PBT)")
    infonce_warmup_epoch: int = flag(0, "ProtoCLIP: epochs before this index use only InfoNCE")
    k: int = flag(20000, "ProtoCLIP: number of k-means clusters (prototypes); at most the episode size")
    kmeans_max_iter: int = flag(20, "ProtoCLIP: k-means iterations")
    kmeans_nredo: int = flag(1, "ProtoCLIP: k-means restarts (the best objective is kept)")
    clustering_frequency: int = flag(1, "ProtoCLIP: re-cluster every N epochs (-1 = never, i.e. plain InfoNCE)")
    target_temperature: float = flag(
        -1.0, "ProtoCLIP: soft-target temperature over teacher centroids (<=0: hard one-hot labels)"
    )
    pbt: bool = flag(False, "ProtoCLIP: prototypical back translation (required by the external teacher)", name="--PBT")
    external_teacher: str | None = flag(None, "ProtoCLIP: .npy of external teacher features, one row per corpus row")
    external_teacher_dim: int = flag(64, "ProtoCLIP: width of the external teacher features (checked on load)")


@dataclass
class OptimConfig:
    epochs: int = flag(3, "training epochs (episodes)")
    batch_size: int = flag(64, "batch size per process")
    lr: float = flag(2e-3, "peak learning rate")
    wd: float = flag(0.1, "AdamW weight decay (not applied to biases, norms, temperatures)")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.98, "AdamW beta2")
    eps: float = flag(1e-6, "AdamW epsilon")
    warmup: int = flag(50, "linear warmup steps before the cosine decay")
    accum_freq: int = flag(1, "accumulate gradients over this many batches per optimizer step")
    max_grad_norm: float = flag(0.0, "clip the gradient norm to this value (0 = no clipping; the norm is logged)")
    precision: str = flag(
        "amp", "numeric precision (autocast is used only on CUDA)", ("fp32", "amp", "amp_bf16", "bf16")
    )
    seed: int = flag(0, "random seed")
    device: str = flag("auto", "cpu, cuda, cuda:N, or auto")
    torchcompile: bool = flag(False, "compile the towers with torch.compile")


@dataclass
class EvalConfig:
    eval_data_dir: str | None = flag(
        None, "root of downstream datasets (default with the demo corpus: its held-out split)"
    )
    zeroshot_frequency: int = flag(1, "zero-shot evaluation every N epochs (0 = never)")
    linear_frequency: int = flag(1, "linear-probe evaluation every N epochs (0 = never)")
    retrieval_frequency: int = flag(1, "retrieval evaluation every N epochs (0 = never)")
    nlp_eval_frequency: int = flag(0, "STS evaluation every N epochs (0 = never)")


@dataclass
class LogConfig:
    logs: str = flag(
        "./logs",
        "folder holding experiment directories (--logs-dir is the same flag; use it under torchrun, "
        "whose own --logs-specs makes a bare --logs ambiguous)",
        aliases=("--logs-dir",),
    )
    name: str | None = flag(None, "experiment name (default: generated from models, loss, batch and time)")
    resume: str | None = flag(None, "checkpoint path, or 'latest' for this experiment's epoch_latest.pt")
    save_frequency: int = flag(1, "write checkpoints/epoch_N.pt every N epochs (and at the last)")
    report_to: str = flag("tensorboard", "comma-separated: tensorboard, wandb, or '' for none")
    wandb_project: str = flag("protorkd", "wandb project when reporting to wandb")
    log_every_n_steps: int = flag(20, "write a progress line to out.log every N steps")
    teacher_cache: str | None = flag(None, "folder of precomputed teacher features (default: the experiment's cache/)")


GROUPS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "log": LogConfig,
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
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


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of an annotation like `int | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _parse_value(text: str, annotation: Any) -> Any:
    scalar, optional = _base_type(annotation)
    if optional and text == "None":
        return None
    if scalar is bool:
        if text not in ("True", "False"):
            raise ValueError(f"expected True or False, got {text!r}")
        return text == "True"
    return scalar(text)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field, grouped by concern, help from the field metadata."""
    for group_name, group_cls in GROUPS.items():
        arg_group = parser.add_argument_group(group_name)
        hints = _field_types(group_cls)
        for f in dataclasses.fields(group_cls):
            scalar, optional = _base_type(hints[f.name])
            help_text = f.metadata.get("help", "") + f" (default: {f.default!r})"
            choices = f.metadata.get("choices")
            kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": help_text}
            if scalar is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = (lambda s, t=scalar: None if s == "None" else t(s)) if optional else scalar
                kwargs["metavar"] = scalar.__name__.upper()
                if choices:
                    kwargs["choices"] = list(choices)
                    kwargs["metavar"] = "{" + ",".join(str(c) for c in choices) + "}"
            arg_group.add_argument(flag_name(f), *f.metadata.get("aliases", ()), **kwargs)


def config_from_namespace(namespace: argparse.Namespace) -> Config:
    known = {f.name for group in GROUPS.values() for f in dataclasses.fields(group)}
    return Config.from_flat_dict({k: v for k, v in vars(namespace).items() if k in known})


def write_params(config: Config, path: Path, extra: dict[str, Any] | None = None) -> None:
    """One `name: value` line per resolved flag, sorted by name (the original's params.txt format).

    Values are written with repr() for strings so that tabs and newlines survive the round trip.
    `extra` adds derived, informational lines (world size, version) that reading skips.
    """
    lines = {name: _format_value(value) for name, value in config.to_flat_dict().items()}
    for name, value in (extra or {}).items():
        lines[name] = _format_value(value)
    text = "".join(f"{name}: {lines[name]}\n" for name in sorted(lines))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return str(value)


def read_params(path: Path) -> Config:
    """Read params.txt back into the same Config (derived informational lines are ignored)."""
    hints: dict[str, Any] = {}
    for group_cls in GROUPS.values():
        hints.update(_field_types(group_cls))
    values: dict[str, Any] = {}
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, text = line.partition(": ")
        if not sep:
            raise ValueError(f"{path}:{line_number}: expected 'name: value', got {line!r}")
        if name not in hints:
            continue
        scalar, _ = _base_type(hints[name])
        if scalar is str and text != "None":
            import ast

            values[name] = ast.literal_eval(text)
        else:
            values[name] = _parse_value(text, hints[name])
    return Config.from_flat_dict(values)


def add_group_arguments(parser: argparse.ArgumentParser, group_name: str, *, defaults: bool = True) -> None:
    """Add the flags of one config group only (`protorkd eval` takes the "model" group: the tower flags).

    With `defaults=False` an omitted flag stays out of the namespace, so the caller can tell which were given.
    """
    group_cls = GROUPS[group_name]
    arg_group = parser.add_argument_group(f"{group_name} (the same flags as `protorkd train`)")
    hints = _field_types(group_cls)
    for f in dataclasses.fields(group_cls):
        scalar, optional = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": f.default if defaults else argparse.SUPPRESS,
            "help": f.metadata.get("help", "") + f" (default: {f.default!r})",
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
