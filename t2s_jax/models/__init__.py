"""Encoders (MiT, ResNet), decode heads (DAFormer, SegFormer, DeepLab-V2), T2S-DA projector, HRDA
multi-resolution pieces, segmentor, pretrained-weight import."""

from t2s_jax.models.encoders import build_encoder
from t2s_jax.models.heads import DAFormerHead, DeepLabV2Head, SegFormerHead
from t2s_jax.models.hrda import ScaleAttentionHead
from t2s_jax.models.layers import BatchNorm, resize_bilinear, stack_passes, unstack_passes
from t2s_jax.models.mit import MiT
from t2s_jax.models.projector import Projector
from t2s_jax.models.resnet import ResNet, build_resnet
from t2s_jax.models.segmentor import (
    Segmentor,
    SegmentorOutput,
    build_segmentor,
    is_encoder_norm_param,
    is_head_param,
)
from t2s_jax.models.weights import (
    LoadSummary,
    WeightsError,
    count_parameters,
    from_hf_pretrained,
    is_converted_dir,
    load_hf_pretrained,
    load_mit_pth,
    load_pretrained_encoder,
    load_resnet_pretrained,
    load_segmentor,
    maybe_load_pretrained,
    model_config_from_hf,
    read_checkpoint,
    read_converted,
)

__all__ = [
    "BatchNorm",
    "DAFormerHead",
    "DeepLabV2Head",
    "LoadSummary",
    "MiT",
    "Projector",
    "ResNet",
    "ScaleAttentionHead",
    "SegFormerHead",
    "Segmentor",
    "SegmentorOutput",
    "WeightsError",
    "build_encoder",
    "build_resnet",
    "build_segmentor",
    "count_parameters",
    "from_hf_pretrained",
    "is_converted_dir",
    "load_hf_pretrained",
    "is_encoder_norm_param",
    "is_head_param",
    "load_mit_pth",
    "load_pretrained_encoder",
    "load_resnet_pretrained",
    "load_segmentor",
    "maybe_load_pretrained",
    "model_config_from_hf",
    "read_checkpoint",
    "read_converted",
    "resize_bilinear",
    "stack_passes",
    "unstack_passes",
]
