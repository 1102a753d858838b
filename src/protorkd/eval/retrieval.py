"""Image-text retrieval recall@K with several captions per image, computed in blocks."""

from __future__ import annotations

import torch


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    block: int = 1024,
) -> dict[str, float]:
    """Recall@K (%) both ways.

    image_features [I, D], text_features [T, D] (normalised); text_to_image [T]: the image of each caption.
    Image->text is a hit when any of the image's captions ranks in the top K; text->image when its image
    does. Similarities are computed `block` rows at a time, so 5k x 25k needs no full matrix.
    """
    n_images = image_features.shape[0]
    image_rank = torch.empty(n_images, dtype=torch.long)
    text_rank = torch.empty(text_features.shape[0], dtype=torch.long)
    for start in range(0, text_features.shape[0], block):
        sims = text_features[start : start + block] @ image_features.T  # [b, I]
        target = text_to_image[start : start + block]
        positive = sims.gather(1, target[:, None])
        text_rank[start : start + block] = (sims > positive).sum(dim=1)
    for start in range(0, n_images, block):
        sims = image_features[start : start + block] @ text_features.T  # [b, T]
        owners = text_to_image[None, :] == torch.arange(start, start + sims.shape[0])[:, None]
        best_positive = sims.masked_fill(~owners, float("-inf")).max(dim=1).values
        image_rank[start : start + block] = (sims > best_positive[:, None]).sum(dim=1)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = 100.0 * (image_rank < k).float().mean().item()
        metrics[f"text_to_image_R@{k}"] = 100.0 * (text_rank < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics
