import math

import pytest
import torch
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LossOptions, build_loss
from protorkd.losses.base import LossInputs

# 4 samples x 2 features (the losses L2-normalise rows first, so these are unit rows already)
STUDENT = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [-0.5, 0.5], [0.7, -0.7]], dtype=torch.float64), dim=1)
TEACHER = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.3], [0.9, -0.2]], dtype=torch.float64), dim=1)


def column(x, j):
    return [row[j] for row in x]


def mean(values):
    return sum(values) / len(values)


def hand_vicreg(a, b):
    n, d = len(a), len(a[0])
    invariance = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def var_cov(x):
        centred = [[x[i][j] - mean(column(x, j)) for j in range(d)] for i in range(n)]
        cov = [[sum(centred[i][p] * centred[i][q] for i in range(n)) / (n - 1) for q in range(d)] for p in range(d)]
        variance = mean([max(0.0, 1 - math.sqrt(cov[j][j] + 1e-4)) for j in range(d)])
        covariance = sum(cov[p][q] ** 2 for p in range(d) for q in range(d) if p != q) / d
        return variance, covariance

    var_a, cov_a = var_cov(a)
    var_b, cov_b = var_cov(b)
    return invariance, var_a / 2 + var_b / 2, cov_a + cov_b


def hand_barlow(a, b, lam):
    n, d = len(a), len(a[0])

    def standardise(x):
        out = [[0.0] * d for _ in range(n)]
        for j in range(d):
            m = mean(column(x, j))
            v = mean([(x[i][j] - m) ** 2 for i in range(n)])
            for i in range(n):
                out[i][j] = (x[i][j] - m) / math.sqrt(v + 1e-5)
        return out

    za, zb = standardise(a), standardise(b)
    c = [[sum(za[i][p] * zb[i][q] for i in range(n)) / n for q in range(d)] for p in range(d)]
    on = sum((c[j][j] - 1) ** 2 for j in range(d))
    off = sum(c[p][q] ** 2 for p in range(d) for q in range(d) if p != q)
    return on, lam * off


def test_vicreg_equals_hand_computation():
    assert not distributed.is_initialized()
    terms = build_loss("VICReg", LossOptions(), 2)(LossInputs(image_features=STUDENT, text_features=TEACHER))
    invariance, variance, covariance = hand_vicreg(STUDENT.tolist(), TEACHER.tolist())
    assert terms["vicreg_invariance_loss"].item() == pytest.approx(25 * invariance, rel=1e-9)
    assert terms["vicreg_variance_loss"].item() == pytest.approx(25 * variance, rel=1e-9)
    assert terms["vicreg_covariance_loss"].item() == pytest.approx(covariance, rel=1e-9)


def test_vicreg_when_student_equals_teacher_keeps_only_the_regularisers():
    terms = build_loss("VICReg", LossOptions(), 2)(LossInputs(image_features=TEACHER, text_features=TEACHER))
    _, variance, covariance = hand_vicreg(TEACHER.tolist(), TEACHER.tolist())
    assert terms["vicreg_invariance_loss"].item() == 0.0
    assert terms["vicreg_variance_loss"].item() == pytest.approx(25 * variance, rel=1e-9)
    assert terms["vicreg_covariance_loss"].item() == pytest.approx(covariance, rel=1e-9)


def test_barlow_twins_equals_hand_computation():
    terms = build_loss("BarlowTwins", LossOptions(), 2)(LossInputs(image_features=STUDENT, text_features=TEACHER))
    on, off = hand_barlow(STUDENT.tolist(), TEACHER.tolist(), 0.0051)
    assert terms["barlow_on_diagonal_loss"].item() == pytest.approx(on, rel=1e-9)
    assert terms["barlow_off_diagonal_loss"].item() == pytest.approx(off, rel=1e-9)


def test_barlow_twins_when_student_equals_teacher_is_the_self_correlation():
    terms = build_loss("BarlowTwins", LossOptions(), 2)(LossInputs(image_features=TEACHER, text_features=TEACHER))
    on, off = hand_barlow(TEACHER.tolist(), TEACHER.tolist(), 0.0051)
    assert terms["barlow_on_diagonal_loss"].item() == pytest.approx(on, rel=1e-9)
    assert on < 1e-8  # standardised features correlate perfectly with themselves (up to BatchNorm's eps)
    assert terms["barlow_off_diagonal_loss"].item() == pytest.approx(off, rel=1e-9)


@pytest.mark.parametrize("name", ["VICReg", "BarlowTwins"])
def test_redundancy_losses_send_no_gradient_to_a_locked_teacher_but_train_both_towers_otherwise(name):
    loss = build_loss(name, LossOptions(), 2)
    for teacher_mode, teacher_gets_gradient in (("text", False), ("none", True)):
        student = STUDENT.clone().requires_grad_()
        teacher = TEACHER.clone().requires_grad_()
        terms = loss(LossInputs(image_features=student, text_features=teacher, teacher=teacher_mode))
        sum(terms.values()).backward()
        assert student.grad.abs().sum() > 0
        got = teacher.grad is not None and bool(teacher.grad.abs().sum() > 0)
        assert got == teacher_gets_gradient
