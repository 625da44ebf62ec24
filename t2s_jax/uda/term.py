"""What a loss term of a UDA step is, and what the step hands it.

A step (`t2s_jax/steps.py`) is the shared teacher work plus a list of terms. The teacher
work runs once: the EMA update, one batched teacher forward over the views the terms ask
for, and the pseudo-labels with their weights. Each term then

1. `prepare`s the student passes it needs: images built from the batch and the teacher's
   output (ClassMix images, FDA images, masked images, ...), plus whatever its loss needs
   besides the student's output (mixed labels, masks, ...);
2. turns the student's output on those passes into named, weighted losses (`loss_*`,
   summed into the step's loss) and monitoring metrics.

The step runs every student pass of every term as ONE batched forward/backward with
per-pass BatchNorm statistics (ghost batches, `models.layers.stack_passes`), so terms never
call the model themselves. Passes are keyed by name; terms asking for the same name share
the pass (the first request defines its images). Randomness comes from named streams
(`StepContext.keys`), one per purpose, so adding a term never changes another term's draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections

from t2s_jax.models import SegmentorOutput

Losses = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class PseudoLabels(NamedTuple):
    """The teacher's pseudo-labels on the target crop (method.md 4.4), computed once per step."""

    label: jax.Array  # (B, H, W) int32 argmax class
    weight: jax.Array  # (B, H, W) float32 quality q, 0 on the ignored crop rows (before ClassMix)
    confidence: jax.Array  # (B, H, W) float32 max softmax probability
    quality: jax.Array  # () q = share of pixels with confidence >= threshold


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What every term of one traced step sees. Images are float32 RGB 0..255 (NHWC)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh | None
    keys: Mapping[str, jax.Array]  # independent random streams of this step
    step: jax.Array  # () int32, optimizer updates done before this step
    source_image: jax.Array
    source_label: jax.Array  # (B, H, W) int32, 255 = ignore
    target_image: jax.Array | None  # None without target data
    teacher: Mapping[str, SegmentorOutput]  # the teacher's (stop-gradient) output per view name
    pseudo: PseudoLabels | None  # None unless a term needs pseudo-labels
    # (images 0..255) -> last-stage features of the frozen ImageNet encoder (feature distance).
    imagenet_features: Callable[[jax.Array], jax.Array]
    # (params, images 0..255, *, with_projection) -> teacher output: for terms with their own teacher.
    teacher_forward: Callable[..., SegmentorOutput]
    mask_teacher_params: Any = None  # MIC's separate EMA teacher, when configured


class Term:
    """A loss term. Subclasses set the declarations in `__init__` (from the run config) and
    implement `losses`; `prepare` defaults to no student pass of its own.

    Declarations:
      name: the term's name in presets and `config.terms`.
      needs_target: needs target images (an error without `config.data.target`).
      needs_pseudo_labels: needs `StepContext.pseudo`.
      teacher_views: teacher passes it reads ('target', 'source'), in `StepContext.teacher`.
      teacher_projection / student_projection: needs the projector on those passes.
    """

    name: str = ""
    needs_target: bool = False
    needs_pseudo_labels: bool = False
    teacher_views: tuple[str, ...] = ()
    teacher_projection: bool = False
    student_projection: bool = False

    def prepare(self, context: StepContext) -> tuple[dict[str, jax.Array], Any]:
        """(student passes: name -> images 0..255 (B, H, W, 3), whatever `losses` needs besides)."""
        return {}, None

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: Any
    ) -> tuple[Losses, Metrics]:
        """(weighted losses named 'loss_*', summed into the step's loss; monitoring metrics)."""
        raise NotImplementedError
