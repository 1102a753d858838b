"""ProtoCLIP's feature extraction: one pass over the current episode before training on it.

What ProtoCLIP's `feature_extraction_one_epoch` does, and how this pass keeps it cheap:

* the same episode and the same split across ranks as the training pass (`EpisodeSampler.extraction_pass`),
  through the training transform with its own augmentation draw (the original iterates its training
  DataLoader, i.e. the training augmentation, a second time); no sample is dropped (drop_last off);
* the model in eval mode (BatchNorm running statistics, no dropout), one snapshot (nothing trains during the
  pass), `torch.inference_mode`;
* bf16 autocast where the hardware computes in bf16: CUDA (fp16 on GPUs without bf16) and CPUs with
  AVX512-BF16 or AMX (a tiny-cnn forward 2.2x faster than fp32 there; elsewhere the CPU stays fp32).
  `benchmarks/bench_protoclip.py` measures what it changes: the k-means labels and back-translated
  centroids of one episode from bf16 against fp32 features;
* on CUDA: batches GPU_BATCH_FACTOR x the training batch (no activations are kept for a backward pass) and
  channels_last images. On the CPU larger batches are slower (measured: a tiny-cnn forward over 256 images
  took 1.5-2x the time of 4 batches of 64, the activations no longer fit the caches), so the pass keeps the
  training batch size there;
* a locked teacher tower is not run: its backbone features come from the feature cache and only its heads
  are applied (`train.batches.model_inputs`), so with `--teacher text` only the image tower runs.

Each batch's features are gathered onto the master's CPU (`EpisodeFeatures.add`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from protorkd.data.tsv import collate
from protorkd.precision import Precision
from protorkd.train.batches import model_inputs
from protorkd.train.clustering import ClusteringSchedule, EpisodeFeatures

if TYPE_CHECKING:
    from protorkd.train.run import Run

GPU_BATCH_FACTOR = 4


def extraction_autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 on GPUs without bf16) and on CPUs with native bf16; else nothing."""
    return (Precision.fastest_inference(device) if enabled else Precision.FP32).autocast(device)


def extraction_loader(run: Run) -> DataLoader:
    """The episode's samples for this rank, in large batches, with the extraction pass's augmentation draw."""
    loader, sampler = run.batches.loader, run.batches.sampler
    if sampler is None or not isinstance(loader, DataLoader):
        raise ValueError("a feature-extraction pass needs a TSV corpus (an episode of addressable rows)")
    workers = loader.num_workers
    return DataLoader(
        loader.dataset,
        batch_size=(GPU_BATCH_FACTOR if run.device.type == "cuda" else 1) * run.cfg.optim.batch_size,
        sampler=sampler.extraction_pass(),
        num_workers=workers,
        collate_fn=collate,
        drop_last=False,
        pin_memory=run.device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None,
    )


@torch.inference_mode()
def extract_episode_features(run: Run, schedule: ClusteringSchedule, *, low_precision: bool = True) -> EpisodeFeatures:
    """Every rank's share of the episode, through the model in eval mode; gathered on the master's CPU.
    `low_precision` False keeps fp32 (for measuring what bf16 changes)."""
    model, features = run.model, EpisodeFeatures()
    was_training = model.training
    model.eval()
    try:
        for batch in extraction_loader(run):
            inputs = model_inputs(batch, model, run.teachers, run.teacher, run.device, run.precision)
            with extraction_autocast(run.device, low_precision):
                output = model(**inputs)
            features.add_batch(schedule, batch, output)
    finally:
        model.train(was_training)
    return features
