"""Building what the loop needs from the config: corpus, device, teacher features, checks, data loader."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from protorkd.config import Config, DataConfig, LossConfig, ModelConfig
from protorkd.data.demo import ensure_demo_corpus
from protorkd.data.sampling import EpisodeSampler
from protorkd.data.transforms import image_transform
from protorkd.data.tsv import CsvCorpus, collate, read_corpus_table
from protorkd.distributed import DistState
from protorkd.errors import UsageError
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.teachers import TeacherDef, build_teacher_tower, tower_info
from protorkd.train.teacher_cache import (
    TeacherFeatures,
    build_teacher_cache,
    corpus_hash,
    image_loader,
    resolve_cache_folder,
)

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    images: list[str]
    captions: list[str]
    source: str  # the CSV path (or shard pattern), as users know it
    default_eval_root: Path | None
    shards: str | None = None  # a webdataset shard pattern: streamed, no per-row lists
    samples_per_epoch: int | None = None

    @property
    def rows(self) -> int:
        return self.samples_per_epoch if self.shards else len(self.images)


def is_webdataset(cfg: DataConfig) -> bool:
    if cfg.dataset_type != "auto":
        return cfg.dataset_type == "webdataset"
    data = cfg.train_data or ""
    return data.endswith(".tar") or ".tar::" in data or ("{" in data and ".tar" in data)


def resolve_corpus(cfg: DataConfig) -> Corpus:
    """The training CSV, webdataset shards, or the built-in demo corpus (generated and cached on first use)."""
    if cfg.train_data is not None and is_webdataset(cfg):
        from protorkd.data.webdataset_corpus import expand_shards

        if not cfg.train_num_samples:
            raise UsageError("a webdataset corpus needs --train-num-samples N (samples per epoch)")
        expand_shards(cfg.train_data)  # names no shard, or missing shards: a clear error now
        return Corpus([], [], cfg.train_data, None, shards=cfg.train_data, samples_per_epoch=cfg.train_num_samples)
    if cfg.train_data is None:
        root = ensure_demo_corpus(cfg.demo_size, cfg.demo_seed)
        csv_path = root / "train.tsv"
        eval_root: Path | None = root / "eval"
    else:
        csv_path = Path(cfg.train_data)
        eval_root = None
    images, captions = read_corpus_table(
        csv_path, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator, cfg.dataset_size
    )
    return Corpus(images, captions, str(csv_path), eval_root)


def check_batch_fits(rows: int, episode_size: int, world_size: int, batch_size: int) -> None:
    per_process = -(-(episode_size if episode_size > 0 else rows) // world_size)
    if per_process < batch_size:
        raise UsageError(
            f"an epoch has {per_process} samples per process, fewer than --batch-size {batch_size}; "
            "lower --batch-size or use more data"
        )


def resolve_device(name: str, state: DistState) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and state.distributed:
        name = f"cuda:{state.local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
        if device.index is None:  # set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


# Keys under which separate locked teachers' features reach the loss (`LossInputs.extra`); CLIP-KD's
# teachers read them (see `protorkd.losses` and `protorkd.losses.clip_kd.ClipTeacher`).
CLIP_IMAGE_KEY = "teacher_image_features"
CLIP_TEXT_KEY = "teacher_text_features"
CLIP_LOGIT_SCALE_KEY = "teacher_logit_scale"
TEXT_TEACHER_KEY = "text_teacher_features"
TEACHER_FLAGS = {
    CLIP_IMAGE_KEY: "--clip-teacher-model",
    CLIP_TEXT_KEY: "--clip-teacher-model",
    TEXT_TEACHER_KEY: "--extra-text-teacher",
}


@dataclass
class Teachers:
    """The run's cached teacher features.

    tower: backbone features [U, D] of the student's own locked tower (`--teacher text|image`); the loop
        feeds them to the model instead of running that tower.
    extra: features of separate locked teachers (a CLIP teacher, a text teacher), by the `LossInputs.extra`
        key the loss reads them under.
    scalars: per-run constants for the loss, e.g. a CLIP teacher's "teacher_logit_scale".
    """

    tower: TeacherFeatures | None = None
    extra: dict[str, TeacherFeatures] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)

    @property
    def bad_rows(self) -> set[int]:
        rows: set[int] = set()
        for features in (self.tower, *self.extra.values()):
            if features is not None:
                rows |= features.bad_rows
        return rows

    def extra_inputs(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """{key: [B, D_key] features of corpus rows `indices`} plus the scalars as 0-d tensors."""
        inputs = {key: features.lookup(indices).to(device, non_blocking=True) for key, features in self.extra.items()}
        inputs.update({key: torch.tensor(value, device=device) for key, value in self.scalars.items()})
        return inputs


def teacher_definitions(cfg: ModelConfig) -> list[tuple[TeacherDef, str | None]]:
    """Every locked teacher whose features the run caches, with the `extra` key they reach the loss under
    (None for the student's own locked tower, whose cached backbone features replace running it)."""
    definitions: list[tuple[TeacherDef, str | None]] = []
    if cfg.teacher == "text":
        text = TeacherDef(
            "text",
            "text",
            cfg.text_model_builder,
            cfg.text_model,
            cfg.text_model_tag,
            cfg.text_pooler,
            cfg.max_seq_length,
        )
        definitions.append((text, None))
    elif cfg.teacher == "image":
        image = TeacherDef(
            "image", "image", cfg.image_model_builder, cfg.image_model, cfg.image_model_tag, image_size=cfg.image_size
        )
        definitions.append((image, None))
    if cfg.clip_teacher_model:
        model, tag = cfg.clip_teacher_model, cfg.clip_teacher_tag
        definitions.append((TeacherDef("clip-image", "image", "open_clip", model, tag), CLIP_IMAGE_KEY))
        definitions.append((TeacherDef("clip-text", "text", "open_clip", model, tag), CLIP_TEXT_KEY))
    if cfg.extra_text_teacher:
        extra = TeacherDef("extra-text", "text", cfg.extra_text_teacher_builder, cfg.extra_text_teacher)
        definitions.append((extra, TEXT_TEACHER_KEY))
    return definitions


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
            p = self.get().preprocess  # the teacher's own preprocessing, never the student's
            self._transform = image_loader(
                image_transform(p.image_size, p.mean, p.std, train=False, interpolation=p.interpolation)
            )
        return self._transform(path)


@torch.no_grad()
def cached_teacher_features(
    definition: TeacherDef,
    corpus: Corpus,
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
        load=None if text else lazy.load_image,
        batch_size=batch_size,
        progress=progress,
        info=lambda: tower_info(lazy.get()),
    )


def load_teachers(
    model: DualEncoder, corpus: Corpus, cfg: ModelConfig, cache_root: Path, device: torch.device, *, progress: bool
) -> Teachers:
    """Every teacher's features for the run (computed once per corpus and teacher, then read from the cache)."""
    definitions = teacher_definitions(cfg)
    teachers = Teachers()
    for definition, key in definitions:
        own_tower = None
        if key is None:
            own_tower = model.text_tower if definition.modality == "text" else model.image_tower
        features = cached_teacher_features(
            definition, corpus, cache_root, device, tower=own_tower, needed=len(definitions), progress=progress
        )
        log.info(
            "teacher %s features: %s (%d unique x %d)",
            definition.name,
            features.folder,
            features.features.shape[0],
            features.dim,
        )
        if key is None:
            teachers.tower = features
        else:
            teachers.extra[key] = features
        if key == CLIP_TEXT_KEY and "logit_scale" in features.info:
            teachers.scalars[CLIP_LOGIT_SCALE_KEY] = float(features.info["logit_scale"])
    return teachers


def loss_config_for_teachers(cfg: LossConfig, teachers: Teachers) -> LossConfig:
    """Tell the loss the widths of the separate teachers' features (CLIP-KD builds its projections from them)."""
    changes: dict[str, int] = {}
    clip, text = teachers.extra.get(CLIP_TEXT_KEY), teachers.extra.get(TEXT_TEACHER_KEY)
    if clip is not None:
        if cfg.clip_kd_teacher_dim > 0 and cfg.clip_kd_teacher_dim != clip.dim:
            raise UsageError(
                f"--clip-kd-teacher-dim {cfg.clip_kd_teacher_dim}: the CLIP teacher's features are {clip.dim}-d "
                "(leave the flag at -1 to read the width from the teacher)"
            )
        changes["clip_kd_teacher_dim"] = clip.dim
    elif text is not None:
        changes["clip_kd_teacher_dim"] = 0  # a text-only teacher
    if text is not None:
        changes["clip_kd_text_teacher_dim"] = text.dim
    return dataclasses.replace(cfg, **changes)


def check_teacher_inputs(loss: torch.nn.Module, provided: set[str], loss_name: str) -> None:
    """The separate teachers' features the loss reads must be provided, and none provided may go unused."""
    main = getattr(loss, "main", loss)
    required = {key for t in getattr(main, "teachers", ()) for key in (t.image_key, t.text_key)}
    missing = sorted(required - provided)
    if missing:
        flags = sorted({TEACHER_FLAGS.get(key, key) for key in missing})
        raise UsageError(
            f"--loss {loss_name} distils from locked teacher features ({', '.join(missing)}); give {' / '.join(flags)} "
            "(e.g. --clip-teacher-model ViT-B-32 --clip-teacher-tag openai, or --extra-text-teacher all-MiniLM-L6-v2)"
        )
    unused = sorted({TEACHER_FLAGS[key] for key in provided - required})
    if unused:
        raise UsageError(f"{', '.join(unused)}: --loss {loss_name} does not use these teachers (CLIP-KD does)")


def check_auxiliary_inputs(cfg: Config, model: DualEncoder) -> None:
    """SimCSE needs a second dropout pass of an online text tower; BYOL a second view through the image tower."""
    if cfg.loss.w_simcse and (model.lock_text or cfg.model.teacher == "text"):
        raise UsageError(
            "--w-simcse needs an online, trainable text tower, but the text tower is locked "
            "(--teacher text or --lock-text-model) and its features may come from the cache; "
            "use --teacher image or --teacher none"
        )
    if cfg.loss.byol and cfg.model.teacher == "image":
        raise UsageError(
            "--byol needs the image tower to run on a second view, but --teacher image caches its features"
        )


@dataclass
class _ShardSource:
    """Stands in for CsvCorpus where bad samples arrive already described ('shard 00003.tar key ...')."""

    pattern: str

    def describe(self, source: int | str) -> str:
        return str(source)


def make_loader(
    corpus: Corpus,
    model: DualEncoder,
    cfg: Config,
    state: DistState,
    *,
    load_images: bool,
    bad_rows: set[int],
    views: int = 1,
    pin_memory: bool = False,
) -> tuple[DataLoader, EpisodeSampler, CsvCorpus]:
    """The one place that turns the corpus into batches (a webdataset reader belongs here too).

    Batches are `collate`'s dicts: indices [b], captions, images [b, 3, H, W] unless `load_images` is False,
    and images_view2 (a second augmented view) when `views` is 2 (BYOL).
    """
    p = model.image_preprocess
    transform = image_transform(
        p.image_size, p.mean, p.std, train=True, augmentation=cfg.data.augmentation, interpolation=p.interpolation
    )
    if corpus.shards:
        from protorkd.data.webdataset_corpus import webdataset_loader

        if views != 1:
            raise UsageError("--byol needs a TSV corpus (a webdataset stream yields one view per sample)")
        loader = webdataset_loader(
            corpus.shards,
            image_transform=transform,
            batch_size=cfg.optim.batch_size,
            num_samples=corpus.samples_per_epoch,
            workers=cfg.data.workers,
            seed=cfg.optim.seed,
            rank=state.rank,
            world_size=state.world_size,
        )
        return loader, loader, _ShardSource(corpus.shards)
    dataset = CsvCorpus(
        corpus.images,
        corpus.captions,
        transform,
        load_images=load_images,
        views=views,
        source=corpus.source,
        bad_rows=bad_rows,
        seed=cfg.optim.seed,
    )
    sampler = EpisodeSampler(
        len(dataset), cfg.data.episode_size, seed=cfg.optim.seed, rank=state.rank, world_size=state.world_size
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size,
        sampler=sampler,
        num_workers=cfg.data.workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=cfg.data.workers > 0,
        prefetch_factor=4 if cfg.data.workers > 0 else None,
    )
    return loader, sampler, dataset
