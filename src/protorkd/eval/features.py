"""Batched feature extraction under no_grad (autocast on CUDA)."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


def autocast_for(device: torch.device | str) -> contextlib.AbstractContextManager:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def image_features(
    model, dataset: Dataset, *, device: torch.device | str, batch_size: int = 256, workers: int = 0,
    normalize: bool = True, desc: str = "images",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on CPU, labels [N]) for a dataset of (image tensor, label) pairs.

    normalize=True gives joint-space features (`encode_image`); False gives the image tower's
    backbone features (the linear-probe protocol).
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    features, labels = [], []
    was_training = model.training
    model.eval()
    try:
        for images, targets in tqdm(loader, desc=desc, leave=False, disable=None, mininterval=2.0):
            images = images.to(device, non_blocking=True)
            with autocast_for(device):
                output = model.encode_image(images) if normalize else model.image_backbone(images)
            features.append(output.float().cpu())
            labels.append(torch.as_tensor(targets))
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def text_features(
    model, texts: list[str], *, device: torch.device | str, batch_size: int = 256
) -> torch.Tensor:
    """[N] strings -> [N, D] normalised joint text features (float32, CPU)."""
    was_training = model.training
    model.eval()
    try:
        outputs = []
        for start in range(0, len(texts), batch_size):
            with autocast_for(device):
                outputs.append(model.encode_texts(texts[start : start + batch_size], device=device).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0, model.embed_dim)
