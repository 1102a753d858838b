import math

import pytest
import torch
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.losses.relational import ANGLE_EPS, RKD, rkd_angle_loss, rkd_distance_loss


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


# --- the original code, and near-duplicate rows ---------------------------------------------------------------


def itra_rkd(teacher_feature, student_feature, w_rkd_d=0.5, w_rkd_a=1.0, normalize_eps=1e-12):
    """ITRA's `itra/loss/RKD.py` RKD.forward (ProtoRKD's distiller; Park et al.'s RkdDistance / RKdAngle after
    an L2 normalisation), transcribed; `normalize_eps` (a float, or a (teacher, student) pair) is the eps of
    the angle term's F.normalize, 1e-12 in the original."""

    def pdist(e, eps=1e-12):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
        res = res.sqrt()
        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    teacher_eps, student_eps = normalize_eps if isinstance(normalize_eps, tuple) else (normalize_eps,) * 2
    teacher_feature = F.normalize(teacher_feature, dim=1)
    student_feature = F.normalize(student_feature, dim=1)
    t_d = pdist(teacher_feature)
    mean_td = t_d[t_d > 0].mean()
    t_d = t_d / mean_td
    d = pdist(student_feature)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    loss_distance = F.smooth_l1_loss(d, t_d)
    td = teacher_feature.unsqueeze(0) - teacher_feature.unsqueeze(1)
    norm_td = F.normalize(td, p=2, dim=2, eps=teacher_eps)
    t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student_feature.unsqueeze(0) - student_feature.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2, eps=student_eps)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_angle = F.smooth_l1_loss(s_angle, t_angle)
    return w_rkd_d * loss_distance, w_rkd_a * loss_angle


def near_duplicate_batch(delta: float, n: int = 8, dim: int = 64, dtype=torch.float64):
    """Random unit rows (student, teacher) whose student rows 0 and 1 are `delta` apart (0: identical)."""
    generator = torch.Generator().manual_seed(0)
    student = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)
    direction = F.normalize(torch.randn(dim, generator=generator, dtype=torch.float64), dim=0)
    student[1] = F.normalize(student[0] + delta * direction, dim=0)
    teacher = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)
    return student.to(dtype), teacher.to(dtype)


def ours_and_grad(student, teacher):
    leaf = student.clone().requires_grad_()
    terms = RKD()(LossInputs(image_features=leaf, text_features=teacher, teacher="text"))
    (terms["rkd_distance_loss"] + terms["rkd_angle_loss"]).backward()
    return terms, leaf.grad


def mean_distance(rows: torch.Tensor) -> float:
    rows = F.normalize(rows, dim=1)
    n = len(rows)
    return float(torch.cdist(rows, rows).sum() / (n * (n - 1)))


def test_rkd_equals_the_original_code_on_well_separated_rows():
    """Values and gradients of ITRA's code, for rows farther apart than ANGLE_EPS x the mean distance."""
    student, teacher = near_duplicate_batch(0.3, n=9, dim=6)
    distances = torch.cdist(student, student) + torch.eye(9)
    assert distances.min() > ANGLE_EPS * mean_distance(student)  # the premise: no pair inside the floor
    terms, grad = ours_and_grad(student, teacher)
    leaf = student.clone().requires_grad_()
    distance, angle = itra_rkd(teacher, leaf)
    (distance + angle).backward()
    torch.testing.assert_close(terms["rkd_distance_loss"], distance, rtol=1e-10, atol=0)
    torch.testing.assert_close(terms["rkd_angle_loss"], angle, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("delta", [1e-4, 1e-6, 0.0])
def test_rkd_angle_on_near_duplicate_rows_is_the_original_with_an_eps_of_angle_eps_times_the_mean_distance(delta):
    """Rows `delta` apart: the original's F.normalize with eps = ANGLE_EPS x each side's mean distance
    (values and gradients), where the original's own eps (1e-12) gives gradients of 1/delta."""
    student, teacher = near_duplicate_batch(delta)
    terms, grad = ours_and_grad(student, teacher)
    eps = (ANGLE_EPS * mean_distance(teacher), ANGLE_EPS * mean_distance(student))
    leaf = student.clone().requires_grad_()
    distance, angle = itra_rkd(teacher, leaf, normalize_eps=eps)
    (distance + angle).backward()
    torch.testing.assert_close(terms["rkd_angle_loss"], angle, rtol=1e-9, atol=0)
    torch.testing.assert_close(terms["rkd_distance_loss"], distance, rtol=1e-9, atol=0)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-6, atol=1e-9)
    original_leaf = student.clone().requires_grad_()
    sum(itra_rkd(teacher, original_leaf)).backward()
    if delta:  # the original's gradient norm grows as 1/delta: about 2e-3 / delta here (21 at 1e-4)
        assert original_leaf.grad.norm() > 1e-3 / delta > 100 * grad.norm()


def test_rkd_angle_with_a_duplicated_row_equals_the_hand_computation():
    """An exact duplicate (student rows 0 and 1 equal): every difference between them is the zero vector,
    whose angle Park et al.'s code and the hand computation set to 0; the gradient stays finite."""
    student, teacher = near_duplicate_batch(0.0, n=5, dim=4)
    terms, grad = ours_and_grad(student, teacher)
    distance, angle = hand_rkd(student.tolist(), teacher.tolist())
    assert terms["rkd_angle_loss"].item() == pytest.approx(angle, rel=1e-9)
    # the duplicate pair's distance is 1e-6, not 0: the squared distance is clamped at 1e-12 (as the original's)
    assert terms["rkd_distance_loss"].item() == pytest.approx(0.5 * distance, rel=1e-6)
    assert torch.isfinite(grad).all()


def test_rkd_angle_in_float32_on_near_duplicate_rows_equals_the_float64_value():
    """The issue's case (N = 8, D = 64, rows 1e-4 apart gave an angle loss of 466 and a gradient norm of 1.1e6 in
    float32): float32 now gives the float64 value and gradient."""
    student64, teacher64 = near_duplicate_batch(1e-4)
    results = []
    for student, teacher in ((student64, teacher64), (student64.float(), teacher64.float())):
        leaf = student.clone().requires_grad_()
        loss = rkd_angle_loss(leaf, teacher)
        loss.backward()
        results.append((loss.double(), leaf.grad.double()))
    (value64, grad64), (value32, grad32) = results
    torch.testing.assert_close(value32, value64, rtol=1e-3, atol=0)  # 2e-4 measured
    assert (grad32 - grad64).norm() < 1e-3 * grad64.norm()
