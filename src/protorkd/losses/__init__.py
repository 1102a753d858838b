"""The loss registry: `build_loss(name, config, dim)` makes the `nn.Module` that `--loss NAME` selects.

Each entry is a factory `(config: LossConfig, dim: int) -> nn.Module` that unpacks the flags its loss
needs; `dim` is the joint embedding width. Every loss returns a flat dict of weighted named terms.
`build_loss` adds the auxiliary terms (--w-simcse, --byol) to whichever loss is chosen. The formulas,
defaults and references are in docs/method.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.nn as nn

from protorkd.config import LossConfig
from protorkd.losses.auxiliary import BYOL, LossWithAuxiliaries, SimCSE
from protorkd.losses.base import LossInputs
from protorkd.losses.clip_kd import CLIPKD, ClipKDWeights, ClipTeacher
from protorkd.losses.contrastive import InfoNCE
from protorkd.losses.protoclip import ProtoCLIP
from protorkd.losses.prototype import DINO, ProtoCPC, ProtoRKD
from protorkd.losses.queue import SEED, CompRess
from protorkd.losses.redundancy import BarlowTwins, VICReg
from protorkd.losses.regression import SimReg
from protorkd.losses.relational import RKD
from protorkd.registry import Registry

LossFactory = Callable[[LossConfig, int], nn.Module]
LOSSES: Registry[LossFactory] = Registry("loss")


@LOSSES.register("InfoNCE")
def _infonce(cfg: LossConfig, dim: int) -> nn.Module:
    return InfoNCE(
        init_temperature=cfg.temperature,
        weight=cfg.w_distill,
        gather_with_grad=cfg.gather_with_grad,
        local_loss=cfg.local_loss,
    )


@LOSSES.register("SimReg")
def _simreg(cfg: LossConfig, dim: int) -> nn.Module:
    return SimReg("mse", weight=cfg.w_distill)


@LOSSES.register("SimReg-L1")
def _simreg_l1(cfg: LossConfig, dim: int) -> nn.Module:
    return SimReg("l1", weight=cfg.w_distill)


@LOSSES.register("SimReg-SmoothL1")
def _simreg_smooth_l1(cfg: LossConfig, dim: int) -> nn.Module:
    return SimReg("smooth_l1", weight=cfg.w_distill)


@LOSSES.register("RKD")
def _rkd(cfg: LossConfig, dim: int) -> nn.Module:
    return RKD(cfg.w_rkd_d, cfg.w_rkd_a, angle_chunk=cfg.rkd_angle_chunk, weight=cfg.w_distill)


@LOSSES.register("CompRess-1q")
def _compress_1q(cfg: LossConfig, dim: int) -> nn.Module:
    return CompRess(dim, cfg.queue_size, cfg.queue_temperature, two_queues=False, weight=cfg.w_distill)


@LOSSES.register("CompRess-2q")
def _compress_2q(cfg: LossConfig, dim: int) -> nn.Module:
    return CompRess(dim, cfg.queue_size, cfg.queue_temperature, two_queues=True, weight=cfg.w_distill)


@LOSSES.register("SEED")
def _seed(cfg: LossConfig, dim: int) -> nn.Module:
    return SEED(dim, cfg.queue_size, cfg.seed_student_temperature, cfg.seed_teacher_temperature, weight=cfg.w_distill)


@LOSSES.register("VICReg")
def _vicreg(cfg: LossConfig, dim: int) -> nn.Module:
    return VICReg(cfg.vicreg_invariance, cfg.vicreg_variance, cfg.vicreg_covariance, weight=cfg.w_distill)


@LOSSES.register("BarlowTwins")
def _barlow_twins(cfg: LossConfig, dim: int) -> nn.Module:
    return BarlowTwins(cfg.barlow_lambda, weight=cfg.w_distill)


@LOSSES.register("DINO")
def _dino(cfg: LossConfig, dim: int) -> nn.Module:
    return DINO(
        dim, cfg.n_prototypes, cfg.dino_teacher_temp, cfg.dino_student_temp, cfg.center_momentum, weight=cfg.w_distill
    )


@LOSSES.register("ProtoCPC")
def _protocpc(cfg: LossConfig, dim: int) -> nn.Module:
    return ProtoCPC(
        dim, cfg.n_prototypes, cfg.dino_teacher_temp, cfg.dino_student_temp, cfg.center_momentum, weight=cfg.w_distill
    )


@LOSSES.register("ProtoRKD")
def _protorkd(cfg: LossConfig, dim: int) -> nn.Module:
    return ProtoRKD(
        dim, cfg.n_prototypes, cfg.dino_teacher_temp, cfg.dino_student_temp, cfg.center_momentum, weight=cfg.w_distill
    )


# A text-only teacher (e.g. a sentence-transformers model) stands in for both modalities: its caption
# embedding is the target of the student's image and text features alike.
TEXT_ONLY_TEACHER = ClipTeacher(
    name="text",
    image_key="text_teacher_features",
    text_key="text_teacher_features",
    logit_scale_key="text_teacher_logit_scale",
)


@LOSSES.register("CLIP-KD")
def _clip_kd(cfg: LossConfig, dim: int) -> nn.Module:
    temperature = cfg.clip_kd_teacher_temperature
    teachers = []
    if cfg.clip_kd_teacher_dim != 0:
        teachers.append(ClipTeacher(name="clip", dim=cfg.clip_kd_teacher_dim, temperature=temperature))
    if cfg.clip_kd_text_teacher_dim != 0:
        teachers.append(
            dataclasses.replace(
                TEXT_ONLY_TEACHER,
                dim=cfg.clip_kd_text_teacher_dim,
                weight=cfg.w_clip_kd_text_teacher,
                temperature=temperature,
            )
        )
    weights = ClipKDWeights(
        infonce=cfg.w_clip,
        logit=cfg.w_clip_kd_logit,
        fd=cfg.w_clip_kd_fd,
        icl=cfg.w_clip_kd_icl,
        intra=cfg.w_clip_kd_intra,
        rkd=cfg.w_clip_kd_rkd,
        rkd_distance=cfg.w_rkd_d,
        rkd_angle=cfg.w_rkd_a,
    )
    return CLIPKD(dim, tuple(teachers), weights, init_temperature=cfg.temperature, rkd_angle_chunk=cfg.rkd_angle_chunk)


@LOSSES.register("ProtoCLIP")
def _protoclip(cfg: LossConfig, dim: int) -> nn.Module:
    return ProtoCLIP(
        init_temperature=cfg.temperature,
        w_clip=cfg.w_clip,
        w_proto=cfg.w_proto,
        w_proto_external=cfg.w_proto_external,
        target_temperature=cfg.target_temperature,
        pbt=cfg.pbt,
        infonce_warmup_epoch=cfg.infonce_warmup_epoch,
    )


def build_auxiliary_losses(cfg: LossConfig) -> dict[str, nn.Module]:
    """The auxiliary terms the flags enable: {"simcse": SimCSE} for --w-simcse > 0, {"byol": BYOL} for --byol."""
    auxiliaries: dict[str, nn.Module] = {}
    if cfg.w_simcse:
        auxiliaries["simcse"] = SimCSE(weight=cfg.w_simcse)
    if cfg.byol:
        auxiliaries["byol"] = BYOL(weight=cfg.w_byol)
    return auxiliaries


def build_loss(name: str, cfg: LossConfig, dim: int) -> nn.Module:
    """The loss module registered as `name` (case-insensitive); an unknown name lists the valid ones.

    With auxiliary terms enabled the result is a `LossWithAuxiliaries` (the chosen loss is its `main`).
    """
    loss = LOSSES.get(name)(cfg, dim)
    auxiliaries = build_auxiliary_losses(cfg)
    return LossWithAuxiliaries(loss, auxiliaries) if auxiliaries else loss


__all__ = ["LOSSES", "LossInputs", "build_auxiliary_losses", "build_loss"]
