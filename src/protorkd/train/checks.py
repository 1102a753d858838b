"""The checks `build_run` makes of a run's flags against each other and against the data, each a one-line
UsageError naming the flags and the fix (the flags' own ranges are `config.validate_config`'s)."""

from __future__ import annotations

import logging

from protorkd.config import Config
from protorkd.errors import UsageError
from protorkd.losses import LossNeeds
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.options import TeacherSide
from protorkd.teachers.keys import TEACHER_FLAGS

log = logging.getLogger(__name__)


def check_batch_fits(rows: int, episode_size: int, world_size: int, batch_size: int) -> None:
    per_process = -(-(episode_size if episode_size > 0 else rows) // world_size)
    if per_process < batch_size:
        raise UsageError(
            f"an epoch has {per_process} samples per process, fewer than --batch-size {batch_size}; "
            "lower --batch-size or use more data"
        )


def check_auxiliary_inputs(needs: LossNeeds, model: DualEncoder, teacher: TeacherSide) -> None:
    """SimCSE needs a second dropout pass of an online text tower; BYOL a second view through the image tower."""
    if needs.text_dropout_view and model.lock_text:
        raise UsageError(
            "--w-simcse needs an online, trainable text tower, but the text tower is locked "
            "(--teacher text or --lock-text-model) and its features may come from the cache; "
            "use --teacher image or --teacher none"
        )
    if needs.image_view2 and teacher is TeacherSide.IMAGE:
        raise UsageError(
            "--byol needs the image tower to run on a second view, but --teacher image caches its features"
        )


def check_projection_heads(add_projection_head: bool, clustering: bool, loss_name: str) -> None:
    """ProtoCLIP's projection heads serve only a loss that clusters; without them ProtoCLIP clusters the joint space."""
    if add_projection_head and not clustering:
        raise UsageError(
            f"--add-projection-head: --loss {loss_name} does not use projection heads (only a loss that clusters, "
            "ProtoCLIP, does); drop the flag"
        )
    if clustering and not add_projection_head:
        log.warning(
            "--loss %s without --add-projection-head clusters the joint (evaluation) space; ProtoCLIP's method "
            "clusters the space of its projection heads (--add-projection-head)",
            loss_name,
        )


def check_schedule_epochs(cfg: Config) -> None:
    """--lit-start-epoch, --text-start-epoch and --text-end-epoch must lie within the run's epochs."""
    o, lit = cfg.optim, cfg.loss.lit_start_epoch
    text_end = o.epochs if o.text_end_epoch < 0 else o.text_end_epoch
    if lit > o.epochs:
        raise UsageError(f"--lit-start-epoch {lit}: the run has only {o.epochs} epochs (-1 = no LiT phase)")
    if not 0 <= o.text_start_epoch < text_end <= o.epochs:
        raise UsageError(
            f"--text-start-epoch {o.text_start_epoch} / --text-end-epoch {o.text_end_epoch}: need 0 <= start < end "
            f"<= --epochs {o.epochs} (-1 = the last epoch)"
        )


def check_teacher_inputs(needs: LossNeeds, provided: set[str], loss_name: str) -> None:
    """The separate teachers' features the loss reads must be provided, and none provided may go unused."""
    missing = sorted(needs.teacher_features - provided)
    if missing:
        flags = sorted({TEACHER_FLAGS.get(key, key) for key in missing})
        raise UsageError(
            f"--loss {loss_name} distils from locked teacher features ({', '.join(missing)}); give {' / '.join(flags)} "
            "(e.g. --clip-teacher-model ViT-B-32 --clip-teacher-tag openai, or --extra-text-teacher all-MiniLM-L6-v2)"
        )
    unused = sorted({TEACHER_FLAGS[key] for key in provided - needs.teacher_features})
    if unused:
        raise UsageError(f"{', '.join(unused)}: --loss {loss_name} does not use these teachers (CLIP-KD does)")


def check_teacher_views(cfg: Config, model: DualEncoder, streamed: bool) -> None:
    """--teacher-views needs an image teacher, rows to store views by, and a training transform whose draws can be
    stored; it replaces --clip-teacher-images (online or cached)."""
    if cfg.model.teacher_views == 0:
        return
    if cfg.model.teacher_side is not TeacherSide.IMAGE and not cfg.model.clip_teacher_model:
        raise UsageError(
            "--teacher-views: this run has no image teacher; give --teacher image or a --clip-teacher-model "
            "(a text teacher keeps its one cached feature per caption)"
        )
    if cfg.model.clip_teacher_model and cfg.model.clip_teacher_images == "cached":
        raise UsageError(
            "--teacher-views with --clip-teacher-images cached: choose one (stored views replace both the online "
            "teacher and its centre-crop cache)"
        )
    if streamed:
        raise UsageError(
            "--teacher-views needs a TSV corpus: views are stored per image; webdataset shards are streamed"
        )
    from protorkd.data.transforms import train_transform
    from protorkd.data.views import view_width

    try:
        view_width(train_transform(model.image_preprocess, cfg.data.augmentation))
    except ValueError as error:
        raise UsageError(f"--teacher-views with --augmentation {cfg.data.augmentation}: {error}") from None
