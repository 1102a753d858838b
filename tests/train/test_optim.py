"""The learning-rate schedule and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from protorkd.train.optim import REST, VISUAL, group_schedule, lr_at, param_groups, set_lr


def test_learning_rate_schedule_values():
    kwargs = dict(base_lr=1.0, warmup_steps=4, total_steps=14)
    assert [lr_at(s, **kwargs) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kwargs) == 1.0
    assert lr_at(9, **kwargs) == pytest.approx(0.5)
    assert lr_at(14, **kwargs) == pytest.approx(0.0)
    assert lr_at(7, **kwargs) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_weight_decay_skips_biases_norms_and_temperatures():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    module.logit_scale = torch.nn.Parameter(torch.zeros(()))
    decay, no_decay = param_groups({"rest": [module]}, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def original_protoclip_cosine_lr(step, visual_base_lr, text_base_lr, warmup, visual_steps, text_start, text_end):
    """megvii-research/protoclip src/training/scheduler.py `protoclip_cosine_lr`, transcribed line by line."""
    if step < warmup:
        lr_visual = visual_base_lr * (step + 1) / warmup
    else:
        lr_visual = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (visual_steps - warmup))) * visual_base_lr
        if step > visual_steps:
            lr_visual = 0
    if step < text_start:
        lr_non_visual = 0
    else:
        step -= text_start
        if step < warmup:
            lr_non_visual = text_base_lr * (step + 1) / warmup
        else:
            e, es = step - warmup, text_end - text_start - warmup
            lr_non_visual = 0.5 * (1 + math.cos(math.pi * e / es)) * text_base_lr
            if step > text_end:
                lr_non_visual = 0
    return lr_visual, lr_non_visual


def test_per_group_schedule_pins_protoclips_learning_rates_step_by_step():
    # 5 steps per epoch, 6 epochs, warmup 3; LiT from epoch 5 (visual schedule over 20 steps), the rest of the
    # model starts at epoch 1 (step 5) with its own lr and ends with the run (step 30)
    schedule = group_schedule(
        lr=1.0, lr_text=0.5, warmup=3, steps_per_epoch=5, epochs=6, lit_start_epoch=5, text_start_epoch=1
    )
    for step in range(30):
        visual, rest = original_protoclip_cosine_lr(step, 1.0, 0.5, 3, 20, 5, 30)
        assert schedule(step)[VISUAL] == pytest.approx(visual, abs=1e-15), step
        assert schedule(step)[REST] == pytest.approx(rest, abs=1e-15), step
    # a few by hand: warmup, cosine, LiT (visual 0 from the first step of epoch 5), the delayed text warmup
    assert [schedule(s)[VISUAL] for s in (0, 1, 2)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    assert schedule(11)[VISUAL] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 17)))
    assert [schedule(s)[VISUAL] for s in (20, 21, 29)] == [0.0, 0.0, 0.0]
    assert [schedule(s)[REST] for s in (0, 4, 5, 7)] == [0.0, 0.0, pytest.approx(0.5 / 3), 0.5]
    assert schedule(17)[REST] == pytest.approx(0.25 * (1 + math.cos(math.pi * 9 / 22)))


def test_without_lit_or_text_flags_both_groups_follow_the_plain_schedule():
    schedule = group_schedule(lr=2e-3, lr_text=-1, warmup=4, steps_per_epoch=7, epochs=2)
    for step in range(14):
        plain = lr_at(step, base_lr=2e-3, warmup_steps=4, total_steps=14)
        assert schedule(step) == {VISUAL: plain, REST: plain}


def test_the_text_schedule_ends_at_its_end_epoch():
    # the original compares the shifted step with the unshifted end (`step -= text_start_step; ... if step >
    # text_end_step`), so between the two its cosine rises again; here it stays 0 (docs/method.md)
    schedule = group_schedule(
        lr=1.0, lr_text=-1, warmup=1, steps_per_epoch=4, epochs=6, text_start_epoch=1, text_end_epoch=3
    )
    assert [schedule(s)[REST] for s in range(12, 24)] == [0.0] * 12
    assert original_protoclip_cosine_lr(14, 1.0, 1.0, 1, 24, 4, 12)[1] > 0  # the original's lr after its end


def test_parameter_groups_split_visual_and_rest_and_skip_decay_for_projection_heads():
    from protorkd.models.build import build_dual_encoder
    from protorkd.models.options import ModelOptions
    from protorkd.train.optim import build_optimizer

    tiny = dict(image_model_builder="custom", image_model="micro-cnn", text_model_builder="custom")
    model = build_dual_encoder(
        ModelOptions(**tiny, text_model="tiny-text", teacher="none", add_projection_head=True, projection_hidden_dim=8)
    )
    loss = torch.nn.Module()
    loss.logit_scale = torch.nn.Parameter(torch.zeros(()))
    roles = {VISUAL: [model.image_tower, model.image_head], REST: [model, loss]}
    optimizer = build_optimizer(roles, lr=1.0, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    by_id = {id(p): (g["role"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert all(by_id[id(p)][0] == VISUAL for p in model.image_tower.parameters())
    assert by_id[id(model.image_head.weight)] == (VISUAL, 0.2)
    assert by_id[id(model.text_tower.model.embedding.weight)] == (REST, 0.2)
    assert all(by_id[id(p)] == (REST, 0.0) for p in model.image_projection_head.parameters())  # as ProtoCLIP
    assert by_id[id(loss.logit_scale)] == (REST, 0.0)
    set_lr(optimizer, {VISUAL: 0.0, REST: 0.3})
    assert {g["role"]: g["lr"] for g in optimizer.param_groups} == {VISUAL: 0.0, REST: 0.3}
