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
    loss = CompRess(2, queue_size=8, temperature=0.04, two_queues=False, init="empty").double()
    first, second = run_two_steps(loss)
    assert first == 0.0  # nothing in the queue yet
    expected = hand_kl(
        STEP2_TEACHER.tolist(), STEP2_STUDENT.tolist(), STEP1_TEACHER.tolist(), STEP1_TEACHER.tolist(), 0.04
    )
    assert second == pytest.approx(expected, rel=1e-9)


def test_compress_2q_equals_hand_computation():
    loss = CompRess(2, queue_size=8, temperature=0.04, two_queues=True, init="empty").double()
    _, second = run_two_steps(loss)
    expected = hand_kl(
        STEP2_TEACHER.tolist(), STEP2_STUDENT.tolist(), STEP1_TEACHER.tolist(), STEP1_STUDENT.tolist(), 0.04
    )
    assert second == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("two_queues", [False, True])
def test_compress_is_zero_when_student_equals_teacher(two_queues):
    loss = CompRess(2, queue_size=8, temperature=0.04, two_queues=two_queues, init="empty").double()
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
    loss = SEED(2, queue_size=8, student_temperature=0.07, teacher_temperature=1e-4, init="empty").double()
    first, second = run_two_steps(loss)
    assert first == pytest.approx(0.0, abs=1e-12)  # a single (positive) logit: nothing to distil
    expected = hand_seed(STEP2_STUDENT.tolist(), STEP2_TEACHER.tolist(), STEP1_TEACHER.tolist(), 0.07, 1e-4)
    assert second == pytest.approx(expected, rel=1e-9)


def test_seed_when_student_equals_teacher_is_the_positive_pair_cross_entropy():
    loss = SEED(2, queue_size=8, init="empty").double()
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
    loss = CompRess(2, queue_size=8, two_queues=True, init="empty").double()
    run_two_steps(loss)
    state = loss.state_dict()
    assert int(state["teacher_queue.count"]) == 6 and int(state["student_queue.pointer"]) == 6
    restored = CompRess(2, queue_size=8, two_queues=True, init="empty").double()
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.teacher_queue.filled(), loss.teacher_queue.filled())


# --- ITRA's queues (the original ProtoRKD code): random initial rows, the whole queue scored from step 1 -------


class ItraSampleSimilarities(torch.nn.Module):
    """ITRA `itra/loss/CompRess.py` SampleSimilarities (from CompRess's code), transcribed for the CPU."""

    def __init__(self, feats_dim, queueSize, T):
        super().__init__()
        self.queueSize, self.T, self.index = queueSize, T, 0
        stdv = 1.0 / math.sqrt(feats_dim / 3)
        self.register_buffer("memory", torch.rand(self.queueSize, feats_dim).mul_(2 * stdv).add_(-stdv))

    def forward(self, q, update=True):
        batchSize = q.shape[0]
        queue = self.memory.clone()
        out = torch.mm(queue.detach(), q.transpose(1, 0))
        out = out.transpose(0, 1)
        out = torch.div(out, self.T)
        out = out.squeeze().contiguous()
        if update:
            with torch.no_grad():
                out_ids = torch.arange(batchSize)
                out_ids += self.index
                out_ids = torch.fmod(out_ids, self.queueSize)
                out_ids = out_ids.long()
                self.memory.index_copy_(0, out_ids, q)
                self.index = (self.index + batchSize) % self.queueSize
        return out


def itra_kld(targets, inputs):
    return F.kl_div(F.log_softmax(inputs, dim=1), F.softmax(targets, dim=1), reduction="batchmean")


class ItraCompReSS(torch.nn.Module):
    """ITRA CompReSS (CompRess-2q): the student's memory is built (drawn) first, then the teacher's."""

    def __init__(self, dim, queue_size, T=0.04):
        super().__init__()
        self.student_sample_similarities = ItraSampleSimilarities(dim, queue_size, T)
        self.teacher_sample_similarities = ItraSampleSimilarities(dim, queue_size, T)

    def forward(self, teacher_feats, student_feats):
        teacher_feats, student_feats = F.normalize(teacher_feats, dim=1), F.normalize(student_feats, dim=1)
        similarities_student = self.student_sample_similarities(student_feats)
        similarities_teacher = self.teacher_sample_similarities(teacher_feats)
        return itra_kld(similarities_teacher, similarities_student)


class ItraCompReSSA(torch.nn.Module):
    """ITRA CompReSSA (CompRess-1q): one teacher memory scores both sides."""

    def __init__(self, dim, queue_size, T=0.04):
        super().__init__()
        self.teacher_sample_similarities = ItraSampleSimilarities(dim, queue_size, T)

    def forward(self, teacher_feats, student_feats):
        teacher_feats, student_feats = F.normalize(teacher_feats, dim=1), F.normalize(student_feats, dim=1)
        similarities_student = self.teacher_sample_similarities(student_feats, update=False)
        similarities_teacher = self.teacher_sample_similarities(teacher_feats)
        return itra_kld(similarities_teacher, similarities_student)


class ItraSEED(torch.nn.Module):
    """ITRA `itra/loss/SEED.py` SEED, one process (no gather), queue size K instead of 65536."""

    def __init__(self, dim, K):
        super().__init__()
        self.K, self.t, self.temp = K, 0.07, 1e-4
        self.register_buffer("queue", torch.randn(dim, self.K))
        self.queue = F.normalize(self.queue, dim=0)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def forward(self, teacher_feature, student_feature):
        t_emb, s_emb = F.normalize(teacher_feature, dim=1), F.normalize(student_feature, dim=1)
        logit_stu = torch.einsum("nc,ck->nk", [s_emb, self.queue.clone().detach()])
        logit_tea = torch.einsum("nc,ck->nk", [t_emb, self.queue.clone().detach()])
        logit_s_p = torch.einsum("nc,nc->n", [s_emb, t_emb]).unsqueeze(-1)
        logit_t_p = torch.einsum("nc,nc->n", [t_emb, t_emb]).unsqueeze(-1)
        logit_stu = torch.cat([logit_s_p, logit_stu], dim=1)
        logit_tea = torch.cat([logit_t_p, logit_tea], dim=1)
        logit_stu /= self.t
        logit_tea = F.softmax(logit_tea / self.temp, dim=1)
        self._dequeue_and_enqueue(t_emb)
        return -(logit_tea * F.log_softmax(logit_stu, 1)).sum() / logit_stu.shape[0]


ITRA_QUEUES = {"CompRess-1q": ItraCompReSSA, "CompRess-2q": ItraCompReSS, "SEED": ItraSEED}


@pytest.mark.parametrize("name", list(ITRA_QUEUES))
@pytest.mark.parametrize("run_seed", [0, 3])
def test_queue_losses_start_from_itras_random_rows_and_match_its_first_steps(name, run_seed):
    """ITRA's module built right after torch.manual_seed(run seed); ours built with --seed = run seed: the same
    random rows, the same loss and student gradient at each of 3 steps (queue of 8, batches of 4: the random
    rows are scored at steps 1 and 2 and overwritten by step 3), the same queue after them."""
    dim, queue_size, batch = 5, 8, 4
    torch.manual_seed(run_seed)
    reference = ITRA_QUEUES[name](dim, queue_size).double()
    ours = build_loss(name, LossOptions(queue_size=queue_size), dim, seed=run_seed).double()
    torch.manual_seed(123)  # the steps' features: not from the seed's stream
    for _ in range(3):
        student = torch.randn(batch, dim, dtype=torch.float64)
        teacher = torch.randn(batch, dim, dtype=torch.float64)
        reference_leaf, our_leaf = student.clone().requires_grad_(), student.clone().requires_grad_()
        expected = reference(teacher, reference_leaf)
        expected.backward()
        terms = ours(LossInputs(image_features=our_leaf, text_features=teacher, teacher="text"))
        terms["distill_loss"].backward()
        torch.testing.assert_close(terms["distill_loss"], expected, rtol=1e-10, atol=0)
        torch.testing.assert_close(our_leaf.grad, reference_leaf.grad, rtol=1e-8, atol=1e-12)
    if name == "SEED":
        torch.testing.assert_close(ours.queue.filled(), reference.queue.T)
    else:
        torch.testing.assert_close(ours.teacher_queue.filled(), reference.teacher_sample_similarities.memory)
    if name == "CompRess-2q":
        torch.testing.assert_close(ours.student_queue.filled(), reference.student_sample_similarities.memory)


def test_random_queue_rows_resume_from_the_checkpoint_not_from_the_seed():
    """A resumed run's loss is built again (drawing rows from its seed) and then loads the checkpoint's buffers:
    the next steps equal the uninterrupted run's, even if the seed were different."""
    first = build_loss("CompRess-2q", LossOptions(queue_size=16), 2, seed=5).double()
    run_two_steps(first)
    resumed = build_loss("CompRess-2q", LossOptions(queue_size=16), 2, seed=6).double()
    assert not torch.equal(resumed.teacher_queue.features, first.teacher_queue.features)
    resumed.load_state_dict(first.state_dict())
    assert run_two_steps(resumed) == run_two_steps(first)


def test_queue_init_empty_is_the_named_option_for_an_empty_start():
    for name in ITRA_QUEUES:
        random_start = build_loss(name, LossOptions(queue_size=16), 2)
        empty_start = build_loss(name, LossOptions(queue_size=16, queue_init="empty"), 2)
        queue = empty_start.queue if name == "SEED" else empty_start.teacher_queue
        assert queue.filled().shape == (0, 2)
        assert (random_start.queue if name == "SEED" else random_start.teacher_queue).filled().shape == (16, 2)
    with pytest.raises(ValueError, match="queue init"):
        CompRess(2, queue_size=4, two_queues=False, init="zeros")
