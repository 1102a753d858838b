"""The checks `build_run` makes of a run's flags against each other and against the data, each a one-line
UsageError naming the flags and the fix (the flags' own ranges are `config.validate_config`'s).

All of them run before the experiment folder exists and before any teacher feature is computed
(`check_before_teachers`): a refusal must never come after minutes of filling the teacher cache.
"""

from __future__ import annotations

import logging

import torch

from protorkd.config import Config
from protorkd.data.corpus import Corpus, ShardCorpus
from protorkd.data.mixup import run_mixup
from protorkd.errors import UsageError
from protorkd.losses import LossNeeds, build_loss
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.options import TeacherSide
from protorkd.teachers.caption_ensemble import require_caption_ensemble_inputs
from protorkd.teachers.features import online_teacher_definitions, teacher_definitions
from protorkd.teachers.keys import CLIP_IMAGE_KEY, CLIP_TEXT_KEY, TEACHER_FLAGS

log = logging.getLogger(__name__)


def check_batch_fits(rows: int, episode_size: int, world_size: int, batch_size: int, accum_freq: int = 1) -> None:
    per_process = -(-(episode_size if episode_size > 0 else rows) // world_size)
    if per_process < batch_size:
        raise UsageError(
            f"an epoch has {per_process} samples per process, fewer than --batch-size {batch_size}; "
            "lower --batch-size or use more data"
        )
    if per_process // batch_size < accum_freq:
        raise UsageError(
            f"an epoch has {per_process // batch_size} batches per process, fewer than --accum-freq {accum_freq} "
            "(one optimizer step per that many batches); lower --accum-freq or --batch-size"
        )


def check_image_size(model: DualEncoder, image_size: int | None) -> None:
    """The image tower takes images of the run's size: one forward of two black images (eval mode, no gradients,
    the random state untouched), so a size it cannot take is refused before anything exists, not mid-run."""
    tower = model.image_tower
    if tower is None:
        return
    size = model.image_preprocess.image_size
    was_training = tower.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            tower.eval()
            tower(torch.zeros(2, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        given = f"--image-size {image_size}" if image_size else f"its own size {size}"
        raise UsageError(
            f"{given}: the image tower {tower.name} cannot take {size}x{size} images ({first}); "
            "use a larger --image-size, or omit it for the tower's own size"
        ) from None
    finally:
        tower.train(was_training)


def _separate_teacher_keys(cfg: Config) -> set[str]:
    """The `LossInputs` keys of the separate locked teachers the flags name (cached or online), as
    `Teachers.keys` will hold them once they ran."""
    cached = {key for _, key in teacher_definitions(cfg.model) if key is not None}
    return cached | {key for _, key in online_teacher_definitions(cfg.model)}


def loss_needs(cfg: Config, model: DualEncoder) -> LossNeeds:
    """What the loss will need from the run, known before any teacher runs: the loss is built once here with
    stand-in widths for the separate teachers the flags name (its needs depend on which teachers, not on their
    widths) and dropped; the random state is restored, so the run's own build draws the same numbers."""
    keys = _separate_teacher_keys(cfg)
    o = cfg.loss
    clip_width = o.clip_kd_teacher_dim if o.clip_kd_teacher_dim > 0 else model.embed_dim
    widths = {key: clip_width if key in (CLIP_TEXT_KEY, CLIP_IMAGE_KEY) else model.embed_dim for key in keys}
    with torch.random.fork_rng(devices=[]):
        return build_loss(o.loss, o, model.embed_dim, teacher_dims=widths).needs


def check_before_teachers(cfg: Config, corpus: Corpus, model: DualEncoder, needs: LossNeeds) -> None:
    """Every check of the flags against the loss, the teachers and the corpus that can be made without teacher
    features: each one here used to fail only after the teacher cache was filled (issue 25)."""
    teacher, loss_name = cfg.model.teacher_side, cfg.loss.loss
    check_schedule_epochs(cfg)
    check_auxiliary_inputs(needs, model, teacher)
    streamed = isinstance(corpus, ShardCorpus)
    if streamed and any(key is not None for _, key in teacher_definitions(cfg.model)):
        raise UsageError(
            f"--loss {loss_name} with separate teachers needs a TSV corpus (cached features are keyed by row); use "
            "--dataset-type csv"
        )
    if streamed and (needs.row_ids or needs.teacher_features):
        raise UsageError(
            f"--loss {loss_name} needs corpus rows (cached teacher features or per-row clusters), which "
            "streamed webdataset shards do not have; use a TSV corpus (--dataset-type csv)"
        )
    if not streamed:  # streamed shards run no cached teacher, so they provide none of these features
        check_teacher_inputs(needs, _separate_teacher_keys(cfg), loss_name)
    if cfg.model.add_projection_head and not needs.clustering:
        raise UsageError(
            f"--add-projection-head: --loss {loss_name} does not use projection heads (only a loss that clusters, "
            "ProtoCLIP, does); drop the flag"
        )
    if cfg.data.caption_ensemble:
        require_caption_ensemble_inputs(teacher, has_rows=not streamed)
    images_trained = teacher is not TeacherSide.IMAGE or streamed  # a locked image tower is read from its cache
    run_mixup(cfg.data.mixup_alpha, cfg.data.mixup_prob, cfg.optim.seed, loss_name=loss_name,
              loss_accepts=needs.accepts_mixup, images_trained=images_trained)  # fmt: skip


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


def warn_without_projection_heads(add_projection_head: bool, clustering: bool, loss_name: str) -> None:
    """Without ProtoCLIP's projection heads a clustering loss clusters the joint space (logged in out.log; a
    projection head without clustering is refused by `check_before_teachers`)."""
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
