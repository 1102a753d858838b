import math

import pytest
import torch
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.losses.clip_kd import CLIPKD, ClipKDWeights, ClipTeacher
from protorkd.losses.relational import RKD


def unit_rows(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


S_IMAGE = unit_rows([[1.0, 0.2], [0.1, 1.0], [-0.5, 0.5]])
S_TEXT = unit_rows([[0.9, 0.4], [0.3, 1.0], [-0.7, 0.2]])
T_IMAGE = unit_rows([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.3]])
T_TEXT = unit_rows([[1.0, 0.5], [-0.2, 1.0], [-0.9, -0.1]])
STUDENT_SCALE = 1 / 0.07
TEACHER_SCALE = 50.0


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def log_softmax(values):
    top = max(values)
    log_z = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_z for v in values]


def kl_rows(teacher_logits, student_logits):
    total = 0.0
    for t_row, s_row in zip(teacher_logits, student_logits):
        lp, lq = log_softmax(t_row), log_softmax(s_row)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    return total / len(teacher_logits)


def sims(a, b, scale):
    return [[scale * dot(x, y) for y in b] for x in a]


def transpose(m):
    return [list(col) for col in zip(*m)]


def ce_diagonal(logits):
    return sum(-log_softmax(row)[i] for i, row in enumerate(logits)) / len(logits)


def off_diag(m):
    return [[v for j, v in enumerate(row) if j != i] for i, row in enumerate(m)]


ICL_SCALE = math.log(1 / 0.07)  # CLIP-KD's cross_logit_scale: initialised to ln(1/0.07), multiplied as it is


def mse(a, b):
    """F.mse_loss: the mean over all N x D elements."""
    return sum(sum((x - y) ** 2 for x, y in zip(row_a, row_b)) for row_a, row_b in zip(a, b)) / (len(a) * len(a[0]))


def hand_clip_kd(s_i, s_t, t_i, t_t, s_scale, t_scale):
    """CLIP-KD's KDClipLoss (winycg/CLIP-KD src/open_clip/loss.py) written out: task, ckd (KL), fd, icl."""
    infonce = 0.5 * (ce_diagonal(sims(s_i, s_t, s_scale)) + ce_diagonal(sims(s_t, s_i, s_scale)))
    teacher, student = sims(t_i, t_t, t_scale), sims(s_i, s_t, s_scale)
    logit = 0.5 * (kl_rows(teacher, student) + kl_rows(transpose(teacher), transpose(student)))
    fd = mse(s_i, t_i) + mse(s_t, t_t)
    icl = 0.5 * (ce_diagonal(sims(s_i, t_t, ICL_SCALE)) + ce_diagonal(sims(s_t, t_i, ICL_SCALE)))
    intra = 0.5 * sum(
        kl_rows(off_diag(sims(t, t, t_scale)), off_diag(sims(s, s, s_scale))) for s, t in ((s_i, t_i), (s_t, t_t))
    )
    return {"infonce": infonce, "logit": logit, "fd": fd, "icl": icl, "intra": intra}


ALL_ON = ClipKDWeights(infonce=1.0, logit=1.0, fd=2.0, icl=1.0, intra=0.5, rkd=3.0)


def inputs(s_i, s_t, t_i, t_t, teacher_scale=TEACHER_SCALE):
    extra = {"teacher_image_features": t_i, "teacher_text_features": t_t}
    if teacher_scale is not None:
        extra["teacher_logit_scale"] = torch.tensor(teacher_scale, dtype=torch.float64)
    return LossInputs(image_features=s_i, text_features=s_t, teacher="none", separate_teachers=extra)


def test_clip_kd_terms_equal_hand_computation():
    assert not distributed.is_initialized()
    loss = CLIPKD(2, weights=ALL_ON).double()
    terms = loss(inputs(S_IMAGE, S_TEXT, T_IMAGE, T_TEXT))
    scale = float(loss.scale().detach())
    hand = hand_clip_kd(S_IMAGE.tolist(), S_TEXT.tolist(), T_IMAGE.tolist(), T_TEXT.tolist(), scale, TEACHER_SCALE)
    assert scale == pytest.approx(STUDENT_SCALE, rel=1e-6)
    assert terms["infonce_loss"].item() == pytest.approx(hand["infonce"], rel=1e-9)
    assert terms["clip_kd_logit_loss"].item() == pytest.approx(hand["logit"], rel=1e-9)
    assert terms["clip_kd_fd_loss"].item() == pytest.approx(2.0 * hand["fd"], rel=1e-9)
    assert terms["clip_kd_icl_loss"].item() == pytest.approx(hand["icl"], rel=1e-9)
    assert terms["clip_kd_intra_loss"].item() == pytest.approx(0.5 * hand["intra"], rel=1e-9)
    rkd = RKD(0.5, 1.0)
    rkd_image = sum(rkd(LossInputs(image_features=S_IMAGE, text_features=T_IMAGE)).values())
    rkd_text = sum(rkd(LossInputs(image_features=S_TEXT, text_features=T_TEXT)).values())
    assert terms["clip_kd_rkd_loss"].item() == pytest.approx(3.0 * 0.5 * (rkd_image + rkd_text).item(), rel=1e-9)


def test_clip_kd_uses_the_configured_teacher_temperature_without_a_teacher_logit_scale():
    loss = CLIPKD(2, (ClipTeacher(temperature=0.02),), ClipKDWeights(infonce=0, fd=0, icl=0)).double()
    terms = loss(inputs(S_IMAGE, S_TEXT, T_IMAGE, T_TEXT, teacher_scale=None))
    hand = hand_clip_kd(
        S_IMAGE.tolist(), S_TEXT.tolist(), T_IMAGE.tolist(), T_TEXT.tolist(), float(loss.scale().detach()), 50.0
    )
    assert set(terms) == {"clip_kd_logit_loss"}
    assert terms["clip_kd_logit_loss"].item() == pytest.approx(hand["logit"], rel=1e-9)


def test_clip_kd_distillation_terms_vanish_when_student_equals_teacher():
    loss = CLIPKD(2, weights=ALL_ON).double()
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(TEACHER_SCALE))
        loss.icl_scales["teacher"].fill_(TEACHER_SCALE)  # ICL's scale is a plain multiplier
    terms = loss(inputs(T_IMAGE, T_TEXT, T_IMAGE, T_TEXT))
    for name in ("clip_kd_logit_loss", "clip_kd_fd_loss", "clip_kd_intra_loss", "clip_kd_rkd_loss"):
        assert terms[name].item() == pytest.approx(0.0, abs=1e-12), name
    # interactive contrastive learning then is the teacher's own InfoNCE
    torch.testing.assert_close(terms["clip_kd_icl_loss"], terms["infonce_loss"])


def test_icl_has_its_own_learnable_scale_initialised_and_used_as_in_clip_kd():
    loss = CLIPKD(2, weights=ClipKDWeights(infonce=1.0, logit=0, fd=0, icl=1.0)).double()
    assert loss.icl_scales["teacher"].item() == pytest.approx(math.log(1 / 0.07), rel=1e-7)
    terms = loss(inputs(S_IMAGE.clone().requires_grad_(), S_TEXT, T_IMAGE, T_TEXT))
    terms["clip_kd_icl_loss"].backward()
    assert loss.icl_scales["teacher"].grad.abs() > 0
    assert loss.logit_scale.grad is None  # the student's InfoNCE scale does not serve ICL
    assert {name for name, _ in loss.named_parameters()} == {"logit_scale", "icl_scales.teacher"}


@pytest.mark.parametrize("teacher_dim", [3, 5])
def test_feature_distillation_default_is_clip_kds_2000_x_mse_for_any_teacher_width(teacher_dim):
    torch.manual_seed(0)
    loss = build_loss("CLIP-KD", LossOptions(clip_kd_teacher_dim=teacher_dim, w_clip_kd_logit=0, w_clip=0), 2)
    loss = loss.double()
    generator = torch.Generator().manual_seed(1)
    t_image = F.normalize(torch.randn(3, teacher_dim, generator=generator, dtype=torch.float64), dim=1)
    t_text = F.normalize(torch.randn(3, teacher_dim, generator=generator, dtype=torch.float64), dim=1)
    terms = loss(inputs(S_IMAGE, S_TEXT, t_image, t_text))

    def project(linear, rows):  # CLIP-KD: nn.Linear(s_dim, t_dim) (with bias), then F.normalize
        weight, bias = linear.weight.tolist(), linear.bias.tolist()
        out = [[sum(w * x for w, x in zip(w_row, row)) + b for w_row, b in zip(weight, bias)] for row in rows]
        return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in out]

    projected_image = project(loss.image_projections["clip"], S_IMAGE.tolist())
    projected_text = project(loss.text_projections["clip"], S_TEXT.tolist())
    clip_kd = 2000.0 * (mse(projected_image, t_image.tolist()) + mse(projected_text, t_text.tolist()))
    assert terms["clip_kd_fd_loss"].item() == pytest.approx(clip_kd, rel=1e-9)
    # the same, written as docs/method.md states it: 2000 / D_t x the mean squared L2 distance, summed over modalities
    squared = sum(
        sum(sum((a - b) ** 2 for a, b in zip(x, y)) for x, y in zip(s, t.tolist())) / 3
        for s, t in ((projected_image, t_image), (projected_text, t_text))
    )
    assert terms["clip_kd_fd_loss"].item() == pytest.approx(2000.0 / teacher_dim * squared, rel=1e-9)


def test_clip_kd_projects_a_narrower_student_into_the_teacher_space():
    loss = CLIPKD(2, (ClipTeacher(dim=3),), ClipKDWeights(infonce=0, logit=0, fd=1.0, icl=0)).double()
    projection = [[1.0, 0.0], [0.5, 1.0], [0.0, -2.0]]  # Linear(2 -> 3) weight [3, 2]
    bias = [0.1, -0.2, 0.3]
    with torch.no_grad():
        for projections in (loss.image_projections, loss.text_projections):
            projections["teacher"].weight.copy_(torch.tensor(projection))
            projections["teacher"].bias.copy_(torch.tensor(bias, dtype=torch.float64))
    t_image = unit_rows([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    t_text = unit_rows([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    student_image = S_IMAGE.clone().requires_grad_()
    teacher_image = t_image.clone().requires_grad_()
    terms = loss(inputs(student_image, S_TEXT, teacher_image, t_text))

    def project(rows):
        out = [[sum(w * x for w, x in zip(wrow, row)) + b for wrow, b in zip(projection, bias)] for row in rows]
        return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in out]

    expected = mse(project(S_IMAGE.tolist()), t_image.tolist()) + mse(project(S_TEXT.tolist()), t_text.tolist())
    assert terms["clip_kd_fd_loss"].item() == pytest.approx(expected, rel=1e-9)
    terms["clip_kd_fd_loss"].backward()
    assert student_image.grad.abs().sum() > 0
    assert loss.image_projections["teacher"].weight.grad.abs().sum() > 0
    assert teacher_image.grad is None


def test_clip_kd_sends_no_gradient_to_the_teacher_features():
    loss = build_loss("CLIP-KD", LossOptions(w_clip_kd_intra=1.0, w_clip_kd_rkd=1.0), 2).double()
    t_image = T_IMAGE.clone().requires_grad_()
    t_text = T_TEXT.clone().requires_grad_()
    s_image = S_IMAGE.clone().requires_grad_()
    terms = loss(inputs(s_image, S_TEXT, t_image, t_text))
    assert set(terms) == {
        "infonce_loss",
        "clip_kd_logit_loss",
        "clip_kd_fd_loss",
        "clip_kd_icl_loss",
        "clip_kd_intra_loss",
        "clip_kd_rkd_loss",
    }
    sum(terms.values()).backward()
    assert t_image.grad is None and t_text.grad is None
    assert s_image.grad.abs().sum() > 0


def test_clip_kd_combines_several_teachers_with_their_weights():
    first = ClipTeacher(name="big")
    second = ClipTeacher(name="small", image_key="small_image", text_key="small_text", weight=0.5)
    weights = ClipKDWeights(infonce=1.0, logit=1.0, fd=1.0, icl=1.0)
    loss = CLIPKD(2, (first, second), weights).double()
    extra = {
        "teacher_image_features": T_IMAGE,
        "teacher_text_features": T_TEXT,
        "small_image": T_TEXT,
        "small_text": T_IMAGE,
    }
    terms = loss(LossInputs(image_features=S_IMAGE, text_features=S_TEXT, teacher="none", separate_teachers=extra))
    single = CLIPKD(2, (ClipTeacher(image_key="small_image", text_key="small_text"),), weights).double()
    alone = single(LossInputs(image_features=S_IMAGE, text_features=S_TEXT, teacher="none", separate_teachers=extra))
    for name in ("clip_kd_logit_loss", "clip_kd_fd_loss", "clip_kd_icl_loss"):
        assert terms[f"{name}/small"].item() == pytest.approx(0.5 * alone[name].item(), rel=1e-9)
        assert f"{name}/big" in terms
    only_big = {"teacher_image_features": T_IMAGE, "teacher_text_features": T_TEXT}
    with pytest.raises(KeyError, match="small_image"):
        loss(LossInputs(image_features=S_IMAGE, text_features=S_TEXT, teacher="none", separate_teachers=only_big))
