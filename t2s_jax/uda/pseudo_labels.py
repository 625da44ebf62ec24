"""Teacher pseudo-labels and their quality weight (method.md section 4.4).

As in DAFormer's `dacs.py`: softmax over classes, confidence p = max, label = argmax;
q = (pixels with p >= threshold) / (all B*H*W pixels), one scalar for the whole batch;
the pixel weight is q everywhere except crop rows [0, ignore_top) and
[H - ignore_bottom, H), which get 0 (rectification artefacts and the ego car), and, with
HRDA's margins (`data.pseudo_margins`), pixels near the borders of the stored target image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def trusted_rows(height: int, ignore_top: int, ignore_bottom: int) -> jax.Array:
    """(H,) bool: crop rows whose pseudo-labels count (not in [0, top) nor [H - bottom, H))."""
    if ignore_top < 0 or ignore_bottom < 0 or ignore_top + ignore_bottom > height:
        raise ValueError(
            f"pseudo_labels: ignore_top={ignore_top}, ignore_bottom={ignore_bottom} "
            f"do not fit a crop of height {height}"
        )
    rows = jnp.arange(height)
    return (rows >= ignore_top) & (rows < height - ignore_bottom)


def pixel_validity(
    shape_bhw: tuple[int, int, int], ignore_top: int, ignore_bottom: int, valid: jax.Array | None = None
) -> jax.Array:
    """(B, H, W) float32: 1 where a pseudo-label may count: the trusted crop rows (DAFormer) times
    the per-pixel validity map carried with each target image (HRDA's margins), when given."""
    rows = trusted_rows(shape_bhw[1], ignore_top, ignore_bottom)
    validity = jnp.broadcast_to(rows[None, :, None], shape_bhw).astype(jnp.float32)
    return validity if valid is None else validity * valid.astype(jnp.float32)


def pseudo_labels(
    teacher_logits: jax.Array,
    *,
    threshold: float,
    ignore_top: int,
    ignore_bottom: int,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`(B, H, W, K)` teacher logits -> (labels int32, pixel_weight f32, confidence f32 (B, H, W), q f32 scalar).

    `valid`: (B, H, W) validity of the target pixels (`data.pseudo_margins`), None = all.
    All outputs carry `stop_gradient`: pseudo-labels are targets, not a path to the teacher.
    """
    validity = pixel_validity(teacher_logits.shape[:3], ignore_top, ignore_bottom, valid)
    probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    confidence = jnp.max(probs, axis=-1)
    labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    quality = jnp.mean((confidence >= threshold).astype(jnp.float32))
    return labels, quality * validity, confidence, quality
