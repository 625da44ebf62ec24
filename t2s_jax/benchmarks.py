"""What the benchmark configs share: the hosts (DAFormer, HRDA, DeepLab-V2, DINOv2 ViT), the source datasets, and the
method given as the config file's argument (`--config=configs/gta_cs_daformer.py:mic`).

A config file names its source dataset and the methods it states a target number for; the
settings a method needs beyond its preset of terms live here, once for every benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from t2s_jax import methods
from t2s_jax.config import ConfigError, default_config, mit_config, resnet_config, vit_config

MIT_B5_WEIGHTS = "weights/mit_b5.pth"  # SegFormer's ImageNet release, mmseg key layout
# mmcv's ImageNet ResNetV1c-101 (`open-mmlab://resnet101_v1c`, resnet101_v1c-e67eebb6.pth)
RESNET101_V1C_WEIGHTS = "weights/resnet101_v1c.pth"

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


def _with_method(
    config: ml_collections.ConfigDict,
    method: str,
    presets: Mapping[str, str],
    settings: Mapping[str, Mapping[str, Any]],
) -> ml_collections.ConfigDict:
    """`config` with the preset `method` names on this host and the settings it needs beyond it."""
    config = methods.with_method(config, presets.get(method, method))
    if method in settings:
        config.update_from_flattened_dict(settings[method])
    return config


def daformer_host(source: str, method: str, targets: Mapping[str, str]) -> ml_collections.ConfigDict:
    """MiT-B5 + DAFormer head at 512^2 crops (the schema's defaults) trained on `source` ->
    Cityscapes with `method`, one of `targets` (the methods the config states a number for)."""
    _check_method(method, targets)
    config = default_config()
    config.model.pretrained = MIT_B5_WEIGHTS
    config.data.source = source
    config.data.source_resize_hw = SOURCE_RESIZE_HW[source]
    return _with_method(config, method, {}, METHOD_SETTINGS)


# On DeepLab-V2, T2S-DA is run with either pulling loss (the paper's Table 4): `t2s` is InfoNCE.
DEEPLAB_PRESETS = {"t2s_mse": "t2s"}
DEEPLAB_METHOD_SETTINGS: dict[str, dict[str, Any]] = {"t2s_mse": {"pull.loss": "mse"}}


def deeplab_host(source: str, method: str, targets: Mapping[str, str]) -> ml_collections.ConfigDict:
    """DeepLab-V2 as DAFormer runs it: ResNetV1c-101 (deep stem, output stride 8) with the
    two-rate `dlv2red` head on the last stage, 512^2 crops, the DAFormer host's data, optimiser
    and schedule (BatchNorm parameters are decayed: the norm exemption is MiT's), feature
    distance on stage 4 (8-px cells); `method` one of `targets`."""
    _check_method(method, targets)
    config = default_config()
    config.model.encoder = resnet_config(101)
    config.model.head = "deeplabv2"
    config.model.aspp_dilations = (6, 12)
    config.model.pretrained = RESNET101_V1C_WEIGHTS
    config.data.source = source
    config.data.source_resize_hw = SOURCE_RESIZE_HW[source]
    return _with_method(config, method, DEEPLAB_PRESETS, DEEPLAB_METHOD_SETTINGS)


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
    return _with_method(config, method, HRDA_PRESETS, HRDA_METHOD_SETTINGS)


# torch.hub's DINOv2 checkpoints (dinov2_vit{b,l}14_pretrain.pth), docs/weights.md.
DINOV2_WEIGHTS = {"b": "weights/dinov2_vitb14_pretrain.pth", "l": "weights/dinov2_vitl14_pretrain.pth"}
# VFM-UDA resizes sources to a short side of 1440 (GTA5) or 1024 (SYNTHIA), targets to 1024.
VFM_SOURCE_RESIZE_HW = {"gta5": (1440, 2620), "synthia": (1024, 1725)}
# On the ViT host, T2S-DA is VFM-UDA + the pulling loss.
VFM_PRESETS = {"t2s": "t2s_vfm_uda"}


def apply_vfm_recipe(config: ml_collections.ConfigDict) -> None:
    """What VFM-UDA changes beyond the ViT itself, on any data (in place): the upscaling head,
    the flip-averaged teacher, the source CE over valid pixels, torchvision's per-image colour
    jitter, token masking in the masked pass, no feature distance, weight decay on every
    parameter, evaluation by sliding windows."""
    config.model.head = "vfm"
    uda = config.uda
    uda.teacher_flip = True
    uda.source_loss_mean = "valid"
    uda.fd_weight = 0.0
    uda.color_jitter_semantics = "torchvision"
    uda.augment_coins = "image"
    config.mic.mask_type = "token"
    config.optim.exempt_encoder_norms = False
    config.eval.mode = "slide"


def vfm_host(source: str, method: str, targets: Mapping[str, str], variant: str = "b") -> ml_collections.ConfigDict:
    """VFM-UDA (tue-mps/vfm-uda): DINOv2 ViT-`variant`/14 ('b' | 'l') + the light upscaling head,
    1024^2 crops resized to 1120 in the network, 8 + 8 images per step, VFM-UDA's recipe
    (`apply_vfm_recipe`), optimiser rates and margins, the 1024/512 slide at evaluation;
    `method` one of `targets`."""
    _check_method(method, targets)
    if variant not in DINOV2_WEIGHTS:
        choices = ", ".join(DINOV2_WEIGHTS)
        raise ConfigError(f"unknown ViT variant {variant!r} for this config; expected one of {choices}")
    config = default_config()
    config.model.encoder = vit_config(variant)
    config.model.pretrained = DINOV2_WEIGHTS[variant]
    # 6401 tokens: full attention scores would be 1.3 GB per image and layer (ViT-L); chunked
    # queries bound them on any backend ('cudnn' is the fused alternative on a GPU).
    config.model.attention_impl = "chunked"
    apply_vfm_recipe(config)
    data = config.data
    data.source = source
    data.source_resize_hw = VFM_SOURCE_RESIZE_HW[source]
    data.target_resize_hw = data.eval_resize_hw = (1024, 2048)
    data.crop_hw = (1024, 1024)
    data.batch_size = 8
    data.rcs.temperature = 0.05
    data.rcs.min_crop_pixels = 6000  # 3000 x (1024^2 / (512 x 1024))
    data.crop_retries = 20
    # 3 / 25 / 3 / 3 % of the stored 2048x1024 Cityscapes image (top, bottom, left, right).
    data.pseudo_margins = (30, 256, 61, 61)
    config.uda.pseudo_ignore_top = config.uda.pseudo_ignore_bottom = 0
    optim = config.optim
    # 5e-5 x sqrt(8 images); the encoder at 0.1 x that, the head at the base rate.
    optim.learning_rate = 5e-5 * 8**0.5 * 0.1
    optim.head_lr_multiplier = 10.0
    optim.warmup_ratio = 1e-3
    config.eval.slide_crop_hw = (1024, 1024)
    config.eval.slide_stride_hw = (512, 512)
    return _with_method(config, method, VFM_PRESETS, {})


def synthetic_demo() -> ml_collections.ConfigDict:
    """The demo's settings on the built-in synthetic pair (configs/synthetic_demo.py): a tiny
    MiT from random init, 128^2 crops of 128x256 images, a short schedule, on a CPU."""
    config = default_config()
    config.compare_methods = ("source_only", "daformer", "t2s")
    config.compare_seeds = ()  # e.g. (0, 1, 2): every method once per seed, mean +- std reported

    config.model.encoder = mit_config(
        "b0", embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)
    )
    # One block per stage and a few MB of activations: nothing to scan or rematerialise.
    config.model.scan_blocks = False
    config.model.remat = "none"
    # 32 channels: the decode head at stride 4 is most of the step's FLOPs (64: 2.3x slower steps).
    config.model.head_channels = 32
    config.model.projector.hidden_channels = 64
    config.model.projector.dim = 64

    data = config.data
    data.data_dir = "data/tfds"
    data.source = "synthetic_city/source"
    data.target = "synthetic_city/target"
    data.eval_dataset = "synthetic_city/target"
    data.eval_split = "val"
    data.source_resize_hw = (128, 256)  # the generator's size: no resize
    data.target_resize_hw = (128, 256)
    data.eval_resize_hw = (128, 256)
    data.crop_hw = (128, 128)
    # Pixel thresholds of rare class sampling scaled from 1280x720 / 512^2 to 128x256 / 128^2.
    data.rcs.min_pixels = 100
    data.rcs.min_crop_pixels = 50
    data.batch_size = 2
    data.num_workers = 0  # 2 cores: the step needs them more than the tiny host transforms
    data.eval_batch_size = 8

    # No ego vehicle and no ImageNet encoder in the synthetic world.
    config.uda.pseudo_ignore_top = 0
    config.uda.pseudo_ignore_bottom = 0
    config.uda.fd_weight = 0.0

    config.pull.num_negatives = 256

    # Random init (no ImageNet weights): 10x DAFormer's fine-tuning rate. The steps are most of
    # the demo's time (T2S-DA's cost over DAFormer is its two extra passes, not the pulling
    # loss); 150 per method keep the three within 10 minutes on a 2-core CPU (README).
    config.optim.learning_rate = 6e-4
    config.optim.warmup_steps = 15
    config.train.num_steps = 150
    config.train.log_every = 50
    config.train.eval_every = 150
    # One save per method: a stop signal still saves the step it stops at.
    config.train.checkpoint_every = 150
    config.train.num_pictures = 2
    return config
