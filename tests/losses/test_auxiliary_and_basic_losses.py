"""InfoNCE, SimReg and the auxiliary terms (SimCSE, BYOL) against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LossOptions, build_loss
from protorkd.losses.auxiliary import BYOL, LossWithAuxiliaries, SimCSE
from protorkd.losses.base import LossInputs

A = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [-0.5, 0.5]], dtype=torch.float64), dim=1)
B = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.3]], dtype=torch.float64), dim=1)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def hand_symmetric_infonce(a, b, scale):
    n = len(a)
    total = 0.0
    for rows, cols in ((a, b), (b, a)):
        for i in range(n):
            logits = [scale * dot(rows[i], cols[j]) for j in range(n)]
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return total / (2 * n)


def test_infonce_equals_hand_computation_and_its_value_for_identical_towers():
    assert not distributed.is_initialized()
    loss = build_loss("InfoNCE", LossOptions(temperature=0.1), 2).double()
    value = loss(LossInputs(image_features=A, text_features=B, teacher="none"))["infonce_loss"].item()
    # the log-scale parameter starts in float32: rel 1e-6
    assert value == pytest.approx(hand_symmetric_infonce(A.tolist(), B.tolist(), 10.0), rel=1e-6)
    same = loss(LossInputs(image_features=A, text_features=A, teacher="none"))["infonce_loss"].item()
    assert same == pytest.approx(hand_symmetric_infonce(A.tolist(), A.tolist(), 10.0), rel=1e-6)


def hand_mixed_infonce(a, b, scale, lam):
    """Images a[i] = lam x_i + (1 - lam) x_(n-1-i): every row, image or caption, targets lam on its own pair and
    1 - lam on its mirror's (the reversal is its own inverse, so both directions have the same targets)."""
    n = len(a)
    total = 0.0
    for rows, cols in ((a, b), (b, a)):
        for i in range(n):
            logits = [scale * dot(rows[i], cols[j]) for j in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            mirror = n - 1 - i
            if mirror == i:
                total += -(logits[i] - log_z)
            else:
                total += -(lam * (logits[i] - log_z) + (1 - lam) * (logits[mirror] - log_z))
    return total / (2 * n)


@pytest.mark.parametrize("local_loss", [False, True])
def test_infonce_with_mixed_images_equals_hand_computation_and_lam_1_is_plain_infonce(local_loss):
    loss = build_loss("InfoNCE", LossOptions(temperature=0.1, local_loss=local_loss), 2).double()
    lams = torch.full((3,), 0.7, dtype=torch.float64)
    value = loss(LossInputs(image_features=A, text_features=B, teacher="none", mixup_lams=lams))["infonce_loss"]
    assert value.item() == pytest.approx(hand_mixed_infonce(A.tolist(), B.tolist(), 10.0, 0.7), rel=1e-6)
    assert value.item() != pytest.approx(hand_symmetric_infonce(A.tolist(), B.tolist(), 10.0), rel=1e-3)
    unmixed = loss(LossInputs(image_features=A, text_features=B, teacher="none", mixup_lams=torch.ones(3)))
    plain = loss(LossInputs(image_features=A, text_features=B, teacher="none"))
    torch.testing.assert_close(unmixed["infonce_loss"], plain["infonce_loss"])


def test_only_losses_whose_targets_are_the_pairing_accept_mixed_images():
    def accepts(name, **options):
        return build_loss(name, LossOptions(**options), 4).needs.accepts_mixup

    assert accepts("InfoNCE") and accepts("InfoNCE", w_simcse=0.5)
    assert not accepts("RKD") and not accepts("InfoNCE", byol=True) and not accepts("ProtoCLIP")
    assert not accepts("InfoNCE+RKD") and accepts("InfoNCE+InfoNCE")


@pytest.mark.parametrize(
    "name, penalty",
    [
        ("SimReg", lambda d: d * d),
        ("SimReg-L1", abs),
        ("SimReg-SmoothL1", lambda d: 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5),
    ],
)
def test_simreg_family_equals_hand_computation_and_is_zero_for_identical_features(name, penalty):
    loss = build_loss(name, LossOptions(), 2)
    student = A.clone().requires_grad_()
    teacher = B.clone().requires_grad_()
    value = loss(LossInputs(image_features=student, text_features=teacher, teacher="text"))["distill_loss"]
    expected = sum(penalty(s - t) for rs, rt in zip(A.tolist(), B.tolist()) for s, t in zip(rs, rt)) / 6
    assert value.item() == pytest.approx(expected, rel=1e-9)
    value.backward()
    assert teacher.grad is None or torch.all(teacher.grad == 0)
    zero = loss(LossInputs(image_features=B, text_features=B, teacher="text"))["distill_loss"]
    assert zero.item() == 0.0


def test_simcse_is_infonce_between_two_dropout_passes_at_scale_20():
    value = SimCSE(weight=0.5)(LossInputs(image_features=B, text_features=A, text_features_dropout=B))
    assert value["simcse_loss"].item() == pytest.approx(0.5 * hand_symmetric_infonce(A.tolist(), B.tolist(), 20.0))
    same = SimCSE()(LossInputs(image_features=B, text_features=A, text_features_dropout=A))
    assert same["simcse_loss"].item() == pytest.approx(hand_symmetric_infonce(A.tolist(), A.tolist(), 20.0))


def test_byol_regresses_the_second_view_onto_the_detached_first_view():
    view1 = A.clone().requires_grad_()
    view2 = B.clone().requires_grad_()
    value = BYOL()(LossInputs(image_features=view1, text_features=A, image_features_view2=view2))
    expected = sum((b - a) ** 2 for ra, rb in zip(A.tolist(), B.tolist()) for a, b in zip(ra, rb)) / 6
    assert value["byol_loss"].item() == pytest.approx(expected, rel=1e-9)
    value["byol_loss"].backward()
    assert view1.grad is None and view2.grad.abs().sum() > 0  # the first view is the (detached) target
    same = BYOL()(LossInputs(image_features=A, text_features=A, image_features_view2=A))
    assert same["byol_loss"].item() == 0.0


def test_build_loss_adds_enabled_auxiliary_terms_to_any_loss():
    plain = build_loss("RKD", LossOptions(), 2)
    assert not isinstance(plain, LossWithAuxiliaries)
    combined = build_loss("RKD", LossOptions(w_simcse=0.3, byol=True, w_byol=2.0), 2)
    assert isinstance(combined, LossWithAuxiliaries)
    views = {"text_features_dropout": B, "image_features_view2": B}
    terms = combined(LossInputs(image_features=A, text_features=A, teacher="none", **views))
    assert set(terms) == {"rkd_distance_loss", "rkd_angle_loss", "simcse_loss", "byol_loss"}
    assert terms["simcse_loss"].item() == pytest.approx(0.3 * hand_symmetric_infonce(A.tolist(), B.tolist(), 20.0))


def test_auxiliary_terms_name_the_missing_extra_key():
    with pytest.raises(KeyError, match="text_features_dropout"):
        SimCSE()(LossInputs(image_features=A, text_features=A))
