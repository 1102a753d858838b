"""Self-supervised auxiliary terms that combine with any loss: dropout SimCSE (text) and BYOL-style MSE (image).

Each is its own module returning its own named term; `LossWithAuxiliaries` adds them to a main
loss so the loop still sees one module returning one flat dict.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from protorkd.losses.base import LOCAL, ClusteringLoss, LossInputs, LossModule, LossNeeds, Scope
from protorkd.losses.common import zero_with_grad
from protorkd.losses.contrastive import clip_loss, symmetric_infonce

SIMCSE_LOGIT_SCALE = 20.0  # 1 / 0.05, SimCSE's temperature (the original: exp(2.996))


class SimCSE(LossModule):
    """Symmetric InfoNCE between two dropout passes of the text tower, fixed logit scale 20 (Gao et al., EMNLP 2021).

    Uses inputs.text_features and inputs.text_features_dropout ([B, D]); global batch under DDP. It takes mixed
    images: it compares text views only, which mixing the images does not change.
    """

    needs = LossNeeds(text_dropout_view=True, accepts_mixup=True)

    def __init__(self, weight: float = 1.0, logit_scale: float = SIMCSE_LOGIT_SCALE, *, scope: Scope = LOCAL) -> None:
        super().__init__()
        self.weight = weight
        self.logit_scale = logit_scale
        self.scope = scope  # ITRA gathers its features only with a gathering main loss (InfoNCE)

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        second = inputs.required("text_features_dropout", "SimCSE")
        first = F.normalize(inputs.text_features, dim=-1)
        second = F.normalize(second, dim=-1)
        scale = torch.tensor(self.logit_scale, device=first.device)
        if not self.scope.global_batch:
            return {
                "simcse_loss": self.weight * symmetric_infonce(first, second, scale)
                if len(first)
                else zero_with_grad(first)
            }
        loss = clip_loss(first, second, scale, gather_with_grad=self.scope.with_grad)
        return {"simcse_loss": self.weight * loss}


class BYOL(LossModule):
    """mean (normalize(v2) - normalize(v1).detach())^2: the second augmented image view regressed on the first.

    Uses inputs.image_features_view2 ([B, D]) against inputs.image_features; global batch under DDP.
    """

    needs = LossNeeds(image_view2=True)

    def __init__(self, weight: float = 1.0, *, scope: Scope = LOCAL) -> None:
        super().__init__()
        self.weight = weight
        self.scope = scope

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        view2 = self.scope.trainable(F.normalize(inputs.required("image_features_view2", "BYOL"), dim=-1))
        view1 = self.scope.frozen(F.normalize(inputs.image_features, dim=-1))
        if view2.shape[0] == 0:
            return {"byol_loss": zero_with_grad(view2)}
        return {"byol_loss": self.weight * F.mse_loss(view2, view1)}


class LossWithAuxiliaries(LossModule):
    """The main loss plus auxiliary terms; forward merges their named terms (names must not collide)."""

    def __init__(self, main: LossModule, auxiliaries: dict[str, LossModule]) -> None:
        super().__init__()
        self.main = main
        self.auxiliaries = nn.ModuleDict(auxiliaries)
        self.needs = main.needs
        self.scope = main.scope
        for auxiliary in auxiliaries.values():
            self.needs = self.needs | auxiliary.needs

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        terms = dict(self.main(inputs))
        for name, auxiliary in self.auxiliaries.items():
            for key, value in auxiliary(inputs).items():
                if key in terms:
                    raise ValueError(f"auxiliary loss {name!r} returns {key!r}, already returned by another term")
                terms[key] = value
        return terms

    def log_values(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for module in (self.main, *self.auxiliaries.values()):
            values.update(module.log_values())
        return values

    def clustering(self) -> ClusteringLoss | None:
        return self.main.clustering()
