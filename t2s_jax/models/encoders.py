"""The encoder interface, and the encoder `config.model.encoder.type` names.

An encoder maps NHWC normalised images to its stage outputs (NHWC, compute dtype), called as
`encoder(images, dropout_key=..., use_batch_stats=..., num_batch_groups=...)` (a ViT also takes
`token_mask=`, the patch tokens it replaces by its mask token), and exposes
`embed_dims` (channels per stage); `output_strides(encoder_config)` gives the input pixels per
feature of each stage from the config alone. Heads, the projector, the hosts and HRDA read only
these.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from t2s_jax.models import mit, resnet, vit
from t2s_jax.models.mit import MiT, build_mit
from t2s_jax.models.resnet import ResNet, build_resnet
from t2s_jax.models.vit import ViT, build_vit

Encoder = MiT | ResNet | ViT

_BUILDERS = {"mit": build_mit, "resnet": build_resnet, "vit": build_vit}


def encoder_type(encoder_config: ml_collections.ConfigDict) -> str:
    """The type of an encoder config ('mit' for model configs stored before there were two)."""
    return str(encoder_config.get("type", "mit"))


def describe(encoder_config: ml_collections.ConfigDict) -> str:
    """The encoder in a few words, for logs and benchmark tables."""
    if encoder_type(encoder_config) == "vit":
        return f"ViT/{encoder_config.patch_size} dim {encoder_config.embed_dim} depth {encoder_config.depth}"
    if encoder_type(encoder_config) == "resnet":
        return f"ResNet depths {tuple(encoder_config.depths)} widths {tuple(encoder_config.base_widths)} stem {encoder_config.stem}"
    return f"MiT dims {tuple(encoder_config.embed_dims)} depths {tuple(encoder_config.depths)}"


def output_strides(encoder_config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Input pixels per feature of each stage of the encoder `encoder_config` describes."""
    if encoder_type(encoder_config) == "vit":
        return vit.output_strides(encoder_config)
    if encoder_type(encoder_config) == "resnet":
        return resnet.output_strides(tuple(encoder_config.strides))
    return mit.output_strides(len(encoder_config.depths))


def build_encoder(
    encoder_config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
) -> Encoder:
    """The encoder of `config.model.encoder` (shape) and `config.model` (dtype, remat, ...)."""
    kind = encoder_type(encoder_config)
    if kind not in _BUILDERS:
        raise ValueError(f"unknown config.model.encoder.type {kind!r}; expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[kind](encoder_config, model_config, rngs=rngs)
