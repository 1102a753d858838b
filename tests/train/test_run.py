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
