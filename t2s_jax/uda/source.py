"""The supervised source term (method.md 4.2): cross-entropy of the student on the source crop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from t2s_jax.classes import IGNORE_INDEX
from t2s_jax.config import SOURCE_LOSS_MEANS
from t2s_jax.models import SegmentorOutput
from t2s_jax.uda.term import Losses, Metrics, StepContext, Term

SOURCE_PASS = "source"


class SourceTerm(Term):
    """L_src: CE of the source pass, its mean over all B*H*W pixels (ignored pixels count as 0;
    DAFormer) or, with `uda.source_loss_mean='valid'`, over the non-ignored ones (VFM-UDA)."""

    name = "source"
    student_passes = (SOURCE_PASS,)

    def __init__(self, config: ml_collections.ConfigDict):
        self.mean_over = config.uda.get("source_loss_mean", "all")
        if self.mean_over not in SOURCE_LOSS_MEANS:
            raise ValueError(f"config.uda.source_loss_mean={self.mean_over!r}; expected one of {SOURCE_LOSS_MEANS}")

    def prepare(self, context: StepContext) -> tuple[dict, Any]:
        return {SOURCE_PASS: context.source_image}, None

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: Any
    ) -> tuple[Losses, Metrics]:
        labels = context.source_label
        weights = None
        if self.mean_over == "valid":
            # The host's loss is a mean over all pixels: weighting each by N / N_valid makes it
            # the mean over the valid ones, on any host.
            valid = (labels != IGNORE_INDEX).astype(jnp.float32)
            weights = valid / jnp.maximum(jnp.mean(valid), 1.0 / valid.size)
        return {"loss_source": context.host.segmentation_loss(student[SOURCE_PASS], labels, weights)}, {}
