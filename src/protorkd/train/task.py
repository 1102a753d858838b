"""`Task`: the one owner of what a training batch becomes, from its rows to the loss terms.

The path of one batch (`Task.forward`):

1. `inputs`: the model's forward arguments. A locked tower whose features are cached is not run: its cached
   backbone features go in instead (`Teachers.tower`); otherwise tokens and images move to the device
   (channels_last images, bf16 under `--precision bf16`), plus the second image view (BYOL) and the second
   text dropout pass (SimCSE) when the loss needs them.
2. mixup (`--mixup-alpha`): this batch's lam, a function of (seed, batch number, rank), mixes the images.
3. under the run's `Precision.autocast`: the dual encoder's forward -> `Features`; the separate locked
   teachers' features of the batch's rows (cached, or an online teacher on the student's own images);
   `LossInputs` (the joint features in fp32); the loss's flat dict of weighted terms and their sum.

`encode` is the same forward for ProtoCLIP's extraction pass: the model in eval mode, no gradients.
A batch may have no rows on this rank (all its samples were unreadable). Under DDP such a rank still runs
the step with zero rows, so that it takes part in every collective (the loss's gathers, DDP's gradient
all-reduce); `global_rows` tells every rank whether any rank has rows at all.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from protorkd import distributed
from protorkd.config import Config
from protorkd.data.corpus import Corpus, ShardCorpus, TsvCorpus
from protorkd.data.decoded_corpus import decode_image
from protorkd.data.images import read_image
from protorkd.data.mixup import Mixup, mix_images, run_mixup
from protorkd.data.transforms import train_transform
from protorkd.distributed import DistState
from protorkd.losses import build_loss
from protorkd.losses.base import ClusteringLoss, LossInputs, LossModule, LossNeeds
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.features import Features
from protorkd.models.options import TeacherSide
from protorkd.precision import Precision
from protorkd.teachers.caption_ensemble import caption_ensemble
from protorkd.teachers.features import Teachers, ViewRecipe, load_teachers, teacher_definitions

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """One batch's forward: its features, the loss's weighted terms, and their sum (what backward runs on)."""

    features: Features
    terms: dict[str, torch.Tensor]
    total: torch.Tensor


@dataclass
class MicroBatch:
    """One micro-batch of an --accum-freq group: the batch, the model's inputs (images already mixed), and its
    features and separate teachers' features (fp32) from a forward without gradients."""

    batch: dict
    inputs: dict
    features: Features
    separate_teachers: dict[str, torch.Tensor]
    mixup_lams: torch.Tensor | None


@dataclass
class Task:
    """The model, its teachers, the loss, mixup and the precision of a run (not the optimizer: `Run` holds it).

    `train_model` is `model` as trained (DDP- and/or compile-wrapped); the extraction pass uses `model` itself.
    """

    model: DualEncoder
    teachers: Teachers
    teacher: TeacherSide
    loss: LossModule
    precision: Precision
    device: torch.device
    mixup: Mixup | None = None
    rank: int = 0
    train_model: torch.nn.Module | None = None

    @property
    def needs(self) -> LossNeeds:
        return self.loss.needs

    @property
    def clustering_loss(self) -> ClusteringLoss | None:
        return self.loss.clustering()

    def inputs(self, batch: dict, *, extra_views: bool = True) -> dict:
        """The model's forward arguments for one batch: raw inputs, or a locked teacher tower's cached features;
        with `extra_views`, the extra passes the loss needs (a second image view, a second text dropout pass)."""
        inputs: dict = {}
        teachers, device, needs = self.teachers, self.device, self.needs
        views = batch.get("views")  # with a reinforced teacher cache: each row's stored view
        if self.teacher is TeacherSide.TEXT and teachers.tower is not None:
            inputs["text_backbone_features"] = teachers.tower.lookup(batch["indices"]).to(device, non_blocking=True)
        else:
            inputs["tokens"] = {k: v.to(device) for k, v in _tokens(self.model, batch["captions"]).items()}
            if extra_views and needs.text_dropout_view:
                inputs["text_views"] = 2
        if self.teacher is TeacherSide.IMAGE and teachers.tower is not None:
            image_features = teachers.tower.lookup(batch["indices"], views)
            inputs["image_backbone_features"] = image_features.to(device, non_blocking=True)
        else:
            keys = ("images", "images_view2") if extra_views and needs.image_view2 else ("images",)
            for key in keys:
                images = batch[key] if key in batch else _no_images(self.model)
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                inputs[key] = images.to(torch.bfloat16) if self.precision is Precision.BF16 else images
        return inputs

    def _mix(self, inputs: dict, batch: dict, batch_number: int) -> torch.Tensor | None:
        """Mix this batch's images in place in `inputs` (--mixup-alpha); the [B] lams, or None without mixup."""
        if self.mixup is None:
            return None
        lam = self.mixup.draw(batch_number, self.rank)  # every rank passes lams (1 = unmixed), as the gathers need
        inputs["images"] = mix_images(inputs["images"], lam)
        return torch.full((len(batch["indices"]),), lam, device=self.device)

    def forward(self, batch: dict, *, epoch: int, batch_number: int) -> StepOutput:
        """The forward of one training batch and its loss. `batch_number` (the batch's index in the whole run)
        seeds its mixup."""
        inputs = self.inputs(batch)
        mixup_lams = self._mix(inputs, batch, batch_number)
        with self.precision.autocast(self.device):  # the towers (and an online teacher) in the run's precision
            features: Features = (self.train_model or self.model)(**inputs)
            separate_teachers = self.teachers.extra_inputs(
                batch["indices"], self.device, images=inputs.get("images"), views=batch.get("views")
            )
        # The loss in fp32, autocast off: bf16 logits at scale 100 carry errors up to 0.3, SEED's teacher
        # temperature is 1e-4, and RKD's angles cancel badly in low precision.
        loss_inputs = self._loss_inputs(batch, features.float(), separate_teachers, epoch, mixup_lams)
        terms = self.loss(loss_inputs)
        total = sum(terms.values())
        return StepOutput(features, terms, total)

    # --- --accum-freq > 1, as open_clip: every micro-batch is encoded once without gradients; at the group's
    # last micro-batch the loss of the whole accumulated batch is computed once per micro-batch, that micro-batch
    # re-encoded with gradients and the others' cached features standing in, and each is backpropagated.
    def encode_micro_batch(self, batch: dict, *, batch_number: int) -> MicroBatch:
        """One micro-batch of an accumulation group through the model without gradients (train mode)."""
        inputs = self.inputs(batch)
        mixup_lams = self._mix(inputs, batch, batch_number)
        with torch.no_grad(), self.precision.autocast(self.device):
            features: Features = (self.train_model or self.model)(**inputs)
            separate = self.teachers.extra_inputs(
                batch["indices"], self.device, images=inputs.get("images"), views=batch.get("views")
            )
        return MicroBatch(batch, inputs, features.float(), {k: v.float() for k, v in separate.items()}, mixup_lams)

    def forward_accumulated(self, group: list[MicroBatch], index: int, *, epoch: int) -> StepOutput:
        """The loss of the whole group, micro-batch `index` re-encoded with gradients and the others' cached
        features in their places. Summed over every `index`, the gradients are those of one big batch on the model;
        the loss's own parameters get the whole gradient from every call (the caller divides by the group size).
        Only the last call updates the loss's state (`LossInputs.update_state`)."""
        with self.precision.autocast(self.device):
            fresh: Features = (self.train_model or self.model)(**group[index].inputs)
        parts = [micro.features for micro in group]
        parts[index] = fresh.float()
        rows = {key: torch.cat([micro.batch[key] for micro in group]) for key in ("indices", "positions")
                if key in group[0].batch}  # fmt: skip
        separate = {
            key: torch.cat([micro.separate_teachers[key] for micro in group]) for key in group[0].separate_teachers
        }
        lams = None if group[0].mixup_lams is None else torch.cat([micro.mixup_lams for micro in group])
        loss_inputs = self._loss_inputs(rows, _concatenated(parts), separate, epoch, lams)
        loss_inputs.mixup_groups = [len(micro.batch["indices"]) for micro in group]
        loss_inputs.update_state = index == len(group) - 1
        terms = self.loss(loss_inputs)
        return StepOutput(fresh, terms, sum(terms.values()))

    def _loss_inputs(
        self,
        batch: dict,
        features: Features,
        separate_teachers: dict[str, torch.Tensor],
        epoch: int,
        mixup_lams: torch.Tensor | None,
    ) -> LossInputs:
        """What the loss sees of one batch: fp32 features, the rows' ids, the separate teachers' features."""
        return LossInputs(
            image_features=features.image,
            text_features=features.text,
            image_features_unnormalized=features.image_unnormalized,
            text_features_unnormalized=features.text_unnormalized,
            teacher=self.teacher,
            indices=batch["indices"].to(self.device),
            epoch=epoch,
            positions=batch["positions"].to(self.device) if "positions" in batch else None,
            image_features_view2=features.image_view2,
            text_features_dropout=features.text_dropout,
            image_proto_features=features.image_proto,
            text_proto_features=features.text_proto,
            separate_teachers={key: value.float() for key, value in separate_teachers.items()},
            mixup_lams=mixup_lams,
        )

    @torch.inference_mode()
    def encode(self, batch: dict, *, precision: Precision | None = None) -> Features:
        """One batch through `model` in eval mode without gradients (ProtoCLIP's extraction pass): BatchNorm's
        running statistics and no dropout, nothing trained. By default in the fastest inference precision
        (`Precision.fastest_inference`: only a coarse accuracy is needed before k-means)."""
        was_training = self.model.training
        self.model.eval()
        try:
            inputs = self.inputs(batch, extra_views=False)
            with (precision or Precision.fastest_inference(self.device)).autocast(self.device):
                return self.model(**inputs)
        finally:
            self.model.train(was_training)


def build_task(
    cfg: Config,
    state: DistState,
    device: torch.device,
    corpus: Corpus,
    model: DualEncoder,
    cache_root: Path,
    precision: Precision,
    in_memory_size: int | None = None,
) -> Task:
    """The teachers' features (computed once, or read from the cache), the loss built with their widths, mixup.
    `in_memory_size`: the side of the in-memory corpus' decoded images, which stored views are drawn on."""
    teacher = cfg.model.teacher_side
    started = time.perf_counter()
    recipe = view_recipe(cfg, model, in_memory_size) if cfg.model.teacher_views > 0 else None
    teachers = _load_teachers(cfg, corpus, model, cache_root, state, device, recipe)
    if cfg.data.caption_ensemble:  # streamed shards have no rows (and so no cached tower): refused inside
        rows = corpus.images if isinstance(corpus, TsvCorpus) else []
        teachers.tower = caption_ensemble(teachers.tower, rows, teacher)
    log.info("teacher features ready in %.1f s", time.perf_counter() - started)
    loss = build_loss(cfg.loss.loss, cfg.loss, model.embed_dim, teacher_dims=teachers.dims, seed=cfg.optim.seed)
    needs = loss.needs  # checked against the run before the teachers ran (`checks.check_before_teachers`)
    images_trained = teacher is not TeacherSide.IMAGE or teachers.tower is None
    mixup = run_mixup(cfg.data.mixup_alpha, cfg.data.mixup_prob, cfg.optim.seed, loss_name=cfg.loss.loss,
                      loss_accepts=needs.accepts_mixup, images_trained=images_trained)  # fmt: skip
    return Task(model, teachers, teacher, loss, precision, device, mixup, rank=state.rank)


def view_recipe(cfg: Config, model: DualEncoder, in_memory_size: int | None) -> ViewRecipe:
    """How this run's reinforced cache draws its views: its training transform, on the source images its data path
    gives that transform (the file, or the in-memory corpus' decoded square)."""
    preprocess = model.image_preprocess
    max_pixels = cfg.data.max_image_pixels
    if in_memory_size is not None:
        source = f"decoded {in_memory_size} px square"

        def load(path: str) -> torch.Tensor:
            decoded = decode_image(path, in_memory_size, max_pixels)
            if isinstance(decoded, str):
                raise ValueError(decoded)
            return decoded

    else:
        source = "file"

        def load(path: str):
            return read_image(path, max_pixels, lambda image: image.copy())

    spec = {
        "augmentation": cfg.data.augmentation or "default",
        "image_size": preprocess.image_size,
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "interpolation": preprocess.interpolation,
        "source": source,
    }
    transform = train_transform(preprocess, cfg.data.augmentation)
    return ViewRecipe(cfg.model.teacher_views, cfg.model.teacher_views_seed, transform, spec, load)


def _load_teachers(
    cfg: Config,
    corpus: Corpus,
    model: DualEncoder,
    cache_root: Path,
    state: DistState,
    device: torch.device,
    recipe: ViewRecipe | None = None,
) -> Teachers:
    """Every locked teacher's features, computed once (the master first, then the others read its cache)."""
    definitions = teacher_definitions(cfg.model)
    # streamed samples have no rows to key a cache by: the student's towers run online (separate teachers were
    # refused by `checks.check_before_teachers`)
    if isinstance(corpus, ShardCorpus) or not definitions:
        return Teachers()
    teachers = Teachers()
    if state.is_master:
        teachers = load_teachers(model, corpus, cfg.model, cache_root, device, progress=True, views=recipe)
    distributed.barrier()
    if not state.is_master:
        teachers = load_teachers(model, corpus, cfg.model, cache_root, device, progress=False, views=recipe)
    return teachers


def _concatenated(parts: list[Features]) -> Features:
    """The micro-batches' features one after the other, field by field ([sum B_j, D]; None stays None)."""
    fields = [field.name for field in dataclasses.fields(Features)]
    values = {name: [getattr(part, name) for part in parts] for name in fields}
    return Features(**{name: None if tensors[0] is None else torch.cat(tensors) for name, tensors in values.items()})


def _cat_rows(values: list[torch.Tensor]) -> torch.Tensor:
    """Per-row values one after the other; a per-run scalar (0-d, a teacher's logit scale) once."""
    return values[0] if values[0].dim() == 0 else torch.cat(values)


def _tokens(model: DualEncoder, captions: list[str]) -> dict[str, torch.Tensor]:
    """The text tower's tokens; zero rows for an empty batch (not every tokenizer accepts an empty list)."""
    if captions:
        return model.tokenize(captions)
    return {key: value[:0] for key, value in model.tokenize([""]).items()}


def _no_images(model: DualEncoder) -> torch.Tensor:
    """[0, 3, S, S]: the images of a batch whose samples were all unreadable."""
    size = model.image_preprocess.image_size
    return torch.zeros(0, 3, size, size)


def global_rows(batch: dict, device: torch.device) -> int:
    """Rows of this batch summed over every rank (one small all-reduce under DDP; the local count otherwise)."""
    local = len(batch["indices"])
    if not distributed.is_initialized():
        return local
    return int(distributed.all_reduce_sum(torch.tensor(local, device=device)))


__all__ = ["MicroBatch", "StepOutput", "Task", "build_task", "global_rows"]
