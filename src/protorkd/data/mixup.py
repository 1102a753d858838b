"""mixup of a training batch's images, for contrastive losses (`--mixup-alpha`, `--mixup-prob`).

The batch-mode mixup of Zhang et al. (ICLR 2018) as timm's `Mixup(mode="batch")` computes it: with
probability `prob` a batch is mixed with its own reversed order, image i <- lam x_i + (1 - lam) x_{B-1-i},
one lam ~ Beta(alpha, alpha) for the whole batch. Batches are shuffled, so the reversed order is a random
pairing. A contrastive loss then targets the mixture of the two captions (`mixed_pair_targets`): the
"virtual labels" of i-Mix (Lee et al., ICLR 2021), where each sample is its own class. The differences from
i-Mix's reference code (one lam per batch instead of per sample, no lam <- max(lam, 1 - lam), both directions
of CLIP's loss) are listed in docs/method.md.

Draws are a function of (seed, batch number, rank), so a resumed run mixes exactly as the run it continues.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protorkd.errors import UsageError

# Mixes the seed's stream apart from every other use of (seed, step) numbers in a run.
_STREAM = 0x6D6978


@dataclass(frozen=True)
class Mixup:
    """mixup's parameters: lam ~ Beta(alpha, alpha), a batch mixed with probability `prob`."""

    alpha: float
    prob: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"mixup needs alpha > 0, not {self.alpha}")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"mixup's probability must be in [0, 1], not {self.prob}")

    def draw(self, batch_number: int, rank: int = 0) -> float:
        """This batch's lam on this rank; 1.0 (nothing mixed) with probability 1 - prob."""
        rng = np.random.default_rng([self.seed, batch_number, rank, _STREAM])
        if rng.random() >= self.prob:
            return 1.0
        return float(rng.beta(self.alpha, self.alpha))


def run_mixup(
    alpha: float, prob: float, seed: int, *, loss_name: str, loss_accepts: bool, images_trained: bool
) -> Mixup | None:
    """The run's `Mixup` (None when --mixup-alpha is 0), or a UsageError when the run cannot mix its images."""
    if alpha == 0:
        return None
    if not images_trained:
        raise UsageError("--mixup-alpha: the image tower is a locked teacher read from its cache; nothing to mix")
    if not loss_accepts:
        raise UsageError(
            f"--mixup-alpha: --loss {loss_name} cannot take mixed images (its targets are per-sample features, "
            "which mixed images contradict); use it with InfoNCE, or set --mixup-alpha 0"
        )
    return Mixup(alpha, prob, seed)


def mix_images(images: torch.Tensor, lam: float) -> torch.Tensor:
    """[B, ...] -> lam * images + (1 - lam) * images reversed along the batch (a new tensor; lam 1 returns
    `images` itself)."""
    if lam == 1.0:
        return images
    return images * lam + images.flip(0) * (1.0 - lam)


def mixed_pair_targets(lams: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """[N, N] soft targets of the image->caption logits of a gathered batch whose ranks hold `sizes` rows.

    lams: [N], each row's lam (constant within a rank's slice). Row i puts lam_i on its own caption and
    1 - lam_i on its partner's, the row mixed into it: the mirror image of i within its rank's slice. The
    caption->image direction's targets are the transpose; its rows sum to 1 because lam is constant within a
    slice and the pairing is its own inverse.
    """
    total = int(lams.shape[0])
    rows = torch.arange(total, device=lams.device)
    partner = torch.empty_like(rows)
    start = 0
    for size in sizes:
        partner[start : start + size] = torch.arange(start + size - 1, start - 1, -1, device=lams.device)
        start += size
    if start != total:
        raise ValueError(f"the slices' sizes {sizes} add up to {start}, not the {total} rows given")
    targets = torch.zeros(total, total, dtype=lams.dtype, device=lams.device)
    targets.index_put_((rows, rows), lams, accumulate=True)
    targets.index_put_((rows, partner), 1.0 - lams, accumulate=True)
    return targets
