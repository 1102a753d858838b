"""Caption ensembles (`--caption-ensemble`): one text target per image from every caption the corpus gives it.

A corpus may list an image in several rows, one per caption (COCO has five per image; the caption-supervised
CIFAR-10 benchmark can caption each photo with every CLIP template). By default each row is its own pair and
trains towards its own caption. With a caption ensemble, every row of an image trains towards one target: the
L2-normalised mean of the L2-normalised teacher features of all its captions. That is how CLIP's zero-shot
classifier combines its prompt templates (Radford et al. 2021, "prompt ensembling"), here applied to the training
targets of a locked text teacher. The mean is taken over the cached backbone features, before the text head (an
identity by default, where it makes no difference).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from protorkd.errors import UsageError
from protorkd.models.options import TeacherSide
from protorkd.teachers.cache import TeacherFeatures

log = logging.getLogger(__name__)
_CHUNK = 65536  # rows read and summed at a time: neither [N, D] nor the cache's [U, D] is held in float32


def require_caption_ensemble_inputs(teacher: TeacherSide, *, has_rows: bool) -> None:
    """A UsageError unless the run caches a locked text teacher's features per corpus row (--teacher text, a TSV
    corpus): what the caption ensemble averages."""
    if teacher is not TeacherSide.TEXT or not has_rows:
        raise UsageError(
            "--caption-ensemble averages a locked text teacher's cached caption features; it needs --teacher text "
            "and a TSV corpus"
        )


def caption_ensemble(tower: TeacherFeatures | None, images: Sequence[str], teacher: TeacherSide) -> TeacherFeatures:
    """The locked text tower's features with each row's caption replaced by its image's caption ensemble.

    `images`: the corpus' image path of every row. The result has one feature per distinct image; rows that
    share a path share it. A UsageError when the run has no cached locked text tower to ensemble.
    """
    require_caption_ensemble_inputs(teacher, has_rows=tower is not None)
    assert tower is not None
    if len(images) != len(tower.rows):
        raise ValueError(f"{len(images)} image paths for the {len(tower.rows)} rows of the teacher features")
    image_ids: dict[str, int] = {}
    image_of_row = np.fromiter((image_ids.setdefault(path, len(image_ids)) for path in images), np.int64, len(images))
    sums = torch.zeros(len(image_ids), tower.dim)
    for start in range(0, len(images), _CHUNK):
        chunk = slice(start, start + _CHUNK)
        captions = torch.from_numpy(np.asarray(tower.features[tower.rows[chunk]], dtype=np.float32))
        sums.index_add_(0, torch.from_numpy(image_of_row[chunk]), F.normalize(captions, dim=1))
    log.info("caption ensemble: the %d rows train towards the targets of %d images", len(images), len(image_ids))
    return replace(
        tower,
        features=F.normalize(sums, dim=1).numpy(),
        rows=image_of_row,
        info={**tower.info, "caption_ensemble": True},
    )
