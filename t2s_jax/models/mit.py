"""Mix Transformer (MiT, SegFormer) encoder B0-B5, NHWC, Flax NNX.

Module names follow the SegFormer/mmseg layout (`patch_embed`, `blocks`, `attn.q`, `attn.kv`,
`attn.sr`, `attn.norm`, `mlp.fc1`, `mlp.dwconv`, `mlp.fc2`, `norm1`, `norm2`, stage `norm`)
so that weight import is a short table (see `weights/layouts.py`).

Tokens are kept on their (B, H, W, C) grid throughout: Linear layers act on the last axis,
and the MixFFN depthwise conv and the attention's spatial reduction need the grid anyway.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t2s_jax.models import layers

_linear_init = jax.nn.initializers.truncated_normal(stddev=0.02)  # mmseg MiT init for Linear layers


def _linear(in_features: int, out_features: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, kernel_init=_linear_init, dtype=dtype, rngs=rngs)


def _layer_norm(features: int, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance; flax computes the statistics in float32 for bfloat16 inputs.
    return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


class EfficientSelfAttention(nnx.Module):
    """Multi-head attention whose keys/values come from a spatially reduced (conv k=s=sr) map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        *,
        norm_eps: float,
        attention_impl: str | None,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.q = _linear(dim, dim, dtype, rngs)
        self.kv = _linear(dim, 2 * dim, dtype, rngs)  # keys then values along the output axis (mmseg)
        self.proj = _linear(dim, dim, dtype, rngs)
        if sr_ratio > 1:
            self.sr = nnx.Conv(
                dim,
                dim,
                (sr_ratio, sr_ratio),
                strides=sr_ratio,
                padding="VALID",
                kernel_init=layers.conv_fan_out_init(sr_ratio, dim),
                dtype=dtype,
                rngs=rngs,
            )
            self.norm = _layer_norm(dim, norm_eps, dtype, rngs)
        else:
            self.sr = None
            self.norm = None

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).reshape(batch, height * width, self.num_heads, head_dim)
        kv_source = self.norm(self.sr(x)) if self.sr is not None else x
        kv = self.kv(kv_source).reshape(batch, -1, 2, self.num_heads, head_dim)
        out = layers.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], self.attention_impl)
        return self.proj(out.reshape(batch, height, width, dim))


class MixFFN(nnx.Module):
    """Linear C->rC, depthwise 3x3 conv on the token grid, exact GELU, Linear rC->C."""

    def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(dim, hidden, dtype, rngs)
        self.dwconv = nnx.Conv(
            hidden,
            hidden,
            (3, 3),
            padding=((1, 1), (1, 1)),
            feature_group_count=hidden,
            kernel_init=layers.conv_fan_out_init(3, hidden, groups=hidden),
            dtype=dtype,
            rngs=rngs,
        )
        self.fc2 = _linear(hidden, dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.dwconv(self.fc1(x)), approximate=False))


class MiTBlock(nnx.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: int,
        *,
        block_norm_eps: float,
        embed_norm_eps: float,
        attention_impl: str | None,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.norm1 = _layer_norm(dim, block_norm_eps, dtype, rngs)
        self.attn = EfficientSelfAttention(
            dim, num_heads, sr_ratio, norm_eps=embed_norm_eps, attention_impl=attention_impl, dtype=dtype, rngs=rngs
        )
        self.norm2 = _layer_norm(dim, block_norm_eps, dtype, rngs)
        self.mlp = MixFFN(dim, dim * mlp_ratio, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, drop_path_rate: float | jax.Array, key: jax.Array | None) -> jax.Array:
        """`key` None: no stochastic depth (evaluation)."""
        attn_key = mlp_key = None
        if key is not None:
            attn_key, mlp_key = jax.random.split(key)
        x = x + layers.drop_path(self.attn(self.norm1(x)), drop_path_rate, attn_key)
        return x + layers.drop_path(self.mlp(self.norm2(x)), drop_path_rate, mlp_key)


class MiTStage(nnx.Module):
    """Overlap patch embedding, `depth` blocks (a list, or one scanned block), stage-end LayerNorm."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        *,
        patch_size: int,
        stride: int,
        depth: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: int,
        drop_path_rates: Sequence[float],
        embed_norm_eps: float,
        block_norm_eps: float,
        attention_impl: str | None,
        scan_blocks: bool,
        remat: str,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        pad = patch_size // 2
        self.patch_embed = nnx.Conv(
            in_channels,
            dim,
            (patch_size, patch_size),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
            kernel_init=layers.conv_fan_out_init(patch_size, dim),
            dtype=dtype,
            rngs=rngs,
        )
        self.patch_norm = _layer_norm(dim, embed_norm_eps, dtype, rngs)
        make_block = functools.partial(
            MiTBlock,
            dim,
            num_heads,
            sr_ratio,
            mlp_ratio,
            block_norm_eps=block_norm_eps,
            embed_norm_eps=embed_norm_eps,
            attention_impl=attention_impl,
            dtype=dtype,
        )
        self.blocks = layers.build_blocks(make_block, depth, scan=scan_blocks, rngs=rngs)
        self.norm = _layer_norm(dim, block_norm_eps, dtype, rngs)
        self.drop_path_rates = tuple(float(r) for r in drop_path_rates)
        self.scan_blocks = scan_blocks
        self.remat = layers.check_remat(remat)

    def __call__(self, x: jax.Array, block_keys: jax.Array | None) -> jax.Array:
        """`block_keys`: (depth, key) array, one stochastic-depth key per block, or None."""
        x = self.patch_norm(self.patch_embed(x))
        x = layers.apply_blocks(
            self.blocks, x, self.drop_path_rates, block_keys, scan=self.scan_blocks, remat=self.remat
        )
        return self.norm(x)


class MiT(nnx.Module):
    """MiT encoder: returns the four stage outputs, NHWC, strides 4/8/16/32, in the compute dtype."""

    def __init__(
        self,
        *,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        sr_ratios: Sequence[int],
        mlp_ratio: int = 4,
        drop_path_rate: float = 0.1,
        embed_norm_eps: float = 1e-5,
        block_norm_eps: float = 1e-6,
        in_channels: int = 3,
        attention_impl: str | None = None,
        scan_blocks: bool = False,
        remat: str = "none",
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not len(embed_dims) == len(depths) == len(num_heads) == len(sr_ratios):
            raise ValueError("embed_dims, depths, num_heads and sr_ratios must have one entry per stage")
        # Stochastic depth rises linearly from 0 to drop_path_rate over all blocks (mmseg's linspace).
        rates = np.linspace(0.0, drop_path_rate, sum(depths))
        starts = np.cumsum((0, *depths))
        self.depths = tuple(int(d) for d in depths)
        self.embed_dims = tuple(int(d) for d in embed_dims)
        self.stages = nnx.List(
            [
                MiTStage(
                    in_channels if i == 0 else embed_dims[i - 1],
                    embed_dims[i],
                    patch_size=7 if i == 0 else 3,
                    stride=4 if i == 0 else 2,
                    depth=depths[i],
                    num_heads=num_heads[i],
                    sr_ratio=sr_ratios[i],
                    mlp_ratio=mlp_ratio,
                    drop_path_rates=rates[starts[i] : starts[i + 1]],
                    embed_norm_eps=embed_norm_eps,
                    block_norm_eps=block_norm_eps,
                    attention_impl=attention_impl,
                    scan_blocks=scan_blocks,
                    remat=remat,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(depths))
            ]
        )

    def __call__(
        self,
        images: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
        use_batch_stats: bool = False,
        num_batch_groups: int = 1,
    ) -> tuple[jax.Array, ...]:
        """`images` NHWC float; `dropout_key` turns stochastic depth on (training). MiT has no
        BatchNorm: `use_batch_stats` and `num_batch_groups` are the encoder interface's
        (`models.encoders`), for encoders that do."""
        del use_batch_stats, num_batch_groups
        block_keys = None if dropout_key is None else jax.random.split(dropout_key, sum(self.depths))
        starts = np.cumsum((0, *self.depths))
        features = []
        x = images
        for i, stage in enumerate(self.stages):
            keys = None if block_keys is None else block_keys[starts[i] : starts[i + 1]]
            x = stage(x, keys)
            features.append(x)
        return tuple(features)


def output_strides(num_stages: int) -> tuple[int, ...]:
    """Input pixels per feature of each stage: 4 (the 7x7/4 patch embedding), then 2x per stage."""
    return tuple(4 * 2**i for i in range(num_stages))


def attention_implementation(name: str) -> str | None:
    """`config.model.attention_impl` -> the `implementation` of `layers.dot_product_attention`."""
    if name not in ("", "xla", "cudnn", "chunked"):
        raise ValueError(f"unknown attention_impl {name!r}; expected '', 'xla', 'cudnn' or 'chunked'")
    return name or None


def build_mit(
    encoder_config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
) -> MiT:
    """MiT from `config.model.encoder` (shape) and `config.model` (dtype, scan, remat, attention)."""
    return MiT(
        embed_dims=tuple(encoder_config.embed_dims),
        depths=tuple(encoder_config.depths),
        num_heads=tuple(encoder_config.num_heads),
        sr_ratios=tuple(encoder_config.sr_ratios),
        mlp_ratio=int(encoder_config.mlp_ratio),
        drop_path_rate=float(encoder_config.drop_path_rate),
        embed_norm_eps=float(encoder_config.embed_norm_eps),
        block_norm_eps=float(encoder_config.block_norm_eps),
        attention_impl=attention_implementation(model_config.attention_impl),
        scan_blocks=bool(model_config.scan_blocks),
        remat=str(model_config.remat),
        dtype=layers.compute_dtype(model_config.dtype),
        rngs=rngs,
    )
