"""A run's locked teachers: which ones the model flags ask for, and their features for a whole corpus.

`teacher_definitions(options)` lists every locked teacher whose features are cached: the student's own
locked tower (`--teacher text|image`) and separate teachers (a CLIP teacher, an extra text teacher),
each with the `LossInputs.extra` key it reaches the loss under (`teachers.keys`). `load_teachers`
computes each teacher's features once per corpus (or reads them from the cache) into a `Teachers`.

A CLIP teacher's image tower can instead run online (`--clip-teacher-images online`, CLIP-KD's way):
every step it encodes the student's own augmented batch (`OnlineImageTeacher`), so teacher and student
see the same view; its caption features stay cached (captions are not augmented). With `--teacher-views K`
an image teacher (a CLIP teacher's image tower, or the locked image tower of `--teacher image`) reads a
reinforced cache instead (`teachers.reinforced`): its features of K stored views of every image, and the
student replays the view it is given (`ViewRecipe`, `Teachers.view_replay`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from protorkd.data.corpus import TsvCorpus
from protorkd.data.transforms import PreprocessSpec, eval_transform
from protorkd.data.views import ViewReplay
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.options import ModelOptions, TeacherSide
from protorkd.precision import Precision
from protorkd.teachers.cache import (
    TeacherFeatures,
    build_teacher_cache,
    corpus_hash,
    image_loader,
    resolve_cache_folder,
)
from protorkd.teachers.definitions import TeacherDef, build_teacher_tower, tower_info
from protorkd.teachers.keys import CLIP_IMAGE_KEY, CLIP_LOGIT_SCALE_KEY, CLIP_TEXT_KEY, TEXT_TEACHER_KEY
from protorkd.teachers.reinforced import ReinforcedFeatures, build_reinforced_cache

log = logging.getLogger(__name__)


@dataclass
class Teachers:
    """The run's cached teacher features.

    tower: backbone features [U, D] of the student's own locked tower (`--teacher text|image`); the loop
        feeds them to the model instead of running that tower.
    extra: features of separate locked teachers (a CLIP teacher, a text teacher), by the `LossInputs.extra`
        key the loss reads them under.
    scalars: per-run constants for the loss, e.g. a CLIP teacher's "teacher_logit_scale".
    """

    tower: TeacherFeatures | ReinforcedFeatures | None = None
    extra: dict[str, TeacherFeatures | ReinforcedFeatures] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    online: dict[str, OnlineImageTeacher] = field(default_factory=dict)

    @property
    def bad_rows(self) -> set[int]:
        rows: set[int] = set()
        for features in (self.tower, *self.extra.values()):
            if features is not None:
                rows |= features.bad_rows
        return rows

    def view_replay(self, seed: int) -> ViewReplay | None:
        """The stored views the student's images replay (`--teacher-views`), each row's view in each epoch picked
        with the run's `seed`; None without a reinforced cache. Several reinforced caches of one run hold the
        same views (same view seed, transform and images)."""
        for features in (self.tower, *self.extra.values()):
            if isinstance(features, ReinforcedFeatures):
                return features.replay(seed)
        return None

    @property
    def keys(self) -> set[str]:
        """The `LossInputs.extra` keys of every separate teacher's features, cached or online."""
        return set(self.extra) | set(self.online)

    @property
    def dims(self) -> dict[str, int]:
        """{extra key: feature width} of the separate teachers (what CLIP-KD builds its projections from)."""
        dims = {key: features.dim for key, features in self.extra.items()}
        dims.update({key: teacher.dim for key, teacher in self.online.items()})
        return dims

    def extra_inputs(
        self,
        indices: torch.Tensor,
        device: torch.device,
        images: torch.Tensor | None = None,
        views: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{key: [B, D_key] features of corpus rows `indices`} plus the scalars as 0-d tensors; online teachers
        encode `images` ([B, 3, H, W], the student's augmented batch, normalised for the student); a reinforced
        cache reads the features of each row's stored view `views` ([B])."""
        inputs = {
            key: features.lookup(indices, views).to(device, non_blocking=True) for key, features in self.extra.items()
        }
        inputs.update({key: torch.tensor(value, device=device) for key, value in self.scalars.items()})
        for key, teacher in self.online.items():
            if images is None:
                raise ValueError(f"the online teacher {key} needs the student's images of the batch")
            inputs[key] = teacher(images)
        return inputs


def teacher_definitions(options: ModelOptions) -> list[tuple[TeacherDef, str | None]]:
    """Every locked teacher whose features the run caches, with the `extra` key they reach the loss under
    (None for the student's own locked tower, whose cached backbone features replace running it)."""
    definitions: list[tuple[TeacherDef, str | None]] = []
    side = options.teacher_side
    if side is TeacherSide.TEXT:
        text = TeacherDef(
            "text",
            "text",
            options.text_model_builder,
            options.text_model,
            options.text_model_tag,
            options.text_pooler,
            options.max_seq_length,
        )
        definitions.append((text, None))
    elif side is TeacherSide.IMAGE:
        image = TeacherDef(
            "image",
            "image",
            options.image_model_builder,
            options.image_model,
            options.image_model_tag,
            image_size=options.image_size,
        )
        definitions.append((image, None))
    if options.clip_teacher_model:
        model, tag = options.clip_teacher_model, options.clip_teacher_tag
        if options.clip_teacher_images == "cached" or options.teacher_views > 0:  # centre crops, or stored views
            definitions.append((TeacherDef("clip-image", "image", "open_clip", model, tag), CLIP_IMAGE_KEY))
        definitions.append((TeacherDef("clip-text", "text", "open_clip", model, tag), CLIP_TEXT_KEY))
    if options.extra_text_teacher:
        extra = TeacherDef("extra-text", "text", options.extra_text_teacher_builder, options.extra_text_teacher)
        definitions.append((extra, TEXT_TEACHER_KEY))
    return definitions


def online_teacher_definitions(options: ModelOptions) -> list[tuple[TeacherDef, str]]:
    """Teachers that run on every training batch instead of being cached, with their `extra` key."""
    if options.clip_teacher_model and options.clip_teacher_images == "online" and options.teacher_views == 0:
        model, tag = options.clip_teacher_model, options.clip_teacher_tag
        return [(TeacherDef("clip-image", "image", "open_clip", model, tag), CLIP_IMAGE_KEY)]
    return []


class OnlineImageTeacher:
    """A locked image tower run on the student's augmented batch (CLIP-KD feeds the teacher the student's tensor).

    "The same view" when the two towers prepare images differently: the student's normalised crop is
    un-normalised with the student's mean/std (back to [0, 1] pixels), resized with antialiased bicubic
    interpolation when the teacher's resolution differs, and normalised with the teacher's own mean/std.
    With equal resolution and statistics (CLIP-KD's setting) the teacher receives the identical tensor.
    Runs in eval mode under no_grad, in bf16 autocast on CUDA; returns float32 [B, D_teacher].
    """

    def __init__(self, tower: torch.nn.Module, student: PreprocessSpec, device: torch.device) -> None:
        self.tower = tower.to(device).eval()
        self.tower.requires_grad_(False)
        self.device = device
        self.dim = int(tower.output_dim)
        teacher = tower.preprocess
        self.size = teacher.image_size
        self.same_tensor = (student.image_size, tuple(student.mean), tuple(student.std)) == (
            teacher.image_size,
            tuple(teacher.mean),
            tuple(teacher.std),
        )

        def column(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)

        self.student_mean, self.student_std = column(student.mean), column(student.std)
        self.teacher_mean, self.teacher_std = column(teacher.mean), column(teacher.std)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H_s, W_s] normalised for the student -> [B, 3, H_t, W_t] normalised for the teacher."""
        if self.same_tensor:
            return images
        pixels = images.float() * self.student_std + self.student_mean
        if pixels.shape[-1] != self.size or pixels.shape[-2] != self.size:
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bicubic", antialias=True).clamp(0, 1)
        return (pixels - self.teacher_mean) / self.teacher_std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        view = self.view(images.to(self.device, non_blocking=True))
        if self.device.type == "cuda":
            with Precision.AMP_BF16.autocast(self.device):
                return self.tower(view.contiguous(memory_format=torch.channels_last)).float()
        return self.tower(view.float()).float()


@dataclass(frozen=True)
class ViewRecipe:
    """How a reinforced cache draws its views (`--teacher-views`): K views per image, their seed
    (`--teacher-views-seed`, the cache's own: every training seed reads the same cache), the student's
    training transform (`spec` names it and the source geometry, for the manifest), and `load`: path -> the source
    image that transform gets in training (the file's PIL image, or the in-memory corpus' decoded square)."""

    views: int
    seed: int
    transform: Callable
    spec: dict[str, Any]
    load: Callable[[str], Any]


class _LazyTower:
    """Builds (or takes) a teacher's tower on first use, so a complete cache never loads the teacher."""

    def __init__(self, definition: TeacherDef, tower: torch.nn.Module | None, device: torch.device) -> None:
        self.definition = definition
        self.tower = tower
        self.device = device
        self._moved = False
        self._transform = None

    def get(self) -> torch.nn.Module:
        if self.tower is None:
            log.info(
                "building teacher %s (%s %s)", self.definition.name, self.definition.builder, self.definition.model
            )
            self.tower = build_teacher_tower(self.definition)
        if not self._moved:
            self.tower.to(self.device)
            self._moved = True
        return self.tower

    def load_image(self, path: str) -> torch.Tensor:
        if self._transform is None:
            # the teacher's own preprocessing, never the student's
            self._transform = image_loader(eval_transform(self.get().preprocess))
        return self._transform(path)


@torch.no_grad()
def cached_teacher_features(
    definition: TeacherDef,
    corpus: TsvCorpus,
    cache_root: Path,
    device: torch.device,
    *,
    tower: torch.nn.Module | None = None,
    needed: int = 1,
    progress: bool = False,
    batch_size: int = 256,
) -> TeacherFeatures:
    """One teacher's features for the whole corpus: reused, resumed or computed (`tower` or built lazily)."""
    lazy = _LazyTower(definition, tower, device)
    spec = definition.spec(lazy.get() if definition.needs_tower_for_spec else None)
    keys = corpus.captions if definition.modality == "text" else corpus.images
    folder = resolve_cache_folder(cache_root, definition.modality, spec, corpus_hash(keys), needed=needed)

    def encode_texts(texts: list[str]) -> torch.Tensor:
        tokens = {k: v.to(device) for k, v in lazy.get().tokenize(texts).items()}
        return lazy.get()(tokens)

    def encode_images(images: list[torch.Tensor]) -> torch.Tensor:
        return lazy.get()(torch.stack(images).to(device))

    text = definition.modality == "text"
    return build_teacher_cache(
        folder,
        modality=definition.modality,
        keys=keys,
        spec=spec,
        encode=encode_texts if text else encode_images,
        dim=lambda: lazy.get().output_dim,  # the teacher's width, asked for only when a cache is started
        load=None if text else lazy.load_image,
        batch_size=batch_size,
        progress=progress,
        info=lambda: tower_info(lazy.get()),
    )


@torch.no_grad()
def reinforced_teacher_features(
    definition: TeacherDef,
    corpus: TsvCorpus,
    cache_root: Path,
    device: torch.device,
    recipe: ViewRecipe,
    student: PreprocessSpec,
    *,
    tower: torch.nn.Module | None = None,
    needed: int = 1,
    progress: bool = False,
    batch_size: int = 256,
    shard: tuple[int, int] = (0, 1),
) -> ReinforcedFeatures | None:
    """An image teacher's features of `recipe.views` stored views of every image: reused, resumed or computed.
    The teacher sees each view as the student will, prepared as an online teacher prepares the student's batch.
    With `shard` (i, N), only every N-th chunk (None until every shard has filled its own)."""
    lazy = _LazyTower(definition, tower, device)
    spec = {**definition.spec(lazy.get() if definition.needs_tower_for_spec else None), "views": recipe.spec}
    folder = resolve_cache_folder(cache_root, "image-views", spec, corpus_hash(corpus.images), needed=needed)
    online: list[OnlineImageTeacher] = []

    def encode(images: torch.Tensor) -> torch.Tensor:
        if not online:
            online.append(OnlineImageTeacher(lazy.get(), student, device))
        return online[0](images)

    return build_reinforced_cache(
        folder,
        keys=corpus.images,
        spec=spec,
        views=recipe.views,
        seed=recipe.seed,
        transform=recipe.transform,
        load=recipe.load,
        teacher_input=lambda images: images,  # `OnlineImageTeacher` prepares them for the teacher
        encode=encode,
        dim=lambda: lazy.get().output_dim,
        batch_size=batch_size,
        progress=progress,
        info=lambda: tower_info(lazy.get()),
        shard=shard,
    )


def load_teachers(
    model: DualEncoder,
    corpus: TsvCorpus,
    options: ModelOptions,
    cache_root: Path,
    device: torch.device,
    *,
    progress: bool,
    views: ViewRecipe | None = None,
) -> Teachers:
    """Every teacher's features for the run (computed once per corpus and teacher, then read from the cache);
    with `views`, an image teacher's features of stored views (`--teacher-views`).

    The run's random streams are left as they were: building a teacher tower initialises weights at random before
    loading its own, and a run whose caches are complete builds none, so without this a resumed or pre-cached run
    would draw other numbers afterwards than the run that filled its caches."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        definitions = teacher_definitions(options)
        teachers = Teachers()
        for definition, key in definitions:
            own_tower = None
            if key is None:
                own_tower = model.text_tower if definition.modality == "text" else model.image_tower
            if views is not None and definition.modality == "image":
                features = reinforced_teacher_features(
                    definition, corpus, cache_root, device, views, model.image_preprocess, tower=own_tower,
                    needed=len(definitions), progress=progress,
                )  # fmt: skip
                if features is None:  # cannot happen: one process fills every chunk
                    raise RuntimeError(f"the reinforced cache of {definition.name} was left incomplete")
            else:
                features = cached_teacher_features(
                    definition, corpus, cache_root, device, tower=own_tower, needed=len(definitions), progress=progress
                )
            log.info(
                "teacher %s features: %s (%d unique x %s)",
                definition.name,
                features.folder,
                features.features.shape[0],
                " x ".join(str(size) for size in features.features.shape[1:]),
            )
            if key is None:
                teachers.tower = features
            else:
                teachers.extra[key] = features
            if key == CLIP_TEXT_KEY and "logit_scale" in features.info:
                teachers.scalars[CLIP_LOGIT_SCALE_KEY] = float(features.info["logit_scale"])
        for definition, key in online_teacher_definitions(options):
            log.info("teacher %s runs online on the student's augmented batches", definition.name)
            teachers.online[key] = OnlineImageTeacher(build_teacher_tower(definition), model.image_preprocess, device)
        return teachers
