import math

import pytest
import torch
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.losses.relational import RKD, rkd_angle_loss, rkd_distance_loss


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def hand_rkd(student: list[list[float]], teacher: list[list[float]]) -> tuple[float, float]:
    """Park et al.'s distance and angle losses written out with loops."""
    n = len(student)

    def distances(x):
        d = [[math.dist(x[i], x[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def unit(a, b):
        diff = [bi - ai for ai, bi in zip(a, b)]
        norm = math.sqrt(sum(v * v for v in diff))
        return [v / norm for v in diff] if norm > 0 else [0.0] * len(diff)

    def angles(x):
        return [
            [[sum(p * q for p, q in zip(unit(x[a], x[b]), unit(x[a], x[c]))) for c in range(n)] for b in range(n)]
            for a in range(n)
        ]

    ds, dt = distances(student), distances(teacher)
    distance = sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    a_s, a_t = angles(student), angles(teacher)
    angle = sum(huber(a_s[a][b][c] - a_t[a][b][c]) for a in range(n) for b in range(n) for c in range(n)) / n**3
    return distance, angle


def unit_rows(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


STUDENT = unit_rows([[1.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.3, -0.4, 1.0], [-1.0, 0.1, 0.2]])
TEACHER = unit_rows([[0.9, 0.1, 0.0], [0.0, 1.0, 0.3], [-0.2, 0.1, 1.0], [0.5, -1.0, 0.4]])


def test_rkd_equals_hand_computation_on_4x3():
    assert not distributed.is_initialized()
    loss = RKD(distance_weight=0.5, angle_weight=1.0)
    terms = loss(LossInputs(image_features=STUDENT, text_features=TEACHER, teacher="text"))
    distance, angle = hand_rkd(STUDENT.tolist(), TEACHER.tolist())
    assert terms["rkd_distance_loss"].item() == pytest.approx(0.5 * distance, rel=1e-9)
    assert terms["rkd_angle_loss"].item() == pytest.approx(angle, rel=1e-9)


def test_rkd_is_zero_when_student_equals_teacher():
    terms = RKD()(LossInputs(image_features=STUDENT.clone(), text_features=STUDENT.clone(), teacher="text"))
    assert terms["rkd_distance_loss"].item() == pytest.approx(0.0, abs=1e-12)
    assert terms["rkd_angle_loss"].item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_sends_no_gradient_to_the_teacher():
    student = STUDENT.clone().requires_grad_()
    teacher = TEACHER.clone().requires_grad_()
    terms = build_loss("RKD", LossOptions(), 3)(
        LossInputs(image_features=student, text_features=teacher, teacher="text")
    )
    sum(terms.values()).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None or torch.all(teacher.grad == 0)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_rkd_angle_chunked_equals_unchunked_values_and_gradients(chunk):
    torch.manual_seed(0)
    student = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    teacher = F.normalize(torch.randn(7, 6, dtype=torch.float64), dim=1)
    whole_input = student.clone().requires_grad_()
    whole = rkd_angle_loss(whole_input, teacher, chunk=7)
    whole.backward()
    chunked_input = student.clone().requires_grad_()
    chunked = rkd_angle_loss(chunked_input, teacher, chunk=chunk)
    chunked.backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked_input.grad, whole_input.grad, rtol=1e-10, atol=1e-14)


def test_rkd_angle_gradient_matches_finite_differences():
    torch.manual_seed(1)
    student = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1).requires_grad_()
    teacher = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    assert torch.autograd.gradcheck(lambda s: rkd_angle_loss(s, teacher, chunk=2), (student,))
    assert torch.autograd.gradcheck(lambda s: rkd_distance_loss(s, teacher), (student,))
