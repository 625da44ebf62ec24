"""The supervised source term (method.md 4.2): cross-entropy of the student on the source crop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from t2s_jax.models import SegmentorOutput
from t2s_jax.uda.term import Losses, Metrics, StepContext, Term

SOURCE_PASS = "source"


class SourceTerm(Term):
    """L_src: CE over all B*H*W source pixels (ignored pixels count as 0)."""

    name = "source"
    student_passes = (SOURCE_PASS,)

    def __init__(self, config: ml_collections.ConfigDict):
        del config

    def prepare(self, context: StepContext) -> tuple[dict, Any]:
        return {SOURCE_PASS: context.source_image}, None

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: Any
    ) -> tuple[Losses, Metrics]:
        return {"loss_source": context.host.segmentation_loss(student[SOURCE_PASS], context.source_label)}, {}
