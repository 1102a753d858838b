"""Building what the loop needs from the config: corpus, device, teacher features, data loader."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from protorkd.config import Config, DataConfig
from protorkd.data.demo import ensure_demo_corpus
from protorkd.data.sampling import EpisodeSampler
from protorkd.data.transforms import image_transform
from protorkd.data.tsv import CsvCorpus, collate, read_corpus_table
from protorkd.distributed import DistState
from protorkd.errors import UsageError
from protorkd.models.dual_encoder import DualEncoder
from protorkd.train.teacher_cache import TeacherFeatures, build_teacher_cache, cache_folder, image_loader

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    images: list[str]
    captions: list[str]
    source: str  # the CSV path, as users know it
    default_eval_root: Path | None


def resolve_corpus(cfg: DataConfig) -> Corpus:
    """The training CSV, or the built-in demo corpus (generated and cached on first use)."""
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
        torch.cuda.set_device(device)
    return device


def teacher_spec(model: DualEncoder, modality: str, cfg: Config) -> dict:
    """What identifies a teacher's features: tower, weights, tokenisation or preprocessing."""
    m = cfg.model
    if modality == "text":
        return {
            "builder": m.text_model_builder,
            "model": m.text_model,
            "tag": m.text_model_tag,
            "pooler": m.text_pooler if m.text_model_builder == "huggingface" else "",
            "max_seq_length": m.max_seq_length,
            "tower": model.text_tower.name,
        }
    p = model.image_preprocess
    return {
        "builder": m.image_model_builder,
        "model": m.image_model,
        "tag": m.image_model_tag,
        "image_size": p.image_size,
        "mean": list(p.mean),
        "std": list(p.std),
        "tower": model.image_tower.name,
    }


def teacher_weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap hash of a tower's weights, so a cache from other weights (e.g. a local checkpoint) is refused."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items())[:64]:
        digest.update(name.encode())
        digest.update(tensor.detach().float().flatten()[:256].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def load_teacher_features(
    model: DualEncoder, corpus: Corpus, cfg: Config, cache_root: Path, device: torch.device, *, progress: bool
) -> TeacherFeatures:
    """Run the locked teacher tower over the corpus once (or reuse / resume a cache)."""
    modality = cfg.model.teacher
    spec = teacher_spec(model, modality, cfg)
    spec["weights"] = teacher_weights_fingerprint(model.text_tower if modality == "text" else model.image_tower)
    keys = corpus.captions if modality == "text" else corpus.images
    from protorkd.train.teacher_cache import corpus_hash

    folder = Path(cache_root)
    if not (folder / "manifest.json").exists():
        folder = cache_folder(cache_root, modality, spec, corpus_hash(keys))
    tower = model.text_tower if modality == "text" else model.image_tower
    tower.to(device)

    if modality == "text":

        def encode(texts: list[str]) -> torch.Tensor:
            tokens = {k: v.to(device) for k, v in model.tokenize(texts).items()}
            return model.text_backbone(tokens)

        load = None
    else:
        p = model.image_preprocess
        load = image_loader(image_transform(p.image_size, p.mean, p.std, train=False, interpolation=p.interpolation))

        def encode(images: list[torch.Tensor]) -> torch.Tensor:
            return model.image_backbone(torch.stack(images).to(device))

    return build_teacher_cache(
        folder, modality=modality, keys=keys, spec=spec, encode=encode, load=load, progress=progress
    )


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
    p = model.image_preprocess
    transform = image_transform(
        p.image_size, p.mean, p.std, train=True, augmentation=cfg.data.augmentation, interpolation=p.interpolation
    )
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
