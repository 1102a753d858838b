"""`--loss A+B --loss-weights wA,wB`: the weighted sum of registered losses, term by term."""

from __future__ import annotations

import pytest
import torch

from protorkd.errors import UsageError
from protorkd.losses import LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.losses.combined import WeightedLossSum, parse_loss_weights, split_loss_name
from tests.losses.test_auxiliary_and_basic_losses import hand_symmetric_infonce
from tests.losses.test_relational_loss import STUDENT, TEACHER, hand_rkd


def test_infonce_plus_half_rkd_equals_the_hand_computed_terms_weighted():
    options = LossOptions(loss="InfoNCE+RKD", loss_weights="1,0.5", temperature=0.1, w_rkd_d=1.0, w_rkd_a=2.0)
    loss = build_loss(options.loss, options, 3).double()
    assert isinstance(loss, WeightedLossSum)
    terms = loss(LossInputs(image_features=STUDENT, text_features=TEACHER, teacher="text"))
    distance, angle = hand_rkd(STUDENT.tolist(), TEACHER.tolist())
    infonce = hand_symmetric_infonce(STUDENT.tolist(), TEACHER.tolist(), 10.0)
    assert set(terms) == {"infonce/infonce_loss", "rkd/rkd_distance_loss", "rkd/rkd_angle_loss"}
    assert terms["infonce/infonce_loss"].item() == pytest.approx(infonce, rel=1e-6)
    assert terms["rkd/rkd_distance_loss"].item() == pytest.approx(0.5 * 1.0 * distance, rel=1e-9)
    assert terms["rkd/rkd_angle_loss"].item() == pytest.approx(0.5 * 2.0 * angle, rel=1e-9)


def test_the_sum_owns_each_components_parameters_and_buffers():
    options = LossOptions(loss="InfoNCE+ProtoRKD", n_prototypes=8)
    loss = build_loss(options.loss, options, 4)
    names = {name for name, _ in loss.named_parameters()}
    assert any(name.startswith("components.0.") for name in names)  # InfoNCE's learnable temperature
    assert any(name.startswith("components.1.") for name in names)  # ProtoRKD's prototypes are trained too
    assert any(name.startswith("components.1.") for name in loss.state_dict())


def test_names_are_case_insensitive_and_canonical_in_the_term_keys():
    loss = build_loss("infonce+simreg", LossOptions(), 3)
    terms = loss(LossInputs(image_features=STUDENT.float(), text_features=TEACHER.float(), teacher="text"))
    assert set(terms) == {"infonce/infonce_loss", "simreg/distill_loss"}


@pytest.mark.parametrize(
    "text, count, message",
    [
        ("1,x", 2, "not a comma-separated list of numbers"),
        ("1", 2, "1 weights for the 2 losses"),
        ("1,-0.5", 2, "every weight must be a finite number >= 0"),
        ("1,inf", 2, "every weight must be a finite number >= 0"),
    ],
)
def test_bad_weights_are_one_clear_error(text, count, message):
    with pytest.raises(UsageError, match=message):
        parse_loss_weights(text, count, "InfoNCE+RKD")


def test_weights_default_to_one_each_and_names_split_on_plus():
    assert parse_loss_weights("", 3, "A+B+C") == [1.0, 1.0, 1.0]
    assert split_loss_name("InfoNCE + RKD") == ["InfoNCE", "RKD"]
    with pytest.raises(UsageError, match="an empty name in the sum"):
        split_loss_name("InfoNCE+")


def test_an_unknown_component_lists_the_valid_names():
    with pytest.raises(UsageError, match="RKDD"):
        build_loss("InfoNCE+RKDD", LossOptions(), 3)


def test_weights_without_a_sum_are_refused():
    with pytest.raises(UsageError, match="--loss-weights needs a sum"):
        build_loss("InfoNCE", LossOptions(loss_weights="1,2"), 3)


def test_two_clustering_losses_cannot_be_summed():
    with pytest.raises(UsageError, match="at most one of the summed losses may use clusters"):
        build_loss("ProtoCLIP+ProtoCLIP", LossOptions(), 4)


def test_zero_weight_leaves_the_other_loss_alone_in_the_gradient():
    torch.manual_seed(0)
    student = torch.nn.functional.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    teacher = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    alone = build_loss("RKD", LossOptions(), 4)
    summed = build_loss("InfoNCE+RKD", LossOptions(loss_weights="0,1"), 4)
    (gradient_alone,) = torch.autograd.grad(sum(alone(LossInputs(student, teacher)).values()), student)
    (gradient_sum,) = torch.autograd.grad(sum(summed(LossInputs(student, teacher)).values()), student)
    assert torch.equal(gradient_alone, gradient_sum)
