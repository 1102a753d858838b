"""ProtoCLIP's loss (Chen et al. 2022, arXiv 2206.10996): InfoNCE plus prototype-level discrimination.

The module holds the current clustering (set by `set_clusters` with a `prototypes.ClusterState`
once per clustering episode) as buffers, so it is checkpointed and identical on every rank.
Per global batch of N, with student logits u_i = s_p <p_i, P_k> over the k prototypes P:

* img->text: p = image features, P = image-space centroids of the text clusters (PBT) or the raw text
  centroids, labels y = text cluster labels; text->img symmetrically. With target temperature
  tau > 0 the target is softmax(<C_{y_i}, C_k> / tau) over the teacher's own centroids C, else y_i.
* external (needs PBT): img->ext and text->ext with the back-translated external clusters, hard labels.
* total = w_clip L_clip + w_proto (L_i2t + L_t2i) / 2 + w_ext (L_i2e + L_t2e) / 2; before
  `infonce_warmup_epoch`, from `lit_start_epoch - 1` on (the Locked-image Tuning phase, when
  `lit_start_epoch` > 0), and before the first clustering, only L_clip with weight 1.

Prototype terms use `LossInputs.image_proto_features` / `text_proto_features` ([B, d], the
features that were clustered: ProtoCLIP's projection-head outputs) when present, else the main
features. When the prototype terms are off, they are still connected to those features with weight 0,
so that DistributedDataParallel sees every parameter used. s_p is a learnable prototype scale (init
1 / temperature, clamped at 100). Labels are looked up by `LossInputs.positions` (each sample's
position in its episode, ProtoCLIP's episodic index) or by `LossInputs.indices` (corpus rows),
whichever the installed clustering was keyed by.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from protorkd.losses.base import GLOBAL, ClusteringLoss, LossInputs, LossModule, LossNeeds, Scope
from protorkd.losses.common import soft_cross_entropy, zero_with_grad
from protorkd.losses.contrastive import MAX_LOGIT_SCALE, symmetric_infonce
from protorkd.prototypes.clustering import TENSOR_FIELDS, ClusterState


class ProtoCLIP(LossModule):
    needs = LossNeeds(row_ids=True, clustering=True)  # labels are looked up by episode position or corpus row

    def __init__(
        self,
        *,
        init_temperature: float = 0.07,
        w_clip: float = 1.0,
        w_proto: float = 1.0,
        w_proto_external: float = 1.0,
        target_temperature: float = -1.0,
        pbt: bool = False,
        infonce_warmup_epoch: int = 0,
        lit_start_epoch: int = -1,
        scope: Scope = GLOBAL,
    ) -> None:
        super().__init__()
        self.scope = scope  # ProtoCLIP's code gathers the global batch (open_clip's gather)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_scale_proto = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.w_clip = w_clip
        self.w_proto = w_proto
        self.w_proto_external = w_proto_external
        self.target_temperature = target_temperature
        self.pbt = pbt
        self.infonce_warmup_epoch = infonce_warmup_epoch
        self.lit_start_epoch = lit_start_epoch
        for name, dtype, ndim in TENSOR_FIELDS:
            self.register_buffer(name, torch.zeros((0,) * ndim, dtype=dtype))
        self.register_buffer("keyed_by_position", torch.tensor(False))
        self._diagnostics: dict[str, torch.Tensor] = {}
        self._labelled = torch.zeros((), dtype=torch.long)  # samples with a label since the last reset
        self._looked_up = torch.zeros((), dtype=torch.long)

    # ---- clustering state ---------------------------------------------------------------------
    def set_clusters(self, state: ClusterState) -> None:
        """Install one episode's clusters (identical on every rank: see `broadcast_cluster_state`)."""
        if self.pbt and state.image_centroids_from_text is None:
            raise ValueError("ProtoCLIP was built with PBT but the cluster state has no back-translated centroids")
        device = self.logit_scale.device
        for name, dtype, ndim in TENSOR_FIELDS:
            dtype = dtype if dtype == torch.long else self.logit_scale.dtype
            tensor = getattr(state, name)
            if tensor is None:
                tensor = torch.zeros((0,) * ndim, dtype=dtype)
            setattr(self, name, tensor.to(device=device, dtype=dtype))
        self.keyed_by_position = torch.tensor(bool(state.keyed_by_position), device=device)

    def clustering(self) -> ClusteringLoss:
        return self

    def prototypes_active(self, epoch: int) -> bool:
        """Do the prototype terms count in `epoch` (0-based)? Not in InfoNCE warmup or LiT epochs."""
        lit = 0 < self.lit_start_epoch and epoch >= self.lit_start_epoch - 1
        return not (epoch < self.infonce_warmup_epoch or lit)

    def label_coverage(self, reset: bool = True) -> tuple[int, int]:
        """(samples that had a prototype label, samples looked up) since the last reset, over global batches."""
        counts = int(self._labelled), int(self._looked_up)
        if reset:
            self._labelled = torch.zeros_like(self._labelled)
            self._looked_up = torch.zeros_like(self._looked_up)
        return counts

    @property
    def has_clusters(self) -> bool:
        return self.image_labels.numel() > 0

    @property
    def has_external(self) -> bool:
        return self.external_labels.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # cluster buffers change shape from episode to episode: take the checkpoint's shapes
        for name, _, _ in TENSOR_FIELDS:
            if prefix + name in state_dict:
                current = getattr(self, name)
                setattr(self, name, current.new_empty(state_dict[prefix + name].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- loss ---------------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def proto_scale(self) -> torch.Tensor:
        return self.logit_scale_proto.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        image = self.scope.trainable(inputs.image_features)
        text = self.scope.trainable(inputs.text_features)
        infonce = symmetric_infonce(image, text, self.scale())
        image_proto = (
            image if inputs.image_proto_features is None else self.scope.trainable(inputs.image_proto_features)
        )
        text_proto = text if inputs.text_proto_features is None else self.scope.trainable(inputs.text_proto_features)
        self._diagnostics = {}
        active = self.prototypes_active(inputs.epoch)
        # unused terms stay connected to the prototype features with weight 0: DDP needs every parameter used
        zero = zero_with_grad(image_proto) + zero_with_grad(text_proto)
        terms = {"infonce_loss": (self.w_clip if active else 1.0) * infonce, "proto_loss": zero}
        terms["proto_external_loss"] = zero
        if not (active and self.has_clusters):
            return terms
        keys = inputs.positions if bool(self.keyed_by_position) else inputs.indices
        if keys is None:
            what = "positions (episode positions)" if bool(self.keyed_by_position) else "indices (corpus rows)"
            raise ValueError(f"ProtoCLIP's clusters are keyed by inputs.{what}, which this batch lacks")
        keys = self.scope.frozen(keys.to(image.device)).long()
        if inputs.update_state:
            labelled = _lookup(self.image_labels, keys) >= 0
            self._labelled = self._labelled.to(keys.device) + labelled.sum()
            self._looked_up = self._looked_up.to(keys.device) + labelled.numel()

        if self.w_proto:
            text_labels = _lookup(self.text_labels, keys)
            image_labels = _lookup(self.image_labels, keys)
            image_prototypes = self.image_centroids_from_text if self.pbt else self.text_centroids
            text_prototypes = self.text_centroids_from_image if self.pbt else self.image_centroids
            loss_i2t, acc_i2t = self._prototype_loss(
                image_proto, image_prototypes, self.text_centroids, text_labels, self.target_temperature
            )
            loss_t2i, acc_t2i = self._prototype_loss(
                text_proto, text_prototypes, self.image_centroids, image_labels, self.target_temperature
            )
            terms["proto_loss"] = self.w_proto * 0.5 * (loss_i2t + loss_t2i)
            self._diagnostics.update({"protoclip/acc_img2text": acc_i2t, "protoclip/acc_text2img": acc_t2i})
        if self.w_proto_external and self.pbt and self.has_external:
            external_labels = _lookup(self.external_labels, keys)
            loss_i2e, acc_i2e = self._prototype_loss(
                image_proto, self.image_centroids_from_external, None, external_labels, -1.0
            )
            loss_t2e, acc_t2e = self._prototype_loss(
                text_proto, self.text_centroids_from_external, None, external_labels, -1.0
            )
            terms["proto_external_loss"] = self.w_proto_external * 0.5 * (loss_i2e + loss_t2e)
            self._diagnostics.update({"protoclip/acc_img2external": acc_i2e, "protoclip/acc_text2external": acc_t2e})
        return terms

    def _prototype_loss(
        self,
        student: torch.Tensor,
        student_prototypes: torch.Tensor,
        teacher_centroids: torch.Tensor | None,
        labels: torch.Tensor,
        target_temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE over the k prototypes, accuracy in %) on rows with a label; student: [N, d], labels: [N]."""
        valid = labels >= 0
        if not bool(valid.any()):
            return zero_with_grad(student), student.new_zeros(())
        student, labels = student[valid], labels[valid]
        logits = self.proto_scale() * student @ student_prototypes.to(student.dtype).T
        if target_temperature > 0 and teacher_centroids is not None:  # soft targets over the teacher's centroids
            teacher_centroids = teacher_centroids.to(student.dtype)
            targets = torch.softmax(teacher_centroids[labels] @ teacher_centroids.T / target_temperature, dim=1)
            loss = soft_cross_entropy(targets, logits)
        else:
            loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean() * 100
        return loss, accuracy

    def log_values(self) -> dict[str, float]:
        values = {name: float(value) for name, value in self._diagnostics.items()}
        values["temperature"] = float(1.0 / self.scale().detach())
        values["protoclip/temperature_proto"] = float(1.0 / self.proto_scale().detach())
        return values


def _lookup(table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """table[indices], -1 where an index is outside the table (a row the clustering did not see)."""
    inside = (indices >= 0) & (indices < table.numel())
    labels = torch.full_like(indices, -1)
    labels[inside] = table[indices[inside]]
    return labels
