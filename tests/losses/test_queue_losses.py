import math

import pytest
import torch
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses import LossOptions, build_loss
from protorkd.losses.base import LossInputs
from protorkd.losses.queue import SEED, CompRess, FeatureQueue


def unit_rows(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


STEP1_STUDENT = unit_rows([[1.0, 0.2], [0.1, 1.0], [-0.5, 0.5]])
STEP1_TEACHER = unit_rows([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.3]])
STEP2_STUDENT = unit_rows([[0.6, -0.8], [1.0, 1.0], [0.3, 0.1]])
STEP2_TEACHER = unit_rows([[0.5, -0.5], [0.9, 1.0], [0.2, 0.4]])


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def hand_kl(teacher_rows, student_rows, teacher_memory, student_memory, temperature) -> float:
    total = 0.0
    for t, s in zip(teacher_rows, student_rows):
        p = softmax([dot(t, q) / temperature for q in teacher_memory])
        r = softmax([dot(s, q) / temperature for q in student_memory])
        total += sum(pi * (math.log(pi) - math.log(ri)) for pi, ri in zip(p, r))
    return total / len(teacher_rows)


def run_two_steps(loss, first=(STEP1_STUDENT, STEP1_TEACHER), second=(STEP2_STUDENT, STEP2_TEACHER)):
    values = []
    for student, teacher in (first, second):
        terms = loss(LossInputs(image_features=student, text_features=teacher, teacher="text"))
        values.append(terms["distill_loss"].item())
    return values


def test_feature_queue_is_fifo_and_wraps_around():
    queue = FeatureQueue(size=4, dim=1)
    queue.push(torch.tensor([[1.0], [2.0], [3.0]]))
    assert queue.filled().flatten().tolist() == [1.0, 2.0, 3.0]
    queue.push(torch.tensor([[4.0], [5.0]]))
    assert sorted(queue.filled().flatten().tolist()) == [2.0, 3.0, 4.0, 5.0]
    queue.push(torch.arange(10.0, 16.0).unsqueeze(1))  # more rows than the queue holds: the last four stay
    assert sorted(queue.filled().flatten().tolist()) == [12.0, 13.0, 14.0, 15.0]


def test_compress_1q_equals_hand_computation():
    assert not distributed.is_initialized()
    loss = CompRess(2, queue_size=8, temperature=0.04, two_queues=False).double()
    first, second = run_two_steps(loss)
    assert first == 0.0  # nothing in the queue yet
    expected = hand_kl(
        STEP2_TEACHER.tolist(), STEP2_STUDENT.tolist(), STEP1_TEACHER.tolist(), STEP1_TEACHER.tolist(), 0.04
    )
    assert second == pytest.approx(expected, rel=1e-9)


def test_compress_2q_equals_hand_computation():
    loss = CompRess(2, queue_size=8, temperature=0.04, two_queues=True).double()
    _, second = run_two_steps(loss)
    expected = hand_kl(
        STEP2_TEACHER.tolist(), STEP2_STUDENT.tolist(), STEP1_TEACHER.tolist(), STEP1_STUDENT.tolist(), 0.04
    )
    assert second == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("two_queues", [False, True])
def test_compress_is_zero_when_student_equals_teacher(two_queues):
    loss = CompRess(2, queue_size=8, temperature=0.04, two_queues=two_queues).double()
    values = run_two_steps(loss, (STEP1_TEACHER, STEP1_TEACHER), (STEP2_TEACHER, STEP2_TEACHER))
    assert values == pytest.approx([0.0, 0.0], abs=1e-12)


def hand_seed(student_rows, teacher_rows, memory, student_temperature, teacher_temperature) -> float:
    total = 0.0
    for s, t in zip(student_rows, teacher_rows):
        target = softmax([dot(t, t) / teacher_temperature] + [dot(t, q) / teacher_temperature for q in memory])
        logits = [dot(s, t) / student_temperature] + [dot(s, q) / student_temperature for q in memory]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        total += -sum(p * (v - log_z) for p, v in zip(target, logits))
    return total / len(student_rows)


def test_seed_equals_hand_computation():
    loss = SEED(2, queue_size=8, student_temperature=0.07, teacher_temperature=1e-4).double()
    first, second = run_two_steps(loss)
    assert first == pytest.approx(0.0, abs=1e-12)  # a single (positive) logit: nothing to distil
    expected = hand_seed(STEP2_STUDENT.tolist(), STEP2_TEACHER.tolist(), STEP1_TEACHER.tolist(), 0.07, 1e-4)
    assert second == pytest.approx(expected, rel=1e-9)


def test_seed_when_student_equals_teacher_is_the_positive_pair_cross_entropy():
    loss = SEED(2, queue_size=8).double()
    _, second = run_two_steps(loss, (STEP1_TEACHER, STEP1_TEACHER), (STEP2_TEACHER, STEP2_TEACHER))
    # the 1e-4 teacher is one-hot on the positive (<t,t> = 1 beats every queue similarity)
    expected = 0.0
    for t in STEP2_TEACHER.tolist():
        logits = [1.0 / 0.07] + [dot(t, q) / 0.07 for q in STEP1_TEACHER.tolist()]
        expected += -(logits[0] - math.log(sum(math.exp(v) for v in logits)))
    assert second == pytest.approx(expected / 3, rel=1e-9)


@pytest.mark.parametrize("name", ["CompRess-1q", "CompRess-2q", "SEED"])
def test_queue_losses_send_no_gradient_to_the_teacher(name):
    loss = build_loss(name, LossOptions(queue_size=16), 2).double()
    for student, teacher in ((STEP1_STUDENT, STEP1_TEACHER), (STEP2_STUDENT, STEP2_TEACHER)):
        student = student.clone().requires_grad_()
        teacher = teacher.clone().requires_grad_()
        terms = loss(LossInputs(image_features=student, text_features=teacher, teacher="text"))
        sum(terms.values()).backward()
        assert teacher.grad is None or torch.all(teacher.grad == 0)
    assert student.grad.abs().sum() > 0


def test_queue_is_a_checkpointed_buffer():
    loss = CompRess(2, queue_size=8, two_queues=True).double()
    run_two_steps(loss)
    state = loss.state_dict()
    assert int(state["teacher_queue.count"]) == 6 and int(state["student_queue.pointer"]) == 6
    restored = CompRess(2, queue_size=8, two_queues=True).double()
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.teacher_queue.filled(), loss.teacher_queue.filled())
