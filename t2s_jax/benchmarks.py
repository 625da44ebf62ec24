"""What the benchmark configs share: the hosts (DAFormer, HRDA), the source datasets, and the
method given as the config file's argument (`--config=configs/gta_cs_daformer.py:mic`).

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


def _check_method(method: str, targets: Mapping[str, str]) -> None:
    if method not in targets:
        raise ConfigError(f"unknown method {method!r} for this config; expected one of {', '.join(targets)}")


def daformer_host(source: str, method: str, targets: Mapping[str, str]) -> ml_collections.ConfigDict:
    """MiT-B5 + DAFormer head at 512^2 crops (the schema's defaults) trained on `source` ->
    Cityscapes with `method`, one of `targets` (the methods the config states a number for)."""
    _check_method(method, targets)
    config = default_config()
    config.model.pretrained = MIT_B5_WEIGHTS
    config.data.source = source
    config.data.source_resize_hw = SOURCE_RESIZE_HW[source]
    config = methods.with_method(config, method)
    if method in METHOD_SETTINGS:
        config.update_from_flattened_dict(METHOD_SETTINGS[method])
    return config


# HRDA trains at high resolution: sources fit into these sizes (GTA5 -> 2560x1407), Cityscapes
# stays at 2048x1024, crops 1024^2 with 512^2 detail crops (docs/hosts.md).
HRDA_SOURCE_RESIZE_HW = {"gta5": (1440, 2560), "synthia": (1520, 2560)}
# On HRDA the DAFormer strategies are the method "hrda"; the other presets keep their names.
HRDA_PRESETS = {"hrda": "daformer"}
# What a method sets beyond its preset on the HRDA host: mask blocks of 64 px at 1024^2 crops.
HRDA_METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "mic": {"mic.block_size": 64},
    "t2s_mic": {"mic.block_size": 64},
    "masktwins": {"masktwins.block_size": 64, "masktwins.single_target_image": True},
}


def hrda_host(source: str, method: str, targets: Mapping[str, str]) -> ml_collections.ConfigDict:
    """HRDA around MiT-B5 + DAFormer head: 1024^2 crops of the high-resolution images, context at
    0.5, 512^2 detail crops, HRDA's pseudo-label margins and RCS crop threshold, the 1024/512
    slide at evaluation; `method` one of `targets`."""
    _check_method(method, targets)
    config = default_config()
    config.model.pretrained = MIT_B5_WEIGHTS
    config.model.hrda.enabled = True
    data = config.data
    data.source = source
    data.source_resize_hw = HRDA_SOURCE_RESIZE_HW[source]
    data.target_resize_hw = data.eval_resize_hw = (1024, 2048)
    data.crop_hw = (1024, 1024)
    data.rcs.min_crop_pixels = 6000  # 3000 x min_crop_ratio 2.0
    # Margins on the stored Cityscapes image replace DAFormer's crop rows.
    data.pseudo_margins = (30, 240, 30, 30)
    config.uda.pseudo_ignore_top = config.uda.pseudo_ignore_bottom = 0
    config.eval.mode = "slide"
    config.eval.slide_crop_hw = (1024, 1024)
    config.eval.slide_stride_hw = (512, 512)
    config = methods.with_method(config, HRDA_PRESETS.get(method, method))
    if method in HRDA_METHOD_SETTINGS:
        config.update_from_flattened_dict(HRDA_METHOD_SETTINGS[method])
    return config
