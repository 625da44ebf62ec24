"""What a loss term of a UDA step is, and what the step hands it.

A step (`t2s_jax/steps.py`) is the shared teacher work plus a list of terms. The teacher
work runs once: the EMA update, one batched teacher forward over the views the terms ask
for, and the pseudo-labels with their weights. Each term may first

0. `transform_batch`: change the batch every later stage sees (MaskTwins' cut to the first
   target image), in the order of the terms;
   `update_state`: advance its own state carried in the train state (`init_state`; MIC's
   separate EMA teacher), from the student parameters before this step's update;

and then

1. `prepare`s the student passes it declared (`student_passes`): images built from the
   batch and the teacher's output (ClassMix images, FDA images, masked images, ...), plus
   whatever its loss needs besides the student's output (mixed labels, masks, ...);
2. turns the student's output on those passes into named, weighted losses (`loss_*`,
   summed into the step's loss) and monitoring metrics; a pass's supervised loss is the
   host's (`StepContext.host.segmentation_loss`), so a term runs on any host (HRDA's fused +
   detail loss needs no edit in a term).

The step runs every student pass of every term through the host (`t2s_jax/hosts/`) as ONE
batched forward/backward with per-pass BatchNorm statistics (ghost batches,
`models.layers.stack_passes`), so terms never call the model themselves. Each pass has one producing term; a term may read another's
pass only by declaring it (`reads_passes`: the pull term's source queries are the source
term's pass). Pass, loss and metric names are unique across terms (checked by the step).
Randomness comes from the term's declared `random_streams`: each stream's key is derived
from "term name/stream name", so adding a term never changes another term's draws.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections

from t2s_jax.hosts import Host
from t2s_jax.models import SegmentorOutput

Losses = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Batch = dict[str, jax.Array]


class PseudoLabels(NamedTuple):
    """The teacher's pseudo-labels on the target crop (method.md 4.4), computed once per step."""

    label: jax.Array  # (B, H, W) int32 argmax class
    weight: jax.Array  # (B, H, W) float32 quality q, 0 on the ignored crop rows (before ClassMix)
    confidence: jax.Array  # (B, H, W) float32 max softmax probability
    quality: jax.Array  # () q = share of pixels with confidence >= threshold


def stream_key(step_key: jax.Array, owner: str, stream: str) -> jax.Array:
    """The key of random stream `owner/stream` in a step: folded in by a stable hash of the
    name, so a stream's draws depend on its name only, not on which other streams exist."""
    return jax.random.fold_in(step_key, zlib.crc32(f"{owner}/{stream}".encode()) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a term of one traced step sees. Images are float32 RGB 0..255 (NHWC)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh | None
    host: Host  # the run's host: `host.segmentation_loss(student[pass], labels, weights)`
    keys: Mapping[str, jax.Array]  # this term's random streams (its `random_streams`) in this step
    step: jax.Array  # () int32, optimizer updates done before this step
    source_image: jax.Array
    source_label: jax.Array  # (B, H, W) int32, 255 = ignore
    target_image: jax.Array | None  # None without target data
    # (B, H, W) uint8 validity of the target pixels for pseudo-labels (`data.pseudo_margins`),
    # already in `pseudo.weight`; None without margins.
    target_valid: jax.Array | None
    teacher: Mapping[str, SegmentorOutput]  # the teacher's (stop-gradient) output per view name
    pseudo: PseudoLabels | None  # None unless a term needs pseudo-labels
    # (images 0..255) -> last-stage features of the frozen ImageNet encoder (feature distance).
    imagenet_features: Callable[[jax.Array], jax.Array]
    # (params, images 0..255) -> teacher-mode output (no dropout, batch statistics, no gradient)
    # of the model with `params`: for a term that keeps its own teacher in its state.
    teacher_forward: Callable[[Any, jax.Array], SegmentorOutput]
    state: Any = None  # this term's own state after `update_state` (None without one)


class Term:
    """A loss term. Subclasses set the declarations in `__init__` (from the run config) and
    implement `losses`; the other hooks default to doing nothing.

    Declarations:
      name: the term's name in presets and `config.terms`; also its streams' and state's key.
      needs_target: needs target images (an error without `config.data.target`).
      needs_pseudo_labels: needs `StepContext.pseudo`.
      teacher_views: teacher passes it reads ('target', 'source'), in `StepContext.teacher`.
      teacher_projection / student_projection: needs the projector on those passes.
      student_distillation: reads the distillation head's output of its student passes.
      student_passes: the names of the passes `prepare` returns (each produced by one term).
      reads_passes: passes produced by another term that `losses` reads.
      random_streams: the names of its random streams, `StepContext.keys`.
    """

    name: str = ""
    needs_target: bool = False
    needs_pseudo_labels: bool = False
    teacher_views: tuple[str, ...] = ()
    teacher_projection: bool = False
    student_projection: bool = False
    student_distillation: bool = False
    student_passes: tuple[str, ...] = ()
    reads_passes: tuple[str, ...] = ()
    random_streams: tuple[str, ...] = ()

    def init_state(self, params: Any) -> Any:
        """The term's state at step 0 from the initial student parameters; None = no state."""
        del params
        return None

    def update_state(self, state: Any, params: Any, step: jax.Array) -> Any:
        """The state for this step, from the student `params` before this step's update."""
        del params, step
        return state

    def transform_batch(self, batch: Batch) -> Batch:
        """The batch (images float32 0..255, labels int32) that the teacher work and every
        term after this one see."""
        return batch

    def prepare(self, context: StepContext) -> tuple[dict[str, jax.Array], Any]:
        """(student passes: name -> images 0..255 (B, H, W, 3), whatever `losses` needs besides)."""
        return {}, None

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: Any
    ) -> tuple[Losses, Metrics]:
        """(weighted losses named 'loss_*', summed into the step's loss; monitoring metrics)."""
        raise NotImplementedError
