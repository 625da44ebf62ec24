"""ImageNet normalisation of RGB images in 0..255 (method.md section 2).

The host pipeline hands the device raw 0..255 pixels; the steps normalise on device
and de-normalise where an operation is defined on pixel values (strong augmentation,
FDA, method.md sections 4.6 and 5.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# mmseg's `img_norm_cfg` for ImageNet-pretrained encoders, RGB order, 0..255 scale.
IMAGENET_MEAN = np.array((123.675, 116.28, 103.53), np.float32)
IMAGENET_STD = np.array((58.395, 57.12, 57.375), np.float32)


def normalize(images: jax.Array) -> jax.Array:
    """(..., 3) RGB in 0..255 (uint8 or float) -> float32 `(x - mean) / std`."""
    return (jnp.asarray(images, jnp.float32) - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(images: jax.Array) -> jax.Array:
    """Inverse of `normalize`: (..., 3) normalised -> float32 RGB in 0..255 (not clipped)."""
    return jnp.asarray(images, jnp.float32) * IMAGENET_STD + IMAGENET_MEAN
