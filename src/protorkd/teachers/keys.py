"""The names under which separate locked teachers' features reach a loss (`LossInputs.extra[key]`).

A loss that distils from such a teacher lists the keys it reads (`LossNeeds.teacher_features`); the
training run provides exactly those, from the teacher feature cache, and refuses a teacher no loss reads.
"""

from __future__ import annotations

CLIP_IMAGE_KEY = "teacher_image_features"  # a CLIP teacher's image embeddings [B, D_clip]
CLIP_TEXT_KEY = "teacher_text_features"  # the same CLIP teacher's caption embeddings [B, D_clip]
CLIP_LOGIT_SCALE_KEY = "teacher_logit_scale"  # that CLIP's exp(logit_scale), a 0-d tensor
TEXT_TEACHER_KEY = "text_teacher_features"  # a text-only teacher's caption embeddings [B, D_text]
TEXT_TEACHER_LOGIT_SCALE_KEY = "text_teacher_logit_scale"  # (never provided: CLIP-KD falls back to its flag)

# the flag that provides each key, for error messages
TEACHER_FLAGS = {
    CLIP_IMAGE_KEY: "--clip-teacher-model",
    CLIP_TEXT_KEY: "--clip-teacher-model",
    TEXT_TEACHER_KEY: "--extra-text-teacher",
}
