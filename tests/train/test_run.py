"""What `build_run` resolves once: the evaluation plan."""

from __future__ import annotations


def test_the_evaluation_plan_runs_each_task_at_its_frequency_and_at_the_last_epoch(tmp_path):
    from protorkd.train.run import EvalPlan

    plan = EvalPlan(tmp_path, {"zeroshot": 2, "retrieval": 1, "sts": 1, "linear": 0}, 3, 64, 0)
    assert plan.due(1) == ["retrieval", "sts"]
    assert plan.due(2) == ["zeroshot", "retrieval", "sts"]
    assert plan.due(3) == ["zeroshot", "retrieval", "sts"]  # the last epoch runs every task with frequency > 0
    assert EvalPlan(None, {"zeroshot": 1}, 3, 64, 0).due(3) == []  # no data root: nothing to evaluate
    last_only = EvalPlan(tmp_path, {"zeroshot": 1, "linear": -1, "retrieval": -1}, 4, 64, 0)
    assert [last_only.due(epoch) for epoch in (1, 2, 3, 4)] == [
        ["zeroshot"],
        ["zeroshot"],
        ["zeroshot"],
        ["zeroshot", "linear", "retrieval"],
    ]


def test_the_automatic_warmup_is_50_steps_but_at_most_a_tenth_of_the_run():
    """Issue 25: on small data 50 warm-up steps were longer than the whole run (the README's quick run has 16)."""
    from protorkd.config import AUTOMATIC_WARMUP
    from protorkd.train.run import warmup_steps

    assert warmup_steps(AUTOMATIC_WARMUP, 640) == 50  # the demo: 4 epochs of 160 steps, as before
    assert warmup_steps(AUTOMATIC_WARMUP, 160) == 16
    assert warmup_steps(AUTOMATIC_WARMUP, 16) == 1  # `protorkd train --epochs 1 --dataset-size 1024`
    assert warmup_steps(AUTOMATIC_WARMUP, 5) == 1
    assert warmup_steps(7, 16) == 7 and warmup_steps(0, 16) == 0  # an explicit --warmup is kept as given


def test_results_are_written_without_float_noise():
    import json

    from protorkd.train.logs import without_float_noise

    noisy = {"zeroshot/shapes/top1": 100 * 0.169, "linear_joint/shapes/l2": 1.2345678901234567e-07}
    assert json.dumps(without_float_noise(noisy)) == (
        '{"zeroshot/shapes/top1": 16.9, "linear_joint/shapes/l2": 1.23456789012e-07}'
    )
