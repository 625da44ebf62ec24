"""Segmentation losses of the DAFormer step (method.md 4.2 and 4.5–4.7).

Logits are NHWC `(B, H, W, K)`; label maps `(B, H, W)` hold train ids with `IGNORE_INDEX` (255) = ignore.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t2s_jax.classes import IGNORE_INDEX
from t2s_jax.models.layers import resize_bilinear


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Per-pixel softmax cross-entropy, averaged over ALL `B*H*W` pixels (mmseg / DAFormer).

    Ignored pixels add 0 to the sum but still count in the mean; `weights` `(B, H, W)`
    scales each pixel's term (the mixed loss's pseudo-label weight, method.md 4.5–4.7).
    Computed in float32 whatever the logits' dtype. A label outside `[0, K)` other than
    `ignore_index` yields NaN, so a bad label map cannot train silently.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape} do not match labels {labels.shape}")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = labels != ignore_index
    safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    label_log_prob = jnp.take_along_axis(
        log_probs, safe_labels[..., None], axis=-1, mode="fill", fill_value=jnp.nan
    )[..., 0]
    per_pixel = jnp.where(valid, -label_log_prob, 0.0)
    if weights is not None:
        per_pixel = per_pixel * weights.astype(jnp.float32)
    return jnp.mean(per_pixel)


def segmentation_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """`cross_entropy` of stride-4 `(B, h, w, K)` logits upsampled to the `(B, H, W)` labels (mmseg)."""
    return cross_entropy(resize_bilinear(logits, labels.shape[1:3]), labels, weights=weights)
