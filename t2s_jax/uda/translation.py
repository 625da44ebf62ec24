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
    **augment_options,
) -> jax.Array:
    """Source images (NHWC, float 0..255) translated by `engine`; float32 0..255, same shape.

    `target` (paired with `source` image by image) is needed by 'fda' only; pass None in
    domain generalisation. `key` drives the random engines ('fda' is deterministic).
    `augment_options` are `augment.strong_augment`'s keyword arguments
    (`augment.strong_augment_options` builds them); the engine switches one half off.
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
    switched_off = "blur_prob" if engine == "color_jitter" else "color_jitter_prob"
    return augment.strong_augment(key, source, **{**augment_options, switched_off: 0.0})
