import math

import pytest
import torch
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.losses.clip_kd import CLIP_KD_LOSS_WEIGHT_DECAY, CLIPKD, ClipKDWeights, ClipTeacher
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
    """The loss's inputs for unit student rows (so the unnormalised features are the rows themselves)."""
    extra = {"teacher_image_features": t_i, "teacher_text_features": t_t}
    if teacher_scale is not None:
        extra["teacher_logit_scale"] = torch.tensor(teacher_scale, dtype=torch.float64)
    return LossInputs(
        image_features=s_i,
        text_features=s_t,
        teacher="none",
        separate_teachers=extra,
        image_features_unnormalized=s_i,
        text_features_unnormalized=s_t,
    )


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


# --- CLIP-KD's own code at unequal widths -----------------------------------------------------------------


class ClipKDArgs:
    """The flags KDClipLoss reads: CLIP-KD's recommended CRD + ICL + FD (alpha_fd_loss 2000)."""

    def __init__(self, s_embed_dim, t_embed_dim):
        self.s_embed_dim, self.t_embed_dim = s_embed_dim, t_embed_dim
        self.alpha_ckd_loss, self.alpha_icl_loss, self.alpha_fd_loss = 1.0, 1.0, 2000.0
        self.alpha_cross_kd_loss = self.alpha_gd_loss = self.alpha_afd_loss = 0.0


class KDClipLoss(torch.nn.Module):
    """winycg/CLIP-KD src/open_clip/loss.py KDClipLoss (f3ae18b), transcribed for one process: its world_size > 1
    branch with the gathers as the identity (its single-process branch reads undefined names), no local loss,
    CE/ICL/CRD/FD (the gradient-distillation and AFD terms are off by default and left out)."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        if args.t_embed_dim != args.s_embed_dim:
            self.visual_proj = torch.nn.Linear(args.s_embed_dim, args.t_embed_dim)
            self.text_proj = torch.nn.Linear(args.s_embed_dim, args.t_embed_dim)
        self.cross_logit_scale = torch.nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.fusion_logit_scale = torch.nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    @staticmethod
    def kl_loss(y_s, y_t, T=1):  # DistillKL(T=1)
        p_s = F.log_softmax(y_s / T, dim=1)
        p_t = F.softmax(y_t / T, dim=1)
        return F.kl_div(p_s, p_t, reduction="batchmean") * (T**2)

    def forward(self, image_features, text_features, logit_scale, t_image_features, t_text_features, t_logit_scale):
        all_image_features, all_text_features = image_features, text_features
        t_all_image_features, t_all_text_features = t_image_features, t_text_features
        t_logits_per_image = t_logit_scale * t_all_image_features @ t_all_text_features.T
        t_logits_per_text = t_logits_per_image.T
        normalized_all_image_features = F.normalize(all_image_features, dim=1)
        normalized_all_text_features = F.normalize(all_text_features, dim=1)
        logits_per_image = logit_scale * normalized_all_image_features @ normalized_all_text_features.T
        logits_per_text = logits_per_image.T
        labels = torch.arange(logits_per_image.shape[0])
        if self.args.t_embed_dim != self.args.s_embed_dim:
            all_image_features = self.visual_proj(all_image_features)
            all_text_features = self.text_proj(all_text_features)
        normalized_all_image_features = F.normalize(all_image_features, dim=1)
        normalized_all_text_features = F.normalize(all_text_features, dim=1)
        fd_loss = F.mse_loss(normalized_all_image_features, t_all_image_features) + F.mse_loss(
            normalized_all_text_features, t_all_text_features
        )
        logits_per_s_image_to_t_text = self.cross_logit_scale * normalized_all_image_features @ t_all_text_features.T
        logits_per_s_text_to_t_image = self.cross_logit_scale * normalized_all_text_features @ t_all_image_features.T
        task_loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        icl_loss = (
            F.cross_entropy(logits_per_s_image_to_t_text, labels)
            + F.cross_entropy(logits_per_s_text_to_t_image, labels)
        ) / 2
        ckd_loss = (
            self.kl_loss(logits_per_image, t_logits_per_image.detach())
            + self.kl_loss(logits_per_text, t_logits_per_text.detach())
        ) / 2
        return (
            task_loss,
            self.args.alpha_ckd_loss * ckd_loss,
            self.args.alpha_icl_loss * icl_loss,
            (self.args.alpha_fd_loss * fd_loss),
        )


def test_clip_kd_at_unequal_widths_equals_clip_kds_code_in_value_and_gradients():
    """Student width 3, teacher width 5, student rows far from unit norm: CLIP-KD applies its projection to the
    unnormalised student features (loss.py:289-296, with model.py's forward(distill=True) returning them)."""
    student_dim, teacher_dim, n = 3, 5, 4
    generator = torch.Generator().manual_seed(0)
    raw_image = 3.0 * torch.randn(n, student_dim, generator=generator, dtype=torch.float64) + 1.0
    raw_text = 0.5 * torch.randn(n, student_dim, generator=generator, dtype=torch.float64) - 2.0
    t_image = F.normalize(torch.randn(n, teacher_dim, generator=generator, dtype=torch.float64), dim=1)
    t_text = F.normalize(torch.randn(n, teacher_dim, generator=generator, dtype=torch.float64), dim=1)
    torch.manual_seed(1)
    reference = KDClipLoss(ClipKDArgs(student_dim, teacher_dim)).double()
    ours = build_loss("CLIP-KD", LossOptions(clip_kd_teacher_dim=teacher_dim), student_dim).double()
    with torch.no_grad():
        ours.image_projections["clip"].load_state_dict(reference.visual_proj.state_dict())
        ours.text_projections["clip"].load_state_dict(reference.text_proj.state_dict())
        ours.icl_scales["clip"].copy_(reference.cross_logit_scale)
    logit_scale = torch.nn.Parameter(ours.logit_scale.detach().clone())  # CLIP-KD's model's, ln(1/0.07)

    leaves = [raw_image.clone().requires_grad_(), raw_text.clone().requires_grad_()]
    task, ckd, icl, fd = reference(*leaves, logit_scale.exp(), t_image, t_text, torch.tensor(TEACHER_SCALE))
    (task + ckd + icl + fd).backward()
    our_leaves = [raw_image.clone().requires_grad_(), raw_text.clone().requires_grad_()]
    terms = ours(
        LossInputs(
            image_features=F.normalize(our_leaves[0], dim=1),
            text_features=F.normalize(our_leaves[1], dim=1),
            teacher="none",
            separate_teachers={
                "teacher_image_features": t_image,
                "teacher_text_features": t_text,
                "teacher_logit_scale": torch.tensor(TEACHER_SCALE, dtype=torch.float64),
            },
            image_features_unnormalized=our_leaves[0],
            text_features_unnormalized=our_leaves[1],
        )
    )
    sum(terms.values()).backward()
    for name, value in (("infonce_loss", task), ("clip_kd_logit_loss", ckd), ("clip_kd_icl_loss", icl)):
        torch.testing.assert_close(terms[name], value, rtol=1e-10, atol=0), name
    torch.testing.assert_close(terms["clip_kd_fd_loss"], fd, rtol=1e-10, atol=0)
    for ours_leaf, reference_leaf in zip(our_leaves, leaves):
        torch.testing.assert_close(ours_leaf.grad, reference_leaf.grad, rtol=1e-9, atol=1e-12)
    for mine, theirs in (
        (ours.image_projections["clip"], reference.visual_proj),
        (ours.text_projections["clip"], reference.text_proj),
    ):
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mine.bias.grad, theirs.bias.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.icl_scales["clip"].grad, reference.cross_logit_scale.grad, rtol=1e-9, atol=0)
    torch.testing.assert_close(ours.logit_scale.grad, logit_scale.grad, rtol=1e-9, atol=0)


def test_clip_kd_projection_needs_the_unnormalised_features():
    loss = CLIPKD(2, (ClipTeacher(dim=3),)).double()
    t_rows = unit_rows([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    extra = {"teacher_image_features": t_rows, "teacher_text_features": t_rows}
    with pytest.raises(KeyError, match="image_features_unnormalized"):
        loss(LossInputs(image_features=S_IMAGE, text_features=S_TEXT, teacher="none", separate_teachers=extra))


def test_clip_kd_loss_parameters_take_clip_kds_weight_decay_in_the_optimizer():
    """CLIP-KD's main_kd.py: AdamW([{no-decay model params, wd 0}, {model params, --wd}, {"params":
    loss.parameters()}]): the last group takes AdamW's default decay; the student's logit scale (CLIP-KD's
    model's) none. Also inside a loss with auxiliary terms (--w-simcse)."""
    from protorkd.train.optim import REST, VISUAL, build_optimizer

    reference = KDClipLoss(ClipKDArgs(3, 5))
    clip_kd_groups = torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "weight_decay": 0.2}, {"params": reference.parameters()}]
    ).param_groups
    assert clip_kd_groups[-1]["weight_decay"] == CLIP_KD_LOSS_WEIGHT_DECAY == 0.01
    image_tower, model = torch.nn.Linear(4, 3), torch.nn.Linear(3, 3)
    for options in (LossOptions(clip_kd_teacher_dim=5), LossOptions(clip_kd_teacher_dim=5, w_simcse=0.5)):
        loss = build_loss("CLIP-KD", options, 3)
        clip_kd = loss.main if hasattr(loss, "main") else loss
        roles = {VISUAL: [image_tower], REST: [model, loss]}
        optimizer = build_optimizer(roles, lr=1.0, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
        decay = {id(p): (g["role"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
        for name, parameter in clip_kd.named_parameters():
            expected = 0.0 if name == "logit_scale" else 0.01
            assert decay[id(parameter)] == (REST, expected), name
        assert decay[id(model.weight)] == (REST, 0.2) and decay[id(image_tower.weight)] == (VISUAL, 0.2)
        assert decay[id(model.bias)] == (REST, 0.0)
        assert len(decay) == sum(1 for m in (image_tower, model, loss) for _ in m.parameters())
