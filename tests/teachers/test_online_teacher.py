"""The online CLIP image teacher (CLIP-KD): it encodes the student's own augmented batch, in its own preprocessing."""

from __future__ import annotations

import torch
import torch.nn as nn

from protorkd.models.image_towers import OPENAI_MEAN, OPENAI_STD, Preprocess
from protorkd.teachers.features import OnlineImageTeacher


class RecordingTower(nn.Module):
    """Returns the per-image mean of each channel ([B, 3]) and remembers what it was given."""

    def __init__(self, preprocess: Preprocess) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.output_dim = 3
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images)
        return self.scale * images.mean(dim=(2, 3))


def test_with_the_students_preprocessing_the_teacher_gets_the_identical_tensor():
    # CLIP-KD: `t_model(images, texts)` on the very tensor the student trains on
    same = Preprocess(32, OPENAI_MEAN, OPENAI_STD)
    tower = RecordingTower(same)
    teacher = OnlineImageTeacher(tower, same, torch.device("cpu"))
    images = torch.randn(2, 3, 32, 32)
    features = teacher(images)
    assert tower.seen[0].data_ptr() == images.data_ptr()
    assert not tower.training and not features.requires_grad and features.dtype == torch.float32
    assert all(not p.requires_grad for p in tower.parameters())


def test_other_statistics_renormalise_the_same_pixels_exactly():
    student = Preprocess(4, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    teacher_preprocess = Preprocess(4, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    teacher = OnlineImageTeacher(RecordingTower(teacher_preprocess), student, torch.device("cpu"))
    pixels = torch.rand(1, 3, 4, 4)
    student_view = torch.stack([(pixels[0, c] - 0.5) / s for c, s in enumerate((0.25, 0.5, 1.0))])[None]
    expected = torch.stack([(pixels[0, c] - m) / s for c, (m, s) in enumerate([(0.4, 0.2), (0.5, 0.3), (0.6, 0.4)])])
    torch.testing.assert_close(teacher.view(student_view), expected[None])


def test_another_resolution_resamples_the_students_crop():
    student = Preprocess(8, OPENAI_MEAN, OPENAI_STD)
    tower = RecordingTower(Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    teacher = OnlineImageTeacher(tower, student, torch.device("cpu"))
    grey = torch.full((1, 3, 8, 8), 0.3)  # a uniform crop stays uniform at any resolution
    student_view = (grey - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    features = teacher(student_view)
    assert tower.seen[0].shape == (1, 3, 16, 16)
    torch.testing.assert_close(tower.seen[0], torch.full((1, 3, 16, 16), 0.3))
    torch.testing.assert_close(features, torch.full((1, 3), 0.3))
