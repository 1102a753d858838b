"""mixup's images and targets against timm's batch-mode `Mixup`, its draws, and the run's refusals."""

import numpy as np
import pytest
import torch
from timm.data import Mixup as TimmMixup

from protorkd.data.mixup import Mixup, mix_images, mixed_pair_targets, run_mixup
from protorkd.errors import UsageError


@pytest.mark.parametrize("batch", [4, 6])
def test_mixed_images_and_targets_equal_timms_batch_mode_mixup_with_each_sample_its_own_class(batch):
    images = torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    np.random.seed(3)  # timm draws lam from numpy's global generator
    reference = TimmMixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, mode="batch", label_smoothing=0.0,
                          num_classes=batch)  # fmt: skip
    timm_images, timm_targets = reference(images.clone(), torch.arange(batch))
    lam = float(timm_targets[0, 0])
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mix_images(images, lam), timm_images)
    # i-Mix's virtual labels: sample i is class i, so timm's mixed one-hot targets are the pairing's targets
    torch.testing.assert_close(mixed_pair_targets(torch.full((batch,), lam), [batch]), timm_targets)


def test_targets_of_a_gathered_batch_pair_rows_within_each_ranks_slice():
    lams = torch.tensor([0.75, 0.75, 0.75, 0.5, 0.5], dtype=torch.float64)
    got = mixed_pair_targets(lams, [3, 2])
    expected = torch.tensor(
        [
            [0.75, 0.0, 0.25, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0, 0.0],  # the middle row of an odd slice is its own partner
            [0.25, 0.0, 0.75, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.5, 0.5],
            [0.0, 0.0, 0.0, 0.5, 0.5],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.T.sum(1), torch.ones(5, dtype=torch.float64))  # caption rows sum to 1 too
    with pytest.raises(ValueError, match="add up to 4"):
        mixed_pair_targets(lams, [3, 1])


def test_draws_depend_only_on_seed_batch_and_rank_and_follow_the_probability():
    mixup = Mixup(alpha=1.0, prob=0.5, seed=7)
    draws = [mixup.draw(batch) for batch in range(400)]
    assert draws == [Mixup(alpha=1.0, prob=0.5, seed=7).draw(batch) for batch in range(400)]  # a resume redraws
    assert [mixup.draw(batch, rank=1) for batch in range(400)] != draws
    unmixed = sum(lam == 1.0 for lam in draws)
    assert 160 <= unmixed <= 240  # Binomial(400, 0.5): mean 200, sd 10
    assert all(Mixup(alpha=1.0, prob=0.0).draw(batch) == 1.0 for batch in range(50))
    assert all(0.0 < Mixup(alpha=0.2, prob=1.0).draw(batch) < 1.0 for batch in range(50))
    with pytest.raises(ValueError, match="alpha > 0"):
        Mixup(alpha=0.0)


def test_a_run_refuses_mixup_it_cannot_do():
    assert run_mixup(0.0, 1.0, 0, loss_name="RKD", loss_accepts=False, images_trained=True) is None
    assert run_mixup(1.0, 0.5, 3, loss_name="InfoNCE", loss_accepts=True, images_trained=True) == Mixup(1.0, 0.5, 3)
    with pytest.raises(UsageError, match="--loss RKD cannot take mixed images"):
        run_mixup(1.0, 1.0, 0, loss_name="RKD", loss_accepts=False, images_trained=True)
    with pytest.raises(UsageError, match="locked teacher"):
        run_mixup(1.0, 1.0, 0, loss_name="InfoNCE", loss_accepts=True, images_trained=False)
