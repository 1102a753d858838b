"""The divergence guard: a run that diverges says so, instead of "succeeding" at chance level.

* A non-finite loss term (or, without fp16's gradient scaler, a non-finite gradient norm) stops the run before
  the optimizer steps on it, with one line naming the term, the epoch and step, and the last good checkpoint
  to resume from (`TrainingDiverged`).
* A loss term or the gradient norm that jumps above `factor` x the median of its last `window` values logs one
  WARNING naming it (once per excursion: it warns again only after the value came back under the threshold).
  The median is of absolute values (a term may be negative), over at least `min_history` earlier steps.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import torch

from protorkd.errors import TrainingDiverged

log = logging.getLogger(__name__)
GRAD_NORM = "grad_norm"


class DivergenceGuard:
    def __init__(
        self, checkpoint: Path | None = None, *, factor: float = 100.0, window: int = 100, min_history: int = 10
    ) -> None:
        self.checkpoint = checkpoint  # the file a diverged run resumes from (epoch_latest.pt), if written yet
        self.factor = factor
        self.window = window
        self.min_history = min_history
        self.history: dict[str, deque[float]] = {}
        self.warned: set[str] = set()

    def _stop(self, what: str, value: float, epoch: int, step: int) -> TrainingDiverged:
        last = self.checkpoint if self.checkpoint is not None and self.checkpoint.is_file() else None
        resume = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return TrainingDiverged(
            f"training diverged: {what} = {value} at epoch {epoch + 1} (global step {step + 1}); {resume} "
            "(lower --lr, set --max-grad-norm, or train with --precision fp32, then --resume latest)"
        )

    def check_loss(self, terms: Mapping[str, torch.Tensor], total: torch.Tensor, *, epoch: int, step: int) -> None:
        """Raise `TrainingDiverged` naming the first non-finite term (one sync: the total is checked first)."""
        if bool(torch.isfinite(total)):
            return
        for name, value in terms.items():
            if not bool(torch.isfinite(value)):
                raise self._stop(f"loss term {name}", value.item(), epoch, step)
        raise self._stop("the loss", total.item(), epoch, step)

    def check_grad_norm(self, grad_norm: torch.Tensor, *, scaled: bool, epoch: int, step: int) -> None:
        """A non-finite gradient norm stops the run, except under fp16's scaler (which skips such steps)."""
        if not scaled and not math.isfinite(float(grad_norm)):
            raise self._stop("the gradient norm", float(grad_norm), epoch, step)

    def observe(self, values: Mapping[str, float], step: int) -> None:
        """One optimizer step's loss terms and gradient norm: warn about jumps, then remember them."""
        for name, value in values.items():
            history = self.history.setdefault(name, deque(maxlen=self.window))
            if len(history) >= self.min_history:
                median = statistics.median(history)
                jumped = median > 0 and abs(value) > self.factor * median
                if jumped and name not in self.warned:
                    log.warning(
                        "global step %d: %s = %.4g is %.0fx the median of its last %d values (%.4g); the run may be "
                        "diverging (lower --lr or set --max-grad-norm)",
                        step + 1,
                        name,
                        value,
                        abs(value) / median,
                        len(history),
                        median,
                    )
                    self.warned.add(name)
                elif not jumped:
                    self.warned.discard(name)
            history.append(abs(value))


__all__ = ["GRAD_NORM", "DivergenceGuard", "TrainingDiverged"]
