"""Feature distillation to the frozen initial encoder (VFM-UDA++'s feature distance, docs/hosts.md).

The student's distillation head (`models/distillation.py`) maps its last encoder stage into
the frozen reference's feature space; per position of the reference grid

    l = smooth_l1_weight * mean_c SmoothL1_beta=1(f, g) + cosine_weight * (1 - cos_c(f, g)),

(VFM-UDA++: 0.1 and 0.9), averaged over all positions, on the source pass and on an extra
student pass of the target image, each weighted (`distill.weight_source`, `weight_target`:
0.1 each). No class mask. [our choice] The reference is the run's frozen initial encoder (the
feature distance's model, `StepContext.imagenet_features`) on the same image: VFM-UDA++ distils
to a separate DINOv2-L/14 with registers at 406^2, which is not built here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from t2s_jax.models import SegmentorOutput, resize_bilinear
from t2s_jax.uda.source import SOURCE_PASS
from t2s_jax.uda.term import Losses, Metrics, StepContext, Term

TARGET_PASS = "distill_target"


def default_options() -> ml_collections.ConfigDict:
    """The `distill` section of the run config."""
    distill = ml_collections.ConfigDict()
    distill.weight_source = 0.1
    distill.weight_target = 0.1  # 0: no target pass
    distill.smooth_l1_weight = 0.1
    distill.cosine_weight = 0.9
    return distill


def distillation_loss(
    student: jax.Array, reference: jax.Array, *, smooth_l1_weight: float, cosine_weight: float
) -> jax.Array:
    """Mean over positions of the weighted SmoothL1 (beta 1, mean over channels) and 1 - cosine
    between (B, h, w, C) maps; the student's is resized (bilinear) to the reference grid."""
    student = resize_bilinear(student.astype(jnp.float32), reference.shape[1:3])
    reference = reference.astype(jnp.float32)
    difference = jnp.abs(student - reference)
    smooth_l1 = jnp.mean(jnp.where(difference < 1.0, 0.5 * difference**2, difference - 0.5), axis=-1)
    # PyTorch's cosine_similarity: each norm clamped at eps 1e-8.
    norms = [jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-8) for x in (student, reference)]
    cosine = jnp.sum(student * reference, axis=-1) / (norms[0] * norms[1])
    return jnp.mean(smooth_l1_weight * smooth_l1 + cosine_weight * (1.0 - cosine))


class DistillationTerm(Term):
    """weight_source * L(source pass) + weight_target * L(target pass)."""

    name = "distillation"
    student_distillation = True
    reads_passes = (SOURCE_PASS,)

    def __init__(self, config: ml_collections.ConfigDict):
        self.options = config.distill
        for key in ("weight_source", "weight_target", "smooth_l1_weight", "cosine_weight"):
            value = self.options[key]
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"config.distill.{key}={value!r}: expected a number >= 0")
        self.uses_target = self.options.weight_target > 0
        self.needs_target = self.uses_target
        self.student_passes = (TARGET_PASS,) if self.uses_target else ()

    def prepare(self, context: StepContext) -> tuple[dict, Any]:
        return ({TARGET_PASS: context.target_image} if self.uses_target else {}), None

    def _loss(self, output: SegmentorOutput, images: jax.Array, context: StepContext) -> jax.Array:
        return distillation_loss(
            output.distillation, context.imagenet_features(images),
            smooth_l1_weight=self.options.smooth_l1_weight, cosine_weight=self.options.cosine_weight,
        )  # fmt: skip

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: Any
    ) -> tuple[Losses, Metrics]:
        source = self._loss(student[SOURCE_PASS], context.source_image, context)
        losses = {"loss_distill_source": self.options.weight_source * source}
        if self.uses_target:
            target = self._loss(student[TARGET_PASS], context.target_image, context)
            losses["loss_distill_target"] = self.options.weight_target * target
        return losses, {}
