"""Hosts: what the train step, the loss terms and evaluation talk to instead of the model.

`base.Host` is the interface (student forward over named passes, teacher forward over views,
a pass's segmentation loss, the ImageNet features of the feature distance, evaluation logits);
`base.SingleScaleHost` is DAFormer's one-forward-per-image host; `hrda.HRDAHost` wraps it in
HRDA's multi-resolution training and inference. A new host is a new module here.
"""

import ml_collections

from t2s_jax.hosts.base import Host, MaskedTokens, SingleScaleHost
from t2s_jax.hosts.hrda import HRDAHost, HRDAOutput
from t2s_jax.models.segmentor import segmentor_output_stride


def build_host(config: ml_collections.ConfigDict) -> Host:
    """The host of a run config: HRDA when `config.model.hrda.enabled`, else single-scale."""
    if config.model.hrda.enabled and config.model.encoder.get("type") == "vit":
        raise ValueError("config.model.hrda.enabled=True with a ViT encoder: HRDA runs on MiT and ResNet encoders")
    single_scale = SingleScaleHost(segmentor_output_stride(config.model))
    return HRDAHost(config, single_scale) if config.model.hrda.enabled else single_scale


__all__ = ["HRDAHost", "HRDAOutput", "Host", "MaskedTokens", "SingleScaleHost", "build_host"]
