"""Representation-health diagnostics against hand computations on small matrices, against Wang & Isola's own
code, and on a deliberately collapsed model."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from protorkd.eval import diagnostics
from protorkd.eval.diagnostics import (
    alignment,
    collapse_warnings,
    effective_rank,
    mean_cosine,
    prediction_diagnostics,
    sample_indices,
    uniformity,
)
from protorkd.eval.suite import EvalOptions, run_suite
from protorkd.models.build import build_dual_encoder
from protorkd.models.options import TeacherSide
from tests.conftest import TINY_TOWERS


# --- Wang & Isola's reference code, transcribed from github.com/SsnL/align_uniform (README / align_uniform/__init__.py)
def align_loss(x, y, alpha=2):
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def uniform_loss(x, t=2):
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def _entropy(*shares: float) -> float:
    return -sum(p * math.log(p) for p in shares if p > 0)


def _two_clusters(a: int, b: int, dim: int = 4) -> torch.Tensor:
    """a rows equal to e1 and b rows equal to e2: singular values sqrt(a) and sqrt(b)."""
    eye = torch.eye(dim)
    return torch.cat([eye[0].repeat(a, 1), eye[1].repeat(b, 1)])


def test_effective_rank_of_a_rank_one_matrix_an_identity_and_two_clusters():
    u, v = torch.tensor([1.0, -2.0, 3.0, 0.5, 1.0]), torch.tensor([2.0, 0.0, -1.0, 4.0])
    assert effective_rank(torch.outer(u, v)) == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0, abs=1e-9)
    assert effective_rank(3.0 * torch.eye(6)[:, :4]) == pytest.approx(4.0, abs=1e-9)  # 4 equal singular values
    # singular values 1 and 2 -> p = (1/3, 2/3), erank = exp(H(p)) (Roy & Vetterli, eq. 2-3)
    assert effective_rank(_two_clusters(1, 4)) == pytest.approx(math.exp(_entropy(1 / 3, 2 / 3)), abs=1e-9)
    assert effective_rank(_two_clusters(3, 3)) == pytest.approx(2.0, abs=1e-9)


def test_alignment_and_uniformity_by_hand_and_against_wang_and_isolas_code():
    eye = torch.eye(5)
    assert uniformity(eye) == pytest.approx(-4.0, abs=1e-9)  # every pair at squared distance 2: log exp(-4)
    assert uniformity(eye[0].repeat(4, 1)) == pytest.approx(0.0, abs=1e-12)  # one point: log exp(0)
    # two rows at e1, two at e2: 2 pairs at distance 0, 4 pairs at squared distance 2
    assert uniformity(_two_clusters(2, 2)) == pytest.approx(math.log((2 + 4 * math.exp(-4)) / 6), abs=1e-9)
    assert alignment(eye, eye) == 0.0
    assert alignment(eye, -eye) == pytest.approx(4.0)  # antipodal pairs: ||2 e_i||^2
    assert alignment(_two_clusters(2, 0), _two_clusters(1, 1)) == pytest.approx(1.0)  # (0 + 2) / 2
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(50, 16, generator=generator, dtype=torch.float64), dim=-1)
    y = F.normalize(x + 0.3 * torch.randn(50, 16, generator=generator, dtype=torch.float64), dim=-1)
    assert alignment(x, y) == pytest.approx(float(align_loss(x, y)), rel=1e-12)
    assert uniformity(x) == pytest.approx(float(uniform_loss(x)), rel=1e-9)
    assert uniformity(x, t=0.5) == pytest.approx(float(uniform_loss(x, t=0.5)), rel=1e-9)
    # for unit vectors ||x - y||^2 = 2 - 2 cos: the mean cosine is 1 - alignment / 2
    assert mean_cosine(x, y) == pytest.approx(1 - alignment(x, y) / 2, abs=1e-12)
    assert mean_cosine(eye, -eye) == -1.0


def test_prediction_entropy_and_top_class_share_by_hand():
    one_class = torch.tensor([[0.0, 5.0, 1.0]]).repeat(6, 1)
    assert prediction_diagnostics(one_class) == {"prediction_entropy": 0.0, "top_class_share": 100.0}
    spread = torch.eye(4) * 3  # each of 4 images predicts its own class
    result = prediction_diagnostics(spread)
    assert result["prediction_entropy"] == pytest.approx(math.log(4)) and result["top_class_share"] == 25.0
    three_to_one = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
    result = prediction_diagnostics(three_to_one)
    assert result["prediction_entropy"] == pytest.approx(_entropy(0.75, 0.25)) and result["top_class_share"] == 75.0
    ties = torch.zeros(5, 4)  # every class tied for every image: an even spread in expectation, not all to class 0
    result = prediction_diagnostics(ties)
    assert result["prediction_entropy"] == pytest.approx(math.log(4)) and result["top_class_share"] == 25.0


def test_collapse_warnings_name_the_metric_and_keep_to_their_thresholds():
    healthy = {"image_effective_rank": 3.0, "teacher_effective_rank": 30.0, "top_class_share": 50.0}
    assert collapse_warnings("diagnostics/x", healthy, teacher=TeacherSide.TEXT) == []
    collapsed = {"image_effective_rank": 2.9, "teacher_effective_rank": 30.0, "top_class_share": 50.1}
    messages = collapse_warnings("diagnostics/x", collapsed, teacher=TeacherSide.TEXT)
    assert len(messages) == 2
    assert "diagnostics/x/image_effective_rank 2.90" in messages[0] and "diagnostics/x/top_class_share" in messages[1]
    assert collapse_warnings("diagnostics/x", collapsed, teacher=TeacherSide.NONE) == [messages[1]]  # no rank rule
    # an image teacher: the student is the text side
    assert collapse_warnings("diagnostics/x", collapsed, teacher=TeacherSide.IMAGE) == [messages[1]]
    text_collapsed = {"text_effective_rank": 2.0, "teacher_effective_rank": 30.0}
    assert (
        "diagnostics/x/text_effective_rank"
        in collapse_warnings("diagnostics/x", text_collapsed, teacher=TeacherSide.IMAGE)[0]
    )


def test_the_fixed_sample_is_evenly_spaced_and_needs_no_random_numbers():
    assert sample_indices(10, 4).tolist() == [0, 2, 5, 7]
    assert sample_indices(3, 1000).tolist() == [0, 1, 2]
    state = torch.random.get_rng_state()
    sample_indices(1000, 7)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.fixture(scope="module")
def text_teacher_model():
    """The tiny towers with the text tower locked as the teacher (identity text head, linear image head)."""
    torch.manual_seed(0)
    options = TINY_TOWERS.__class__(**{**TINY_TOWERS.__dict__, "teacher": "text"})
    return build_dual_encoder(options).eval()


def test_diagnostics_on_a_captioned_split_equal_the_formulas_on_the_models_own_features(
    text_teacher_model, tiny_corpus
):
    """Each tower runs once and its output goes through the head: the same features as encode_image /
    encode_text; the teacher's are the locked text tower's features of each sampled image's first caption."""
    from protorkd.data.transforms import eval_transform
    from protorkd.eval.catalog import RetrievalSpec, select
    from protorkd.eval.features import image_features, text_features

    model = text_teacher_model
    root = tiny_corpus / "eval"
    spec = next(s for s in select(root, ["shapes"]) if isinstance(s, RetrievalSpec))
    dataset = spec.load(root, eval_transform(model.image_preprocess))
    metrics = diagnostics.evaluate(model, dataset, device="cpu", batch_size=32, sample=20)
    picked = sample_indices(len(dataset), 20).tolist()  # the demo's images each have captions, in image order
    first = {}
    for caption, image in enumerate(dataset.caption_image.tolist()):
        first.setdefault(image, caption)
    captions = [dataset.captions[first[i]] for i in picked]
    images = image_features(model, torch.utils.data.Subset(dataset, picked), device="cpu")[0]
    texts = text_features(model, captions, device="cpu")
    with torch.no_grad():
        teacher = model.text_tower(model.tokenize(captions))
    assert metrics["image_effective_rank"] == pytest.approx(effective_rank(images), rel=1e-5)
    assert metrics["text_effective_rank"] == pytest.approx(effective_rank(texts), rel=1e-5)
    assert metrics["teacher_effective_rank"] == pytest.approx(effective_rank(F.normalize(teacher, dim=-1)), rel=1e-5)
    assert metrics["alignment"] == pytest.approx(float(align_loss(images.double(), texts.double())), rel=1e-5)
    assert metrics["image_uniformity"] == pytest.approx(float(uniform_loss(images.double())), rel=1e-5)
    assert metrics["student_teacher_cosine"] == pytest.approx(1 - metrics["alignment"] / 2, abs=1e-6)


def test_a_locked_image_teachers_rank_is_its_image_towers_on_the_sampled_images(tiny_corpus):
    """`--teacher image`: the teacher's features are the locked image tower's, of the images; the collapse rule
    then watches the text side."""
    from protorkd.data.transforms import eval_transform
    from protorkd.eval.catalog import RetrievalSpec, select
    from protorkd.eval.features import image_features

    torch.manual_seed(0)
    model = build_dual_encoder(TINY_TOWERS.__class__(**{**TINY_TOWERS.__dict__, "teacher": "image"})).eval()
    assert diagnostics.teacher_side(model) is TeacherSide.IMAGE
    root = tiny_corpus / "eval"
    spec = next(s for s in select(root, ["shapes"]) if isinstance(s, RetrievalSpec))
    dataset = spec.load(root, eval_transform(model.image_preprocess))
    metrics = diagnostics.evaluate(model, dataset, device="cpu", sample=20)
    subset = torch.utils.data.Subset(dataset, sample_indices(len(dataset), 20).tolist())
    tower = image_features(model, subset, device="cpu", normalize=False)[0]
    assert metrics["teacher_effective_rank"] == pytest.approx(effective_rank(F.normalize(tower, dim=-1)), rel=1e-5)


def test_a_locked_teachers_sample_features_are_computed_once(text_teacher_model, tiny_corpus):
    from protorkd.eval.features import FeatureCache

    cache = FeatureCache()
    options = EvalOptions(batch_size=64, cache=cache, datasets=["shapes"])
    first = run_suite(text_teacher_model, tiny_corpus / "eval", tasks=["diagnostics"], options=options).metrics
    misses = cache.misses
    assert misses == 1  # the locked text tower's features of the sampled captions; the image side is trained
    again = run_suite(text_teacher_model, tiny_corpus / "eval", tasks=["diagnostics"], options=options).metrics
    assert cache.misses == misses and again == first


class _Point(torch.nn.Module):
    """An image head that maps every image to the same point: a representation that has collapsed."""

    def __init__(self, point: torch.Tensor) -> None:
        super().__init__()
        self.point = torch.nn.Parameter(point)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.point.expand(features.shape[0], -1)


def test_a_collapsed_model_logs_one_warning_per_collapsed_metric(text_teacher_model, tiny_corpus, caplog):
    import copy

    model = copy.deepcopy(text_teacher_model)
    torch.manual_seed(1)
    model.image_head = _Point(torch.randn(model.embed_dim))
    with caplog.at_level(logging.WARNING, logger="protorkd.eval.suite"):
        metrics = run_suite(model, tiny_corpus / "eval", tasks=["zeroshot"], options=EvalOptions(batch_size=64)).metrics
    datasets = ("shapes", "shapes_skewed", "shapes_unseen")
    for name in datasets:
        assert metrics[f"diagnostics/{name}/image_effective_rank"] == pytest.approx(1.0, abs=1e-6)
        assert metrics[f"diagnostics/{name}/teacher_effective_rank"] > 10  # tiny-text's captions: many directions
        assert metrics[f"zeroshot/{name}/top_class_share"] == 100.0
        assert metrics[f"zeroshot/{name}/prediction_entropy"] == 0.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 * len(datasets)
    for name in datasets:
        assert sum(f"diagnostics/{name}/image_effective_rank" in w for w in warnings) == 1
        assert sum(f"zeroshot/{name}/top_class_share" in w for w in warnings) == 1


def test_diagnostics_join_every_evaluation_that_reads_images(tiny_model, tiny_corpus):
    """Training evaluates the tasks due this epoch: the diagnostics come with them, never alone with STS."""
    root = tiny_corpus / "eval"
    tasks = {k.split("/")[0] for k in run_suite(tiny_model, root, tasks=["zeroshot"]).metrics}
    assert tasks == {"zeroshot", "diagnostics"}
    result = run_suite(tiny_model, root, tasks=["diagnostics"])
    assert "teacher_effective_rank" not in " ".join(result.metrics)  # both towers trained: no teacher tower
    assert "image_effective_rank" in " ".join(result.metrics)
    result = run_suite(tiny_model, root, tasks=["sts"])
    assert "diagnostics" not in result.skipped and not result.metrics
    off = EvalOptions(diagnostics_sample=0)
    assert {k.split("/")[0] for k in run_suite(tiny_model, root, tasks=["zeroshot"], options=off).metrics} == {
        "zeroshot"
    }
