"""What the benchmark configs share: the DAFormer host, the source datasets, and the method
given as the config file's argument (`--config=configs/gta_cs_daformer.py:mic`).

A config file names its source dataset and the methods it states a target number for; the
settings a method needs beyond its preset of terms live here, once for every benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from t2s_jax import methods
from t2s_jax.config import ConfigError, default_config

MIT_B5_WEIGHTS = "weights/mit_b5.pth"  # SegFormer's ImageNet release, mmseg key layout

# Source datasets: the size each is trained at (fit inside, keeping the aspect ratio).
SOURCE_RESIZE_HW = {
    "gta5": (720, 1280),  # 1914x1052 -> 704x1280
    "synthia": (760, 1280),  # SYNTHIA-RAND-CITYSCAPES keeps its 1280x760
}

# What a method sets beyond its preset, on every benchmark of the DAFormer host. MIC's and
# MaskTwins' 32-px mask blocks are the schema's defaults for its 512^2 crops.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    # The released MaskTwins code trains on the first target image of each batch (docs/method.md §7).
    "masktwins": {"masktwins.single_target_image": True},
}


def daformer_host(source: str, method: str, targets: Mapping[str, str]) -> ml_collections.ConfigDict:
    """MiT-B5 + DAFormer head at 512^2 crops (the schema's defaults) trained on `source` ->
    Cityscapes with `method`, one of `targets` (the methods the config states a number for)."""
    if method not in targets:
        raise ConfigError(f"unknown method {method!r} for this config; expected one of {', '.join(targets)}")
    config = default_config()
    config.model.pretrained = MIT_B5_WEIGHTS
    config.data.source = source
    config.data.source_resize_hw = SOURCE_RESIZE_HW[source]
    config = methods.with_method(config, method)
    if method in METHOD_SETTINGS:
        config.update_from_flattened_dict(METHOD_SETTINGS[method])
    return config
