"""The model flags as a library spec: what `build_dual_encoder` and the teacher definitions read."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from protorkd.options import Rule, flag

# Upper bounds of the flags that size weights: a head's hidden layer is WIDTH x WIDTH (1 GB of fp32 at the maximum)
MAX_WIDTH = 16384
MAX_LAYERS = 16
MAX_IMAGE_SIZE = 2048  # a batch of 64 such images is 3 GB in fp32
AUTOMATIC_OR_WIDTH = Rule(
    f"-1 (automatic) or at least 1 and at most {MAX_WIDTH}", lambda value: value == -1 or 1 <= value <= MAX_WIDTH
)


# The flags that say what the two towers are (what a teacher cache is keyed by, with the teachers' own flags)
TOWER_FLAGS = (
    "image_model_builder",
    "image_model",
    "image_model_tag",
    "image_size",
    "text_model_builder",
    "text_model",
    "text_model_tag",
    "text_pooler",
    "max_seq_length",
)
# The flags that say what a model is: its towers and heads. The others say how it trains (locks, adapters,
# gradient checkpointing) or what it is distilled from (teachers); `protorkd eval --help` lists only these.
ARCHITECTURE_FLAGS = (
    *TOWER_FLAGS,
    "image_head_n_layers",
    "text_head_n_layers",
    "head_hidden_dim",
    "joint_projection_dim",
)


class TeacherSide(str, Enum):
    """Which tower of the dual encoder is the locked teacher (`--teacher`); NONE trains both CLIP-style."""

    TEXT = "text"
    IMAGE = "image"
    NONE = "none"


@dataclass
class ModelOptions:
    """The towers, heads, locks and locked teachers of a dual encoder (the `model` flags of `protorkd train`)."""

    image_model_builder: str = flag("custom", "image tower library", ("open_clip", "timm", "torchvision", "custom"))
    image_model: str = flag("tiny-cnn", "image tower architecture name within its builder")
    image_model_tag: str = flag(
        "",
        "pretrained weights: an open_clip pretrained tag, a torchvision weights name, 'pretrained' for timm, "
        "or a local checkpoint path",
    )
    image_size: int | None = flag(
        None,
        "input resolution in pixels (default: the tower's own); a size the image tower cannot take is refused "
        "before anything is created",
        minimum=1,
        maximum=MAX_IMAGE_SIZE,
    )
    text_model_builder: str = flag("sbert", "text tower library", ("open_clip", "huggingface", "sbert", "custom"))
    text_model: str = flag("all-MiniLM-L6-v2", "text tower name: a hub id, a local folder, or an architecture name")
    text_model_tag: str = flag("", "open_clip pretrained tag or local checkpoint path for an open_clip text tower")
    text_pooler: str = flag("mean", "pooling of a huggingface text tower", ("cls", "cls_before_pooler", "mean"))
    max_seq_length: int = flag(
        0, "truncate captions to this many tokens (0 = the tower's default)", minimum=0, maximum=MAX_WIDTH
    )
    lock_image_model: bool = flag(False, "freeze the image tower (eval mode, no gradients)")
    lock_text_model: bool = flag(False, "freeze the text tower (eval mode, no gradients)")
    teacher: str = flag(
        "text",
        "which tower is the locked teacher (it is locked automatically); none = train both CLIP-style",
        ("text", "image", "none"),
    )
    image_head_n_layers: int = flag(
        1, "image projection head: 0 identity, 1 linear, >=2 MLP", minimum=0, maximum=MAX_LAYERS
    )
    text_head_n_layers: int = flag(
        0, "text projection head: 0 identity, 1 linear, >=2 MLP", minimum=0, maximum=MAX_LAYERS
    )
    head_hidden_dim: int = flag(2048, "hidden width of MLP heads", minimum=1, maximum=MAX_WIDTH)
    joint_projection_dim: int = flag(
        -1, "joint embedding width (-1: the width of a tower whose head is identity)", rule=AUTOMATIC_OR_WIDTH
    )
    # ProtoCLIP's projection heads: the prototype space on top of the joint space (never used by evaluation)
    add_projection_head: bool = flag(
        False, "ProtoCLIP: add image and text projection heads; clustering and the prototype loss run in their space"
    )
    projection_dim: int = flag(
        128, "ProtoCLIP: output width of the projection heads (the clustering space)", minimum=1, maximum=MAX_WIDTH
    )
    projection_hidden_dim: int = flag(
        2048, "ProtoCLIP: hidden width of the projection heads", minimum=1, maximum=MAX_WIDTH
    )
    projection_n_layers: int = flag(
        1,
        "ProtoCLIP: hidden Linear+BatchNorm+ReLU blocks of the projection heads (0 = one Linear)",
        minimum=0,
        maximum=MAX_LAYERS,
    )
    adapter: str | None = flag(None, "parameter-efficient adapter for a trainable text tower", (None, "lora"))
    lora_r: int = flag(8, "LoRA rank", minimum=1, maximum=1024)
    lora_alpha: int = flag(16, "LoRA scaling alpha", minimum=1)
    lora_dropout: float = flag(
        0.1, "LoRA dropout", rule=Rule("at least 0 and less than 1", lambda value: 0 <= value < 1)
    )
    grad_checkpointing: bool = flag(False, "gradient checkpointing in towers that support it")
    # Separate locked teachers (CLIP-KD); their features are computed once into the teacher cache
    clip_teacher_model: str = flag(
        "", "CLIP-KD: open_clip architecture of a locked CLIP teacher, e.g. ViT-B-32 ('' = no CLIP teacher)"
    )
    clip_teacher_tag: str = flag("", "CLIP-KD: the CLIP teacher's open_clip pretrained tag (e.g. openai) or checkpoint")
    clip_teacher_images: str = flag(
        "online",
        "CLIP-KD: online = the CLIP teacher encodes the student's augmented batch every step (CLIP-KD: the same "
        "view); cached = its features of centre crops, computed once (exact only for a deterministic transform)",
        ("online", "cached"),
    )
    teacher_views: int = flag(
        0,
        "an image teacher (a --clip-teacher-model's image tower, or the tower of --teacher image) read from a "
        "reinforced cache: its features of this many stored augmented views of every image, drawn once from the "
        "training transform; each epoch the student replays one of them exactly (MobileCLIP's dataset "
        "reinforcement; docs/training.md). 0 = off",
        minimum=0,
        maximum=1000,
    )
    teacher_views_seed: int = flag(
        0,
        "the seed the reinforced cache's views are drawn with: a property of the cache, not of the run, so one cache "
        "serves runs of every --seed (as MobileCLIP's reinforced datasets do); each run's --seed picks which stored "
        "view a row replays in each epoch",
        minimum=0,
        maximum=2**63 - 1,
    )
    extra_text_teacher: str = flag(
        "", "CLIP-KD: a locked text-only teacher distilled alongside (e.g. all-MiniLM-L6-v2; '' = none)"
    )
    extra_text_teacher_builder: str = flag(
        "sbert", "library of --extra-text-teacher", ("open_clip", "huggingface", "sbert", "custom")
    )

    @property
    def teacher_side(self) -> TeacherSide:
        return TeacherSide(self.teacher)

    @property
    def locks(self) -> tuple[bool, bool]:
        """(lock image, lock text): the teacher tower is always locked."""
        side = self.teacher_side
        return self.lock_image_model or side is TeacherSide.IMAGE, self.lock_text_model or side is TeacherSide.TEXT
