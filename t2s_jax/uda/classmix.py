"""ClassMix masks and mixing (method.md section 4.5).

Follows DAFormer's `get_class_masks` / `generate_class_mask` (dacs_transforms.py):
the candidate classes are the values present in the WHOLE source batch (`torch.unique`
over the batch), and the ignore value 255 counts as one of them, exactly as there.
Each example draws its own ceil(n/2) of those n classes uniformly without replacement,
and its mask is its source pixels whose label is a chosen class. Fixed shapes: every
example scores all K+1 candidate slots (K classes + ignore) with uniform noise, absent
slots are pushed last, and the ceil(n/2) best-scored slots are chosen (a uniform subset).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t2s_jax.classes import IGNORE_INDEX


def _label_slots(labels: jax.Array, num_classes: int, ignore_index: int) -> jax.Array:
    """Label map -> candidate slot per pixel: the class id, `num_classes` for ignore, -1 for anything else."""
    slots = jnp.where(labels == ignore_index, num_classes, labels)
    return jnp.where((slots >= 0) & (slots <= num_classes), slots, -1).astype(jnp.int32)


def chosen_classes(key: jax.Array, source_labels: jax.Array, num_classes: int, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """`(B, K+1)` bool: the slots (classes 0..K-1, then ignore) each example mixes in."""
    batch = source_labels.shape[0]
    slots = _label_slots(source_labels, num_classes, ignore_index)
    # One-hot histogram over the batch; out-of-range values (slot -1) match no slot.
    present = jnp.any(slots.reshape(-1, 1) == jnp.arange(num_classes + 1), axis=0)
    num_present = jnp.sum(present)
    num_chosen = (num_present + 1) // 2  # ceil(n / 2), DAFormer's int((n + n % 2) / 2)
    scores = jax.vmap(lambda k: jax.random.uniform(k, (num_classes + 1,)))(jax.random.split(key, batch))
    scores = jnp.where(present, scores, -1.0)
    rank = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)  # 0 = best score
    return present & (rank < num_chosen)


def classmix_masks(key: jax.Array, source_labels: jax.Array, num_classes: int, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """`(B, H, W)` float32 mask: 1 where the source pixel's label is one of its example's chosen classes."""
    chosen = chosen_classes(key, source_labels, num_classes, ignore_index)
    slots = _label_slots(source_labels, num_classes, ignore_index)
    in_mask = jax.vmap(lambda c, s: jnp.where(s >= 0, c[jnp.maximum(s, 0)], False))(chosen, slots)
    return in_mask.astype(jnp.float32)


def mix(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`mask * a + (1 - mask) * b` for a binary `(B, H, W)` mask; images `(B, H, W, C)` broadcast over C.

    Written as a select so that integer label maps keep their dtype.
    """
    if a.shape != b.shape:
        raise ValueError(f"mix: shapes differ: {a.shape} vs {b.shape}")
    if a.shape[: mask.ndim] != mask.shape or a.ndim > mask.ndim + 1:
        raise ValueError(f"mix: mask {mask.shape} does not fit arrays {a.shape}")
    take_a = mask.astype(bool).reshape(mask.shape + (1,) * (a.ndim - mask.ndim))
    return jnp.where(take_a, a, b)
