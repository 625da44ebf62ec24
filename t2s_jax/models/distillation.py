"""The feature-distillation head of VFM-UDA++ (tue-mps/vfm-uda-plusplus `DistillFeatureHead`): the
student's last encoder stage mapped into the frozen reference encoder's feature space, a 1x1
conv D -> 4D with bias, LayerNorm (timm's LayerNorm2d: over channels, eps 1e-6), exact GELU and
a 1x1 conv 4D -> D_ref with bias, PyTorch's default init. The distillation term resizes its
output to the reference grid."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t2s_jax.models import layers


class DistillationHead(nnx.Module):
    """(B, h, w, D) features -> (B, h, w, out_channels) float32."""

    def __init__(self, in_channels: int, out_channels: int, *, expansion: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        hidden = in_channels * expansion
        kernel_init, bias_init = layers.torch_conv_init(in_channels)
        self.expand = nnx.Conv(
            in_channels, hidden, (1, 1), kernel_init=kernel_init, bias_init=bias_init, dtype=dtype, rngs=rngs
        )
        self.norm = nnx.LayerNorm(hidden, epsilon=1e-6, dtype=dtype, rngs=rngs)
        kernel_init, bias_init = layers.torch_conv_init(hidden)
        self.project = nnx.Conv(
            hidden, out_channels, (1, 1), kernel_init=kernel_init, bias_init=bias_init, dtype=dtype, rngs=rngs
        )

    def __call__(self, features: jax.Array) -> jax.Array:
        hidden = jax.nn.gelu(self.norm(self.expand(features)), approximate=False)
        return self.project(hidden).astype(jnp.float32)
