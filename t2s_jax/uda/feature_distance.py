"""ImageNet feature distance on thing-class cells (method.md section 4.3).

DAFormer (`dacs.py` `calc_feat_dist`, `masked_feat_dist`; `downscale_label_ratio` in
mmseg/utils/utils.py): the label map is pooled to the feature grid as a per-cell class
histogram with ignore as an extra class; a cell takes its most frequent value, and
becomes ignore when that value is ignore or covers < `min_ratio` of the cell. Cells whose
value is a thing class are the mask; the loss is the mean over masked cells of
||f_student - f_imagenet||_2 over channels. Unlike DAFormer (mean of an empty tensor =
NaN) an empty mask gives 0, and the norm has a zero (not NaN) gradient at f_S = f_I,
which is where training starts when the student is initialised from ImageNet weights.
The result is unweighted: the caller multiplies by `uda.fd_weight`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from t2s_jax.classes import IGNORE_INDEX
from t2s_jax.models import SegmentorOutput
from t2s_jax.uda.source import SOURCE_PASS
from t2s_jax.uda.term import Losses, Metrics, StepContext, Term


def downscale_label_ratio(
    labels: jax.Array, grid_hw: tuple[int, int], *, min_ratio: float, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """`(B, H, W)` labels -> `(B, h, w)` cell labels (int32), ignore where no value reaches `min_ratio`."""
    batch, height, width = labels.shape
    grid_h, grid_w = grid_hw
    if height % grid_h or width % grid_w or height // grid_h != width // grid_w:
        raise ValueError(
            f"feature distance: label size {(height, width)} is not a whole, equal multiple of the "
            f"feature grid {grid_hw}; use crops divisible by the encoder's stride"
        )
    scale = height // grid_h
    slots = jnp.where(labels == ignore_index, num_classes, labels)
    # Values outside [0, K) other than ignore match no class; they only lower the cell's ratio.
    one_hot = jax.nn.one_hot(slots, num_classes + 1, dtype=jnp.float32)
    cell_hist = one_hot.reshape(batch, grid_h, scale, grid_w, scale, num_classes + 1).mean(axis=(2, 4))
    cell_label = jnp.argmax(cell_hist, axis=-1)
    cell_ratio = jnp.max(cell_hist, axis=-1)
    keep = (cell_label != num_classes) & (cell_ratio >= min_ratio)
    return jnp.where(keep, cell_label, ignore_index).astype(jnp.int32)


def _safe_l2_norm(x: jax.Array) -> jax.Array:
    """L2 norm over the last axis whose gradient at 0 is 0 (PyTorch's subgradient), not NaN."""
    squared = jnp.sum(jnp.square(x), axis=-1)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def thing_feature_distance(
    student_features: jax.Array,
    imagenet_features: jax.Array,
    labels: jax.Array,
    *,
    thing_classes: Sequence[int],
    min_ratio: float,
    num_classes: int = 19,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Mean L2 distance of `(B, h, w, C)` features over thing cells of `(B, H, W)` labels; 0 if none."""
    if student_features.shape != imagenet_features.shape:
        raise ValueError(
            f"feature distance: student {student_features.shape} and ImageNet {imagenet_features.shape} features differ"
        )
    grid_hw = student_features.shape[1:3]
    cell_labels = downscale_label_ratio(
        labels, grid_hw, min_ratio=min_ratio, num_classes=num_classes, ignore_index=ignore_index
    )
    mask = jnp.any(cell_labels[..., None] == jnp.asarray(tuple(thing_classes), jnp.int32), axis=-1)
    difference = student_features.astype(jnp.float32) - jax.lax.stop_gradient(imagenet_features).astype(jnp.float32)
    distance = _safe_l2_norm(difference)
    num_cells = jnp.sum(mask)
    return jnp.sum(jnp.where(mask, distance, 0.0)) / jnp.maximum(num_cells, 1).astype(jnp.float32)


class FeatureDistanceTerm(Term):
    """fd_weight * thing-class feature distance of the student's source pass to the frozen
    ImageNet encoder (method.md 4.3). Reads the source pass; adds none of its own."""

    name = "feature_distance"
    reads_passes = (SOURCE_PASS,)

    def __init__(self, config: ml_collections.ConfigDict):
        self.weight = float(config.uda.fd_weight)
        self.thing_classes = tuple(config.uda.fd_classes)
        self.min_ratio = float(config.uda.fd_min_ratio)
        self.num_classes = int(config.model.num_classes)

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: Any
    ) -> tuple[Losses, Metrics]:
        if self.weight <= 0:
            return {"loss_fd": jnp.zeros((), jnp.float32)}, {}
        distance = thing_feature_distance(
            student[SOURCE_PASS].encoder_features[-1],
            context.imagenet_features(context.source_image),
            context.source_label,
            thing_classes=self.thing_classes,
            min_ratio=self.min_ratio,
            num_classes=self.num_classes,
        )
        return {"loss_fd": self.weight * distance}, {}
