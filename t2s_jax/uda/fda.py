"""Fourier Domain Adaptation (FDA, Yang & Soatto 2020) on the device: method.md section 5.1.

A source image takes the target's low-frequency amplitude spectrum and keeps its own
phase, so it looks like the target but keeps the source's content (and labels).

The low-frequency window follows `low_freq_mutate` of the original code
(YanchaoYang/FDA, `utils/__init__.py`, the PyTorch version its `train.py` uses): the
four b x b corner blocks of the *unshifted* spectrum, rows/columns [0, b) and
[size - b, size), with b = floor(min(H, W) * beta). That window holds the frequencies
-b .. b-1 along each axis, so frequency -b has no mirror partner +b inside it: the
mutated spectrum is not Hermitian and its inverse FFT is complex. As in the original,
the real part is taken, which halves the exchange at frequency -b; the amplitude of
frequencies -(b-1) .. b-1 is exactly the target's. (The NumPy variant in the same file,
`low_freq_mutate_np`, uses a centred (2b+1) x (2b+1) window instead; it is not the one
the FDA training code runs.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def low_frequency_window(height: int, width: int, beta: float) -> np.ndarray:
    """Boolean (height, width) mask of the four b x b corners of an unshifted spectrum."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"FDA beta (config pull.fda_beta) must lie in [0, 1], got {beta}")
    b = math.floor(min(height, width) * beta)
    rows = np.zeros(height, bool)
    cols = np.zeros(width, bool)
    if b > 0:  # with b = 0 the slice [size - 0, size) is empty too: nothing changes
        rows[:b] = rows[height - b :] = True
        cols[:b] = cols[width - b :] = True
    return rows[:, None] & cols[None, :]


def fda_source_to_target_unclipped(source: jax.Array, target: jax.Array, beta: float) -> jax.Array:
    """FDA before the final clip: real part of the inverse FFT, float32 NHWC.

    `beta` must be a Python float (the window size is a static shape).
    """
    if source.ndim != 4 or source.shape != target.shape:
        raise ValueError(
            "FDA expects source and target batches of equal NHWC shape (image i pairs with "
            f"image i), got {source.shape} and {target.shape}"
        )
    _, height, width, _ = source.shape
    window = jnp.asarray(low_frequency_window(height, width, beta))[None, :, :, None]
    spectrum_source = jnp.fft.fft2(source.astype(jnp.float32), axes=(1, 2))
    spectrum_target = jnp.fft.fft2(target.astype(jnp.float32), axes=(1, 2))
    # Target amplitude with source phase inside the window; the source spectrum untouched outside.
    mutated = jnp.abs(spectrum_target) * jnp.exp(1j * jnp.angle(spectrum_source))
    spectrum = jnp.where(window, mutated, spectrum_source)
    return jnp.real(jnp.fft.ifft2(spectrum, axes=(1, 2))).astype(jnp.float32)


def fda_source_to_target(source: jax.Array, target: jax.Array, beta: float) -> jax.Array:
    """Source images (float 0-255, NHWC) in the style of the paired target images, clipped to [0, 255]."""
    return jnp.clip(fda_source_to_target_unclipped(source, target, beta), 0.0, 255.0)
