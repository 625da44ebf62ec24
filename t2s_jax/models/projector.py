"""T2S-DA projector: two Conv3x3-BN-ReLU blocks, then a 1x1 conv to the embedding dim."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t2s_jax.models import layers


class Projector(nnx.Module):
    """Maps a feature map to per-pixel embeddings. Returns them UNnormalised, float32 (the loss normalises)."""

    def __init__(
        self,
        in_channels: int,
        *,
        hidden_channels: int,
        dim: int,
        bn_momentum: float,
        bn_eps: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        bn = dict(bn_momentum=bn_momentum, bn_eps=bn_eps, dtype=dtype, rngs=rngs)
        self.conv1 = layers.ConvBNReLU(in_channels, hidden_channels, 3, **bn)
        self.conv2 = layers.ConvBNReLU(hidden_channels, hidden_channels, 3, **bn)
        self.out = nnx.Conv(hidden_channels, dim, (1, 1), kernel_init=layers.kaiming_fan_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, use_batch_stats: bool, num_batch_groups: int = 1) -> jax.Array:
        bn = dict(use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups)
        return self.out(self.conv2(self.conv1(x, **bn), **bn)).astype(jnp.float32)
