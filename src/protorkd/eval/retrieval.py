"""Image-text retrieval recall@K with several captions per image, computed in blocks.

Image->text is a hit when any of the image's captions ranks in the top K; text->image when its image does
(the CLIP / ALBEF protocol, CLIP_benchmark's `zeroshot_retrieval`). Exact ties are resolved in expectation
(`eval.ranking`), so a model whose embeddings are all equal scores chance. Similarities are computed
`block` rows at a time, so COCO's 5k x 25k never needs the full matrix; each image's captions are looked
up through a padded index, not a [B, T] mask.
"""

from __future__ import annotations

import torch

from protorkd.eval.datasets import CaptionedImages
from protorkd.eval.features import image_features, text_features
from protorkd.eval.ranking import hit_probability
from protorkd.precision import Precision


def _captions_of_images(text_to_image: torch.Tensor, n_images: int) -> torch.Tensor:
    """[I, max captions per image] caption indices, padded with -1."""
    counts = torch.bincount(text_to_image, minlength=n_images)
    order = torch.argsort(text_to_image, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order)) - starts[text_to_image[order]]
    table = torch.full((n_images, max(int(counts.max()), 1)), -1, dtype=torch.long)
    table[text_to_image[order], slot] = order
    return table


def retrieval_hits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    block: int = 1024,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Expected hits per query: ({"image_to_text_R@K": [I]}, {"text_to_image_R@K": [T]}), float64.

    image_features [I, D], text_features [T, D] (normalised); text_to_image [T]: the image of each caption.
    A caption's rank counts the images scoring strictly above its own, an image's rank the captions
    scoring strictly above its best caption; candidates tied with that score are ordered at random in
    expectation (`ranking.hit_probability`). An image without captions has NaN hits (left out of image->text).
    """
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    text_to_image = text_to_image.long()
    text_hits = {k: torch.empty(n_texts, dtype=torch.float64) for k in ks}
    for start in range(0, n_texts, block):
        sims = text_features[start : start + block] @ image_features.T  # [b, I]
        positive = sims.gather(1, text_to_image[start : start + block, None])
        better = (sims > positive).sum(dim=1)
        tied = (sims == positive).sum(dim=1) - 1
        for k in ks:
            text_hits[k][start : start + block] = hit_probability(better, tied, 1, k)
    captions = _captions_of_images(text_to_image, n_images)
    image_hits = {k: torch.empty(n_images, dtype=torch.float64) for k in ks}
    for start in range(0, n_images, block):
        sims = image_features[start : start + block] @ text_features.T  # [b, T]
        own = captions[start : start + block]
        own_sims = sims.gather(1, own.clamp(min=0)).masked_fill(own < 0, float("-inf"))
        best = own_sims.max(dim=1, keepdim=True).values
        tied_positives = (own_sims == best).sum(dim=1)
        better = (sims > best).sum(dim=1)
        tied_negatives = (sims == best).sum(dim=1) - tied_positives
        for k in ks:
            image_hits[k][start : start + block] = hit_probability(better, tied_negatives, tied_positives, k)
    no_caption = captions[:, 0] < 0
    return (
        {f"image_to_text_R@{k}": image_hits[k].masked_fill(no_caption, float("nan")) for k in ks},
        {f"text_to_image_R@{k}": text_hits[k] for k in ks},
    )


def recall_metrics(image_hits: dict[str, torch.Tensor], text_hits: dict[str, torch.Tensor]) -> dict[str, float]:
    """Recall@K (%) both ways from `retrieval_hits`, and `mean_recall`, their mean."""
    metrics = {name: 100.0 * hits[~hits.isnan()].mean().item() for name, hits in image_hits.items()}
    metrics.update({name: 100.0 * hits.mean().item() for name, hits in text_hits.items()})
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    block: int = 1024,
) -> dict[str, float]:
    """Recall@K (%) both ways, and their mean (`retrieval_hits`, `recall_metrics`)."""
    return recall_metrics(*retrieval_hits(image_features, text_features, text_to_image, ks=ks, block=block))


def encode_captioned_images(
    model: torch.nn.Module,
    dataset: CaptionedImages,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    workers: int = 0,
    precision: Precision = Precision.FP32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features [I, D], caption features [T, D]) of a `CaptionedImages` dataset."""
    images, _ = image_features(
        model,
        dataset,
        device=device,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        desc="retrieval images",
    )
    texts = text_features(model, dataset.captions, device=device, batch_size=batch_size, precision=precision)
    return images, texts


def evaluate(
    model: torch.nn.Module,
    dataset: CaptionedImages,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    workers: int = 0,
    precision: Precision = Precision.FP32,
) -> dict[str, float]:
    """Retrieval metrics of `model` on a `CaptionedImages` dataset."""
    images, texts = encode_captioned_images(
        model, dataset, device=device, batch_size=batch_size, workers=workers, precision=precision
    )
    return retrieval_metrics(images, texts, dataset.caption_image)
