"""The experiment directory: its name, its layout, and refusing to overwrite one."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from protorkd.config import Config
from protorkd.errors import UsageError


@dataclass(frozen=True)
class ExperimentPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def log_file(self) -> Path:
        return self.root / "out.log"

    @property
    def params(self) -> Path:
        return self.root / "params.txt"

    def create(self) -> None:
        for folder in (self.root, self.checkpoints, self.cache):
            folder.mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def default_name(cfg: Config, world_size: int) -> str:
    """`{L|U}-{image model}-h{n}-{L|U}-{text model}-h{n}-{loss}-b{global batch}-ep{epochs}-{time}` (L = locked)."""
    lock_image, lock_text = cfg.model.locks
    image = cfg.model.image_model.replace("/", "-")
    text = Path(cfg.model.text_model).name.replace("/", "-")
    return (
        f"{'L' if lock_image else 'U'}-{image}-h{cfg.model.image_head_n_layers}-"
        f"{'L' if lock_text else 'U'}-{text}-h{cfg.model.text_head_n_layers}-{cfg.loss.loss}-"
        f"b{cfg.optim.batch_size * world_size}-ep{cfg.optim.epochs}-{time.strftime('%m_%d-%H_%M_%S')}"
    )


def experiment_paths(cfg: Config, world_size: int) -> ExperimentPaths:
    """Where this run writes. An existing experiment is refused unless the run resumes it."""
    name = cfg.log.name or default_name(cfg, world_size)
    paths = ExperimentPaths(Path(cfg.log.logs) / name)
    if paths.root.exists() and not cfg.log.resume and any(paths.root.iterdir()):
        raise UsageError(
            f"experiment {paths.root} already exists; choose another --name, or continue it with --resume latest"
        )
    return paths
