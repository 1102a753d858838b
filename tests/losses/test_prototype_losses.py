import math

import pytest
import torch
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.losses.prototype import DINO, ProtoCPC, ProtoRKD

PROTOTYPES = [[2.0, 0.0], [0.0, 0.5], [1.0, -1.0]]  # not unit rows: the layer normalises them
STEPS = [
    ([[1.0, 0.2], [0.1, 1.0], [-0.5, 0.5]], [[0.8, 0.6], [0.0, 1.0], [-1.0, 0.3]]),
    ([[0.6, -0.8], [1.0, 1.0], [0.3, 0.1]], [[0.5, -0.5], [0.9, 1.0], [0.2, 0.4]]),
]


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def logits(x):
    return [[sum(a * b for a, b in zip(unit(row), unit(p))) for p in PROTOTYPES] for row in x]


def softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def log_softmax(values):
    top = max(values)
    log_z = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_z for v in values]


def hand_dino(steps, teacher_temperature=0.04, student_temperature=0.1, momentum=0.9):
    center = [0.0] * len(PROTOTYPES)
    values = []
    for student, teacher in steps:
        ls, lt = logits(student), logits(teacher)
        loss = 0.0
        for s_row, t_row in zip(ls, lt):
            p = softmax([(t - c) / teacher_temperature for t, c in zip(t_row, center)])
            q = log_softmax([s / student_temperature for s in s_row])
            loss += -sum(a * b for a, b in zip(p, q))
        values.append(loss / len(ls))
        batch_mean = [sum(col) / len(lt) for col in zip(*lt)]
        center = [momentum * c + (1 - momentum) * m for c, m in zip(center, batch_mean)]
    return values, center


def hand_protocpc(steps, teacher_temperature=0.04, student_temperature=0.1, momentum=0.9):
    k = len(PROTOTYPES)
    prior = [1.0 / k] * k
    values = []
    for student, teacher in steps:
        ls, lt = logits(student), logits(teacher)
        loss = 0.0
        qs = []
        for s_row, t_row in zip(ls, lt):
            q = softmax([t / teacher_temperature for t in t_row])
            qs.append(q)
            s = [v / student_temperature for v in s_row]
            shifted = [v + math.log(p) for v, p in zip(s, prior)]
            top = max(shifted)
            loss += -sum(a * b for a, b in zip(q, s)) + top + math.log(sum(math.exp(v - top) for v in shifted))
        values.append(loss / len(ls))
        batch_mean = [sum(col) / len(qs) for col in zip(*qs)]
        prior = [momentum * p + (1 - momentum) * m for p, m in zip(prior, batch_mean)]
    return values, prior


def run(loss, steps, teacher="text"):
    with torch.no_grad():
        loss.prototypes.weight.copy_(torch.tensor(PROTOTYPES, dtype=loss.prototypes.weight.dtype))
    values = []
    for student, teacher_rows in steps:
        inputs = LossInputs(
            image_features=F.normalize(torch.tensor(student, dtype=torch.float64), dim=1),
            text_features=F.normalize(torch.tensor(teacher_rows, dtype=torch.float64), dim=1),
            teacher=teacher,
        )
        values.append(loss(inputs)["distill_loss"].item())
    return values


@pytest.mark.parametrize("cls", [DINO, ProtoRKD])
def test_dino_and_protorkd_equal_hand_computation_over_two_steps(cls):
    assert not distributed.is_initialized()
    loss = cls(2, n_prototypes=3).double()
    values = run(loss, STEPS)
    expected, center = hand_dino(STEPS)
    assert values == pytest.approx(expected, rel=1e-9)
    assert loss.center.flatten().tolist() == pytest.approx(center, rel=1e-9)


def test_protocpc_equals_hand_computation_over_two_steps():
    loss = ProtoCPC(2, n_prototypes=3).double()
    values = run(loss, STEPS)
    expected, prior = hand_protocpc(STEPS)
    # the uniform prior starts as float32 1/3 before .double(): hence 1e-6, not 1e-9
    assert values == pytest.approx(expected, rel=1e-6)
    assert loss.prior.tolist() == pytest.approx(prior, rel=1e-6)


@pytest.mark.parametrize("cls", [DINO, ProtoRKD, ProtoCPC])
def test_prototype_losses_when_student_equals_teacher_have_the_known_value(cls):
    same = [(STEPS[0][1], STEPS[0][1])]
    loss = cls(2, n_prototypes=3).double()
    value = run(loss, same)[0]
    expected = (hand_protocpc if cls is ProtoCPC else hand_dino)(same)[0][0]
    assert value == pytest.approx(expected, rel=1e-6)
    assert abs(value) > 1e-3  # different temperatures on the two sides: not a zero of the loss


@pytest.mark.parametrize("name", ["DINO", "ProtoCPC", "ProtoRKD"])
def test_prototypes_are_shared_and_learnt_only_through_the_student(name):
    loss = build_loss(name, LossOptions(n_prototypes=5), 2).double()
    student = F.normalize(torch.tensor(STEPS[0][0], dtype=torch.float64), dim=1).requires_grad_()
    teacher = F.normalize(torch.tensor(STEPS[0][1], dtype=torch.float64), dim=1).requires_grad_()
    terms = loss(LossInputs(image_features=student, text_features=teacher, teacher="text"))
    sum(terms.values()).backward()
    assert teacher.grad is None or torch.all(teacher.grad == 0)
    assert student.grad.abs().sum() > 0
    assert loss.prototypes.weight.grad.abs().sum() > 0
    assert [n for n, _ in loss.named_parameters()] == ["prototypes.weight"]
    # the teacher side reads the current prototypes: changing them changes the teacher logits
    before = loss.prototypes.teacher_logits(teacher).clone()
    with torch.no_grad():
        loss.prototypes.weight.mul_(-1)
    torch.testing.assert_close(loss.prototypes.teacher_logits(teacher), -before)


def test_prototypes_are_identical_on_every_rank_without_a_broadcast():
    first = build_loss("ProtoRKD", LossOptions(n_prototypes=8), 4)
    torch.manual_seed(123)  # the global RNG does not matter
    second = build_loss("ProtoRKD", LossOptions(n_prototypes=8), 4)
    torch.testing.assert_close(first.prototypes.weight, second.prototypes.weight)


def test_protorkd_logs_its_relation_diagnostics():
    loss = ProtoRKD(2, n_prototypes=3).double()
    run(loss, STEPS[:1])
    logged = loss.log_values()
    assert set(logged) == {"protorkd/teacher_entropy", "protorkd/prototypes_used", "protorkd/assignment_agreement"}
    assert 1 <= logged["protorkd/prototypes_used"] <= 3
