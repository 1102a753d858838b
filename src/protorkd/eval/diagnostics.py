"""Representation-health diagnostics: signs that an embedding collapses while its top-1 still looks fine.

On a fixed held-out sample of a captioned dataset (`sample_indices`: at most `sample` images, evenly spaced
in the dataset's order, each paired with its first caption), from the model's L2-normalised joint features:

- `image_effective_rank`, `text_effective_rank`: the effective rank of the [n, D] feature matrix (Roy &
  Vetterli 2007, "The effective rank: a measure of effective dimensionality", EUSIPCO): with singular values
  s_k and p_k = s_k / sum_j s_j, erank = exp(-sum_k p_k log p_k). 1 when every row points the same way,
  min(n, D) when all singular values are equal. Rows are normalised, not centred.
- `teacher_effective_rank`: the same of the locked teacher tower's own features (before any head, rows
  normalised) on the sample: the captions for a locked text tower (`--teacher text`), the images for a
  locked image tower (`--teacher image`). Absent when no tower, or both, is locked (`--teacher none`: both
  towers are students and an external teacher such as CLIP-KD's is not part of the model).
- `student_teacher_cosine`: the mean cosine between the student side's joint features and the teacher
  side's joint features (the locked tower through its head: what a distillation loss compares the student
  with) over the sample's image-caption pairs. With a locked tower only. For unit vectors it is
  1 - alignment / 2, the same information in the unit a reader expects.
- `alignment`: Wang & Isola 2020 ("Understanding contrastive representation learning through alignment and
  uniformity on the hypersphere", ICML; github.com/SsnL/align_uniform), alpha = 2, on the positive pairs:
  mean_i ||f(image_i) - g(caption_i)||^2. 0 when every pair coincides, 4 at the worst.
- `image_uniformity`, `text_uniformity`: their uniformity, t = 2: log mean_{i<j} exp(-2 ||x_i - x_j||^2) over
  the pairs of one modality. 0 when all rows coincide; lower is more uniform.

From zero-shot classification, on its whole test split (`prediction_diagnostics`, part of every zero-shot
result): `prediction_entropy`, the entropy in nats of the distribution of predicted classes (log C when
predictions spread evenly over C classes, the labels' own entropy for a perfect classifier), and
`top_class_share`, the % of predictions that go to the most-predicted class.

A collapse logs one WARNING per collapsed metric (`collapse_warnings`): a student effective rank below a
tenth of the teacher's, or a class taking more than half of the zero-shot predictions.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from protorkd.eval.datasets import CaptionedImages
from protorkd.eval.features import FeatureCache, image_features, weights_fingerprint
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.options import TeacherSide
from protorkd.precision import Precision

COLLAPSE_RANK_FRACTION = 0.1  # a student's effective rank below this fraction of the teacher's
COLLAPSE_CLASS_SHARE = 50.0  # % of the zero-shot predictions going to one class
DEFAULT_SAMPLE = 1000


def effective_rank(features: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank of [N, D] `features`: exp of the entropy of the L1-normalised singular
    values (terms with p_k = 0 contribute 0). NaN for an all-zero matrix."""
    singular = torch.linalg.svdvals(features.double())
    total = singular.sum()
    if total <= 0:
        return float("nan")
    p = singular[singular > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola's alignment of positive pairs (rows of [N, D] `x` and `y`): mean ||x_i - y_i||_2^alpha."""
    return float((x.double() - y.double()).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola's uniformity of [N, D] `x`: log of the mean over pairs i < j of exp(-t ||x_i - x_j||^2),
    from the Gram matrix (no [N^2, D] differences) and a log-sum-exp. NaN below 2 rows."""
    x = x.double()
    n = x.shape[0]
    if n < 2:
        return float("nan")
    squared = x.pow(2).sum(dim=1)
    distances = (squared[:, None] + squared[None, :] - 2 * x @ x.T).clamp(min=0)
    upper = torch.triu_indices(n, n, offset=1)
    exponents = -t * distances[upper[0], upper[1]]
    return float(torch.logsumexp(exponents, dim=0) - math.log(exponents.numel()))


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cosine similarity of the rows of [N, D] `x` and `y`."""
    return float(F.cosine_similarity(x.double(), y.double(), dim=1).mean())


def prediction_diagnostics(logits: torch.Tensor) -> dict[str, float]:
    """{"prediction_entropy" (nats), "top_class_share" (%)} of the predictions of [N, C] `logits`.

    An image whose top score is tied between k classes counts 1/k towards each (the expected share under a
    random tie-break, as `ranking` resolves ties), so a model that scores every class alike spreads its
    predictions evenly instead of giving them all to class 0.
    """
    top = (logits == logits.max(dim=1, keepdim=True).values).double()
    shares = (top / top.sum(dim=1, keepdim=True)).sum(dim=0) / logits.shape[0]
    present = shares[shares > 0]
    return {
        "prediction_entropy": float(-(present * present.log()).sum()) + 0.0,  # + 0.0: 0.0, never -0.0
        "top_class_share": 100.0 * float(shares.max()),
    }


# the side a locked teacher tower distils into, which the effective-rank rule compares with the teacher
STUDENT_OF = {TeacherSide.TEXT: "image", TeacherSide.IMAGE: "text"}


def teacher_side(model: DualEncoder) -> TeacherSide:
    """The one tower the model holds locked, its teacher; NONE when neither or both towers are locked."""
    if model.lock_text == model.lock_image:
        return TeacherSide.NONE
    return TeacherSide.TEXT if model.lock_text else TeacherSide.IMAGE


def collapse_warnings(prefix: str, metrics: Mapping[str, float], *, teacher: TeacherSide) -> list[str]:
    """One message per collapsed metric in one dataset's `metrics` (keys without `prefix`, the `task/dataset`
    they are logged under): the student side's effective rank (`image_effective_rank` for a text teacher)
    below COLLAPSE_RANK_FRACTION of `teacher_effective_rank`, `top_class_share` above COLLAPSE_CLASS_SHARE."""
    messages = []
    student = STUDENT_OF.get(teacher)
    rank_key = f"{student}_effective_rank"
    if student is not None and rank_key in metrics and "teacher_effective_rank" in metrics:
        rank, teacher = metrics[rank_key], metrics["teacher_effective_rank"]
        if rank < COLLAPSE_RANK_FRACTION * teacher:
            messages.append(
                f"collapse: {prefix}/{rank_key} {rank:.2f} is below a tenth of the teacher's effective rank "
                f"({teacher:.2f}): the student's {student} features span few directions"
            )
    share = metrics.get("top_class_share")
    if share is not None and share > COLLAPSE_CLASS_SHARE:
        messages.append(
            f"collapse: {prefix}/top_class_share {share:.1f} %: one class takes more than half of the zero-shot "
            "predictions"
        )
    return messages


def sample_indices(n: int, sample: int) -> torch.Tensor:
    """[min(n, sample)] indices evenly spaced over range(n): a fixed sample that needs no random numbers and
    keeps a class-sorted dataset's proportions."""
    if n <= sample:
        return torch.arange(n)
    return torch.div(torch.arange(sample) * n, sample, rounding_mode="floor")


def first_captions(dataset: CaptionedImages) -> dict[int, int]:
    """{image position: index of its first caption} for every image that has a caption."""
    first: dict[int, int] = {}
    for caption, image in enumerate(dataset.caption_image.tolist()):
        first.setdefault(image, caption)
    return first


@torch.no_grad()
def text_tower_features(
    model: DualEncoder,
    texts: list[str],
    *,
    device: torch.device | str,
    batch_size: int = 256,
    precision: Precision = Precision.FP32,
) -> torch.Tensor:
    """[N] strings -> [N, D_text] text tower (backbone) features, float32 on the CPU, in input order."""
    was_training = model.training
    model.eval()
    try:
        outputs = []
        for start in range(0, len(texts), batch_size):
            tokens = {key: value.to(device) for key, value in model.tokenize(texts[start : start + batch_size]).items()}
            with precision.autocast(device):
                outputs.append(model.text_backbone(tokens).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs)


@torch.no_grad()
def _project(
    project: Callable[[torch.Tensor], torch.Tensor],
    backbone: torch.Tensor,
    device: torch.device | str,
    precision: Precision,
) -> torch.Tensor:
    with precision.autocast(device):
        return project(backbone.to(device)).float().cpu()


def _kept(
    compute: Callable[[], torch.Tensor], cache: FeatureCache | None, describe: Callable[[], dict]
) -> torch.Tensor:
    """`compute()`, or the features `cache` holds under `describe()` (None: no cache, computed every time)."""
    if cache is None:
        return compute()
    return cache.get_or_compute(describe(), lambda: {"features": compute()})["features"]


def evaluate(
    model: DualEncoder,
    dataset: CaptionedImages,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    workers: int = 0,
    sample: int = DEFAULT_SAMPLE,
    cache: FeatureCache | None = None,
    data_key: str = "",
    precision: Precision = Precision.FP32,
) -> dict[str, float]:
    """The representation diagnostics (module docstring) on a fixed sample of `dataset`'s image-caption pairs.

    Each tower runs once on the sample; the joint features are its output through the head. A locked tower's
    features are kept in `cache` (keyed by its weights, `data_key` naming the data and preprocessing, and the
    sample), so a locked text teacher encodes the sample's captions once per training run.
    """
    first = first_captions(dataset)
    with_caption = torch.tensor(sorted(first), dtype=torch.long)
    images = with_caption[sample_indices(len(with_caption), sample)].tolist()
    captions = [dataset.captions[first[image]] for image in images]
    sampled = {"data": data_key, "sample": sample, "images": len(images)}

    def image_tower() -> torch.Tensor:
        subset = Subset(dataset, images)
        kwargs = {"device": device, "batch_size": batch_size, "workers": workers, "precision": precision}
        kwargs["desc"] = "diagnostics images"
        return image_features(model, subset, normalize=False, **kwargs)[0]

    image_backbone = _kept(
        image_tower,
        cache if model.lock_image else None,
        lambda: {
            "kind": "diagnostics_image_tower",
            "weights": weights_fingerprint(model.image_tower),
            "precision": precision.value,
            **sampled,
        },
    )
    text_backbone = _kept(
        lambda: text_tower_features(model, captions, device=device, batch_size=batch_size, precision=precision),
        cache if model.lock_text else None,
        lambda: {
            "kind": "diagnostics_text_tower",
            "weights": weights_fingerprint(model.text_tower),
            "captions": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
            "precision": precision.value,
            **sampled,
        },
    )
    image_joint = _project(model.project_image, image_backbone, device, precision)
    text_joint = _project(model.project_text, text_backbone, device, precision)
    metrics = {
        "image_effective_rank": effective_rank(image_joint),
        "text_effective_rank": effective_rank(text_joint),
        "alignment": alignment(image_joint, text_joint),
        "image_uniformity": uniformity(image_joint),
        "text_uniformity": uniformity(text_joint),
    }
    side = teacher_side(model)
    if side is not TeacherSide.NONE:
        teacher = text_backbone if side is TeacherSide.TEXT else image_backbone
        metrics["teacher_effective_rank"] = effective_rank(F.normalize(teacher.double(), dim=-1))
        metrics["student_teacher_cosine"] = mean_cosine(image_joint, text_joint)
    return metrics
