"""The loss registry: `build_loss(name, options, embed_dim)` makes the `nn.Module` that `--loss NAME` selects.

Each entry is a factory `(options: LossOptions, context: LossContext) -> nn.Module` that unpacks the
flags its loss needs; the context carries facts resolved by the run (the joint embedding width, the
separate teachers' feature widths), never written back into the options. Every loss returns a flat
dict of weighted named terms and declares what it needs from the run (`loss.needs`, a `LossNeeds`).
`build_loss` adds the auxiliary terms (--w-simcse, --byol) to whichever loss is chosen. The formulas,
defaults and references are in docs/method.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch.nn as nn

from protorkd.errors import UsageError
from protorkd.losses.auxiliary import BYOL, LossWithAuxiliaries, SimCSE
from protorkd.losses.base import Scope
from protorkd.losses.clip_kd import CLIPKD, ClipKDWeights, ClipTeacher
from protorkd.losses.combined import WeightedLossSum, parse_loss_weights, split_loss_name
from protorkd.losses.contrastive import InfoNCE
from protorkd.losses.options import LossOptions
from protorkd.losses.protoclip import ProtoCLIP
from protorkd.losses.prototype import DINO, ProtoCPC, ProtoRKD
from protorkd.losses.queue import SEED, CompRess
from protorkd.losses.redundancy import BarlowTwins, VICReg
from protorkd.losses.regression import SimReg
from protorkd.losses.relational import RKD
from protorkd.registry import Registry
from protorkd.teachers.keys import CLIP_TEXT_KEY, TEXT_TEACHER_KEY, TEXT_TEACHER_LOGIT_SCALE_KEY


@dataclass(frozen=True)
class LossContext:
    """Facts about the run a loss is built for: the joint width D, {teacher key: width} of the separate
    locked teachers whose features the run provides (empty: no such teachers), and the run's seed (what a
    loss's random initial state, such as ITRA's random queue rows, is drawn from)."""

    embed_dim: int
    teacher_dims: Mapping[str, int] = field(default_factory=dict)
    seed: int = 0


LossFactory = Callable[[LossOptions, LossContext], nn.Module]
LOSSES: Registry[LossFactory] = Registry("loss")


def distill_scope(o: LossOptions) -> Scope:
    """The batch a distillation loss computes over under DDP (--distill-batch, --gather-with-grad)."""
    return Scope(global_batch=o.distill_batch == "global", with_grad=o.gather_with_grad)


def contrastive_scope(o: LossOptions) -> Scope:
    """The global batch of a loss whose original gathers it (open_clip's gather; --gather-with-grad)."""
    return Scope(global_batch=True, with_grad=o.gather_with_grad)


@LOSSES.register("InfoNCE")
def _infonce(o: LossOptions, context: LossContext) -> nn.Module:
    return InfoNCE(
        init_temperature=o.temperature, weight=o.w_distill, gather_with_grad=o.gather_with_grad, local_loss=o.local_loss
    )


def _register_simreg(name: str, penalty: str) -> None:
    LOSSES.register(name)(lambda o, context: SimReg(penalty, weight=o.w_distill, scope=distill_scope(o)))


for _name, _penalty in (("SimReg", "mse"), ("SimReg-L1", "l1"), ("SimReg-SmoothL1", "smooth_l1")):
    _register_simreg(_name, _penalty)


@LOSSES.register("RKD")
def _rkd(o: LossOptions, context: LossContext) -> nn.Module:
    return RKD(o.w_rkd_d, o.w_rkd_a, angle_chunk=o.rkd_angle_chunk, weight=o.w_distill, scope=distill_scope(o))


def _register_compress(name: str, two_queues: bool) -> None:
    @LOSSES.register(name)
    def factory(o: LossOptions, context: LossContext) -> nn.Module:
        return CompRess(
            context.embed_dim,
            o.queue_size,
            o.queue_temperature,
            two_queues=two_queues,
            weight=o.w_distill,
            init=o.queue_init,
            seed=context.seed,
            scope=distill_scope(o),
        )


_register_compress("CompRess-1q", two_queues=False)
_register_compress("CompRess-2q", two_queues=True)


@LOSSES.register("SEED")
def _seed(o: LossOptions, context: LossContext) -> nn.Module:
    return SEED(
        context.embed_dim,
        o.queue_size,
        o.seed_student_temperature,
        o.seed_teacher_temperature,
        weight=o.w_distill,
        init=o.queue_init,
        seed=context.seed,
        scope=distill_scope(o),
    )


@LOSSES.register("VICReg")
def _vicreg(o: LossOptions, context: LossContext) -> nn.Module:
    coefficients = (o.vicreg_invariance, o.vicreg_variance, o.vicreg_covariance)
    return VICReg(*coefficients, weight=o.w_distill, scope=distill_scope(o))


@LOSSES.register("BarlowTwins")
def _barlow_twins(o: LossOptions, context: LossContext) -> nn.Module:
    return BarlowTwins(o.barlow_lambda, weight=o.w_distill, scope=distill_scope(o))


def _register_shared_prototypes(name: str, loss_class: type[nn.Module]) -> None:
    """DINO, ProtoCPC and ProtoRKD take the same flags: prototypes, two temperatures, a momentum."""

    @LOSSES.register(name)
    def factory(o: LossOptions, context: LossContext) -> nn.Module:
        return loss_class(
            context.embed_dim,
            o.n_prototypes,
            o.dino_teacher_temp,
            o.dino_student_temp,
            o.center_momentum,
            weight=o.w_distill,
            scope=distill_scope(o),
        )


for _name, _class in (("DINO", DINO), ("ProtoCPC", ProtoCPC), ("ProtoRKD", ProtoRKD)):
    _register_shared_prototypes(_name, _class)


# A text-only teacher (e.g. a sentence-transformers model) stands in for both modalities: its caption
# embedding is the target of the student's image and text features alike.
TEXT_ONLY_TEACHER = ClipTeacher(
    name="text",
    image_key=TEXT_TEACHER_KEY,
    text_key=TEXT_TEACHER_KEY,
    logit_scale_key=TEXT_TEACHER_LOGIT_SCALE_KEY,
)


def clip_kd_teachers(o: LossOptions, teacher_dims: Mapping[str, int]) -> tuple[ClipTeacher, ...]:
    """CLIP-KD's teachers: those the run provides (their widths from `teacher_dims`); without any,
    the flags say (`--clip-kd-teacher-dim`, -1 = the student's width; `--clip-kd-text-teacher-dim`)."""
    clip_dim = teacher_dims.get(CLIP_TEXT_KEY)
    text_dim = teacher_dims.get(TEXT_TEACHER_KEY)
    if clip_dim is not None and o.clip_kd_teacher_dim > 0 and o.clip_kd_teacher_dim != clip_dim:
        raise UsageError(
            f"--clip-kd-teacher-dim {o.clip_kd_teacher_dim}: the CLIP teacher's features are {clip_dim}-d "
            "(leave the flag at -1 to read the width from the teacher)"
        )
    if not teacher_dims:
        clip_dim, text_dim = o.clip_kd_teacher_dim, o.clip_kd_text_teacher_dim
    temperature = o.clip_kd_teacher_temperature
    teachers = []
    if clip_dim:  # None or 0: no CLIP teacher
        teachers.append(ClipTeacher(name="clip", dim=clip_dim, temperature=temperature))
    if text_dim:
        text = dataclasses.replace(TEXT_ONLY_TEACHER, dim=text_dim, weight=o.w_clip_kd_text_teacher)
        teachers.append(dataclasses.replace(text, temperature=temperature))
    return tuple(teachers)


@LOSSES.register("CLIP-KD")
def _clip_kd(o: LossOptions, context: LossContext) -> nn.Module:
    weights = ClipKDWeights(
        infonce=o.w_clip,
        logit=o.w_clip_kd_logit,
        fd=o.w_clip_kd_fd,
        icl=o.w_clip_kd_icl,
        intra=o.w_clip_kd_intra,
        rkd=o.w_clip_kd_rkd,
        rkd_distance=o.w_rkd_d,
        rkd_angle=o.w_rkd_a,
    )
    teachers = clip_kd_teachers(o, context.teacher_dims)
    return CLIPKD(
        context.embed_dim,
        teachers,
        weights,
        init_temperature=o.temperature,
        rkd_angle_chunk=o.rkd_angle_chunk,
        scope=contrastive_scope(o),
    )


@LOSSES.register("ProtoCLIP")
def _protoclip(o: LossOptions, context: LossContext) -> nn.Module:
    return ProtoCLIP(
        init_temperature=o.temperature,
        w_clip=o.w_clip,
        w_proto=o.w_proto,
        w_proto_external=o.w_proto_external,
        target_temperature=o.target_temperature,
        pbt=o.pbt,
        infonce_warmup_epoch=o.infonce_warmup_epoch,
        lit_start_epoch=o.lit_start_epoch,
        scope=contrastive_scope(o),
    )


def build_auxiliary_losses(o: LossOptions, scope: Scope | None = None) -> dict[str, nn.Module]:
    """The auxiliary terms the flags enable: {"simcse": SimCSE} for --w-simcse > 0, {"byol": BYOL} for --byol.
    `scope`: the main loss's batch (ITRA gathers SimCSE's features exactly when its main loss gathers)."""
    scope = scope or distill_scope(o)
    auxiliaries: dict[str, nn.Module] = {}
    if o.w_simcse:
        auxiliaries["simcse"] = SimCSE(weight=o.w_simcse, scope=scope)
    if o.byol:
        auxiliaries["byol"] = BYOL(weight=o.w_byol, scope=scope)
    return auxiliaries


def loss_components(name: str, weights: str = "") -> list[tuple[str, float]]:
    """[(registered name, weight)] of `--loss name --loss-weights weights`: one loss with weight 1, or each
    loss of a sum `A+B`. Names are case-insensitive; an unknown one is an error listing the valid names."""
    parts = split_loss_name(name)
    if len(parts) == 1 and weights.strip():
        raise UsageError(f"--loss-weights {weights!r}: --loss-weights needs a sum of losses, e.g. --loss InfoNCE+RKD")
    canonical = {registered.lower(): registered for registered in LOSSES.names()}
    for part in parts:
        LOSSES.get(part)  # an unknown name lists the valid ones
    return list(zip([canonical[part.lower()] for part in parts], parse_loss_weights(weights, len(parts), name)))


def build_loss(
    name: str,
    options: LossOptions,
    embed_dim: int,
    *,
    teacher_dims: Mapping[str, int] | None = None,
    seed: int = 0,
) -> nn.Module:
    """The loss module registered as `name` (case-insensitive), or the `WeightedLossSum` of a sum `A+B`
    weighted by `options.loss_weights`; an unknown name lists the valid ones. `seed`: the run's seed.

    With auxiliary terms enabled the result is a `LossWithAuxiliaries` (the chosen loss is its `main`).
    """
    context = LossContext(embed_dim, dict(teacher_dims or {}), seed)
    components = loss_components(name, options.loss_weights)
    if len(components) == 1:
        loss = LOSSES.get(name)(options, context)
    else:
        names = [part for part, _ in components]
        loss = WeightedLossSum(
            names, [LOSSES.get(part)(options, context) for part in names], [w for _, w in components]
        )
    auxiliaries = build_auxiliary_losses(options, loss.scope)
    return LossWithAuxiliaries(loss, auxiliaries) if auxiliaries else loss


def main_loss(loss: nn.Module) -> nn.Module:
    """The chosen loss inside a `LossWithAuxiliaries` wrapper (or the loss itself)."""
    return loss.main if isinstance(loss, LossWithAuxiliaries) else loss
