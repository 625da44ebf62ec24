"""Pseudo-target images: the image translation engines of T2S-DA (method.md 5.1, paper Tab. 11).

A pseudo-target image keeps the source image's pixel-wise semantics (so the source labels
hold) and changes its appearance. 'fda' takes the paired target image's low-frequency
amplitude (the paper's default); 'color_jitter' and 'gaussian_blur' are the
target-free engines of the ablation, and the only ones usable for domain
generalisation, where no target image exists. Both reuse the strong augmentation of
the DACS step (`t2s_jax/uda/augment.py`) with the other half switched off; the paper
uses SimCLR's settings for them, so the strengths are the caller's to choose.
"""

from __future__ import annotations

import jax

from t2s_jax.uda import augment, fda

ENGINES = ("fda", "color_jitter", "gaussian_blur")


def pseudo_target_images(
    key: jax.Array,
    source: jax.Array,
    target: jax.Array | None,
    *,
    engine: str,
    fda_beta: float,
    color_jitter_prob: float,
    color_jitter_strength: float,
    color_jitter_hue: float,
    blur_prob: float,
    blur_sigma: tuple[float, float],
    blur_kernel_size: int | tuple[int, int],
) -> jax.Array:
    """Source images (NHWC, float 0..255) translated by `engine`; float32 0..255, same shape.

    `target` (paired with `source` image by image) is needed by 'fda' only; pass None in
    domain generalisation. `key` drives the random engines ('fda' is deterministic).
    """
    if engine == "fda":
        if target is None:
            raise ValueError(
                "pull.translation='fda' needs target images; with no target data (domain "
                "generalisation) choose 'color_jitter' or 'gaussian_blur'"
            )
        return fda.fda_source_to_target(source, target, fda_beta)
    if engine not in ENGINES:
        raise ValueError(f"unknown pull.translation {engine!r}; expected one of {ENGINES}")
    jitter_only = engine == "color_jitter"
    return augment.strong_augment(
        key,
        source,
        color_jitter_prob=color_jitter_prob if jitter_only else 0.0,
        color_jitter_strength=color_jitter_strength,
        color_jitter_hue=color_jitter_hue,
        blur_prob=0.0 if jitter_only else blur_prob,
        blur_sigma=blur_sigma,
        blur_kernel_size=blur_kernel_size,
    )
