"""Zero-shot classification: class embeddings from prompt templates, images scored against them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protorkd.eval.features import text_features


def build_zeroshot_classifier(
    model, classnames: list[str], templates: list[str], *, device: torch.device | str, batch_size: int = 256
) -> torch.Tensor:
    """[D, C]: per class, the normalised mean of its normalised template embeddings (CLIP's recipe)."""
    prompts = [template.replace("{c}", name).replace("{}", name) for name in classnames for template in templates]
    embeddings = text_features(model, prompts, device=device, batch_size=batch_size)
    embeddings = F.normalize(embeddings, dim=-1).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(embeddings, dim=-1).T


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, *, mean_per_class: bool = False) -> dict[str, float]:
    """top1, top5 (%), and mean per-class recall (%) for logits [N, C], labels [N]."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top == labels[:, None]
    metrics = {"top1": 100.0 * correct[:, 0].float().mean().item(), "top5": 100.0 * correct.any(dim=1).float().mean().item()}
    if mean_per_class:
        recalls = [correct[labels == c, 0].float().mean().item() for c in labels.unique()]
        metrics["mean_per_class_recall"] = 100.0 * sum(recalls) / len(recalls)
    return metrics


def zeroshot_scores(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """[N, D] normalised image features x [D, C] classifier -> [N, C] logits (scaled by 100 like CLIP)."""
    return 100.0 * image_features @ classifier
