"""DINOv2 Vision Transformer encoder (ViT-S/B/L/g at patch 14, registers optional), NHWC, Flax NNX.

Module and parameter names follow the torch.hub DINOv2 layout (`patch_embed`, `cls_token`,
`register_tokens`, `mask_token`, `pos_embed`, `blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma,
norm2, mlp.fc1, mlp.fc2 (SwiGLU: mlp.w12, mlp.w3), ls2.gamma}`, `norm`), so that weight import
(`weights/dinov2.py`) is a short table.

The encoder interface (`models.encoders`): images NHWC, normalised, first resized (bilinear) by
`input_scale` to a multiple of the patch (`scaled_input_hw`); the output is a 1-tuple with the
final-norm patch tokens on their grid, (B, h, w, D). The cls and register tokens are dropped.

`config.model.encoder` keys (type 'vit'; `config.vit_config` gives the S/B/L/g presets):
  embed_dim            D, the token width
  depth                number of transformer blocks
  num_heads            attention heads (head dim D / num_heads: 64 for every DINOv2 size)
  patch_size           side of the square patches (14)
  mlp_ratio            MLP hidden width / D (4)
  ffn                  'mlp' (fc1, exact GELU, fc2) or 'swiglu' (DINOv2's SwiGLUFFNFused, ViT-g)
  num_register_tokens  extra tokens after cls, without position embedding (0; 4 for `*_reg`)
  pretrain_size        image side the position embedding was trained at (518: a 37 x 37 grid)
  pos_interpolation    how the position grid is resampled to other inputs (POS_INTERPOLATIONS)
  layerscale_init      initial LayerScale gamma (1.0, the hub constructor's; checkpoints overwrite it)
  drop_path_rate       stochastic depth of the last block, rising linearly from 0 at the first (0.0)
  norm_eps             epsilon of every LayerNorm (1e-6)
  input_scale          the input is resized by this first (VFM-UDA: 1.1, 1024 -> 1120)
`config.model` gives the dtype, `scan_blocks`, `remat` and `attention_impl`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t2s_jax.models import layers
from t2s_jax.models.mit import attention_implementation

# Position-embedding resampling, each as PyTorch bicubic `interpolate` is called by:
#   'hub'             DINOv2 hub models without registers: scale_factor (out + 0.1) / G, no antialias
#   'size'            transformers' Dinov2Model: size=(h, w), no antialias
#   'size_antialias'  DINOv2 hub `*_reg` models and transformers' Dinov2WithRegistersModel
POS_INTERPOLATIONS = ("hub", "size", "size_antialias")
HUB_INTERPOLATE_OFFSET = 0.1  # DINOv2's `interpolate_offset`

_linear_init = jax.nn.initializers.truncated_normal(stddev=0.02)  # DINOv2's init_weights_vit_timm


def scaled_input_hw(image_hw: tuple[int, int], input_scale: float, patch_size: int) -> tuple[int, int]:
    """The size a ViT resizes an `image_hw` input to: each side times `input_scale`, rounded
    down to a multiple of the patch (VFM-UDA: 1024 x 1.1 -> 1120)."""
    return tuple(max(int(side * input_scale) // patch_size, 1) * patch_size for side in image_hw)


def token_grid_hw(encoder_config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The patch-token grid of the ViT `config.model.encoder` describes, for an `image_hw`
    input (VFM-UDA: 1024^2 crops -> 80 x 80)."""
    patch = int(encoder_config.patch_size)
    scaled = scaled_input_hw(image_hw, float(encoder_config.get("input_scale", 1.0)), patch)
    return scaled[0] // patch, scaled[1] // patch


def output_strides(encoder_config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Input pixels per feature of the one output: the patch size."""
    return (int(encoder_config.patch_size),)


# ----------------------------------------------------------------------------- position resampling


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a` at |x| (zero beyond 2)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(in_size: int, out_size: int, source_scale: float) -> np.ndarray:
    """PyTorch's bicubic resampling (no antialias, align_corners False) along one axis, (out, in).

    Output o reads source position s = scale * (o + 0.5) - 0.5 (float32, as PyTorch computes
    it) with a = -0.75 and the four taps clamped to the border.
    """
    scale = np.float32(source_scale)
    source = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    start = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    t = np.clip(source - start, 0.0, 1.0).astype(np.float64)
    weights = _cubic(np.stack([t + 1, t, 1 - t, 2 - t], axis=1), -0.75)
    taps = np.clip(start[:, None] + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.arange(out_size)[:, None].repeat(4, 1), taps), weights)
    return matrix


def _antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's antialiased bicubic resampling (the Pillow filter, a = -0.5) along one axis.

    Downsampling widens the kernel by the scale; taps outside the input are dropped and each
    row is renormalised (no border clamping).
    """
    scale = in_size / out_size
    support, stretch = (2.0 * scale, 1.0 / scale) if scale >= 1.0 else (2.0, 1.0)
    matrix = np.zeros((out_size, in_size))
    for o in range(out_size):
        centre = scale * (o + 0.5)
        first = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), in_size)
        weights = _cubic((np.arange(first, stop) - centre + 0.5) * stretch, -0.5)
        matrix[o, first:stop] = weights / weights.sum()
    return matrix


def check_pos_interpolation(mode: str) -> str:
    """`mode` if it names one of POS_INTERPOLATIONS."""
    if mode not in POS_INTERPOLATIONS:
        raise ValueError(
            f"unknown config.model.encoder.pos_interpolation {mode!r}; expected one of {POS_INTERPOLATIONS}"
        )
    return mode


def pos_resampling_matrix(grid: int, out_size: int, mode: str) -> np.ndarray:
    """(out_size, grid) float32 matrix resampling a `grid`-long position axis to `out_size` as
    `mode` (POS_INTERPOLATIONS) does it in PyTorch."""
    if check_pos_interpolation(mode) == "hub":
        # interpolate(scale_factor=(out + 0.1) / grid): PyTorch reads the source with 1 / scale_factor.
        scale_factor = (out_size + HUB_INTERPOLATE_OFFSET) / grid
        return _bicubic_matrix(grid, out_size, 1.0 / scale_factor).astype(np.float32)
    if mode == "size":
        return _bicubic_matrix(grid, out_size, grid / out_size).astype(np.float32)
    return _antialiased_bicubic_matrix(grid, out_size).astype(np.float32)


def resample_pos_grid(grid: jax.Array, out_hw: tuple[int, int], mode: str) -> jax.Array:
    """A (G, G, D) position grid resampled to (h, w, D) in float32: W_h . P . W_w^T.

    The grid comes back unchanged when (h, w) == (G, G), as DINOv2 and transformers return it.
    The matrices are constants per resolution, so the gradient reaches every grid entry.
    """
    size = grid.shape[0]
    grid = grid.astype(jnp.float32)
    if tuple(out_hw) == (size, size):
        return grid
    rows, cols = (jnp.asarray(pos_resampling_matrix(size, n, mode)) for n in out_hw)
    return jnp.einsum("hi,ijd,wj->hwd", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- blocks


def _linear(in_features: int, out_features: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, kernel_init=_linear_init, dtype=dtype, rngs=rngs)


def _layer_norm(features: int, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with one fused qkv Linear (queries, keys, values along its output)."""

    def __init__(self, dim: int, num_heads: int, *, attention_impl: str | None, dtype: jnp.dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.qkv = _linear(dim, 3 * dim, dtype, rngs)
        self.proj = _linear(dim, dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        out = layers.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention_impl)
        return self.proj(out.reshape(batch, tokens, dim))


class Mlp(nnx.Module):
    """Linear D -> hidden, exact GELU, Linear hidden -> D."""

    def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(dim, hidden, dtype, rngs)
        self.fc2 = _linear(hidden, dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLU(nnx.Module):
    """DINOv2's SwiGLUFFNFused: w12 gives [x1, x2], w3(silu(x1) * x2); hidden rounded as DINOv2 does."""

    def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = _linear(dim, 2 * hidden, dtype, rngs)
        self.w3 = _linear(hidden, dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x1, x2 = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(x1) * x2)


class LayerScale(nnx.Module):
    """Per-channel residual-branch scale gamma."""

    def __init__(self, dim: int, init_value: float):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class ViTBlock(nnx.Module):
    """Pre-norm block: x + DropPath(ls1(Attn(LN(x)))), then x + DropPath(ls2(FFN(LN(x))))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        ffn: str,
        layerscale_init: float,
        norm_eps: float,
        attention_impl: str | None,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        ffns = {"mlp": Mlp, "swiglu": SwiGLU}
        if ffn not in ffns:
            raise ValueError(f"unknown config.model.encoder.ffn {ffn!r}; expected one of {sorted(ffns)}")
        self.norm1 = _layer_norm(dim, norm_eps, dtype, rngs)
        self.attn = Attention(dim, num_heads, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = _layer_norm(dim, norm_eps, dtype, rngs)
        self.mlp = ffns[ffn](dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
        self.ls2 = LayerScale(dim, layerscale_init)

    def __call__(self, x: jax.Array, drop_path_rate: float | jax.Array, key: jax.Array | None) -> jax.Array:
        """`key` None: no stochastic depth (evaluation)."""
        attn_key = mlp_key = None
        if key is not None:
            attn_key, mlp_key = jax.random.split(key)
        # Per-sample stochastic depth (DINOv2's DropPath; above rate 0.1 DINOv2 instead runs the
        # branch on a random batch subset of fixed size, the same in expectation).
        x = x + layers.drop_path(self.ls1(self.attn(self.norm1(x))), drop_path_rate, attn_key)
        return x + layers.drop_path(self.ls2(self.mlp(self.norm2(x))), drop_path_rate, mlp_key)


class ViT(nnx.Module):
    """DINOv2 ViT: patch embedding, cls (+ register) tokens, interpolated position embedding,
    `depth` blocks (a list, or one scanned block), final LayerNorm."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int = 14,
        mlp_ratio: float = 4,
        ffn: str = "mlp",
        num_register_tokens: int = 0,
        pretrain_size: int = 518,
        pos_interpolation: str = "hub",
        layerscale_init: float = 1.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        input_scale: float = 1.0,
        in_channels: int = 3,
        attention_impl: str | None = None,
        scan_blocks: bool = False,
        remat: str = "none",
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if pretrain_size % patch_size:
            raise ValueError(f"pretrain_size {pretrain_size} is not a multiple of patch_size {patch_size}")
        self.embed_dims = (embed_dim,)
        self.depth = depth
        self.ffn = ffn
        self.patch_size = patch_size
        self.pretrain_grid = pretrain_size // patch_size
        self.input_scale = input_scale
        self.pos_interpolation = check_pos_interpolation(pos_interpolation)
        fan_in = in_channels * patch_size * patch_size
        kernel_init, bias_init = layers.torch_conv_init(fan_in)
        self.patch_embed = nnx.Conv(
            in_channels,
            embed_dim,
            (patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            rngs=rngs,
        )
        tiny_normal = jax.nn.initializers.normal(stddev=1e-6)
        self.cls_token = nnx.Param(tiny_normal(rngs.params(), (1, 1, embed_dim)))
        self.register_tokens = (
            nnx.Param(tiny_normal(rngs.params(), (1, num_register_tokens, embed_dim))) if num_register_tokens else None
        )
        self.num_register_tokens = num_register_tokens
        self.mask_token = nnx.Param(jnp.zeros((1, embed_dim)))
        self.pos_embed = nnx.Param(_linear_init(rngs.params(), (1, 1 + self.pretrain_grid**2, embed_dim)))
        make_block = functools.partial(
            ViTBlock,
            embed_dim,
            num_heads,
            mlp_ratio,
            ffn=ffn,
            layerscale_init=layerscale_init,
            norm_eps=norm_eps,
            attention_impl=attention_impl,
            dtype=dtype,
        )
        self.blocks = layers.build_blocks(make_block, depth, scan=scan_blocks, rngs=rngs)
        self.norm = _layer_norm(embed_dim, norm_eps, dtype, rngs)
        # Stochastic depth rises linearly from 0 to drop_path_rate (DINOv2's drop_path_uniform=False).
        self.drop_path_rates = tuple(float(r) for r in np.linspace(0.0, drop_path_rate, depth))
        self.scan_blocks = scan_blocks
        self.remat = layers.check_remat(remat)

    def patch_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of patch tokens for an image of `image_hw`."""
        if image_hw[0] % self.patch_size or image_hw[1] % self.patch_size:
            raise ValueError(f"ViT input {tuple(image_hw)} is not a multiple of the patch size {self.patch_size}")
        return image_hw[0] // self.patch_size, image_hw[1] // self.patch_size

    def pos_embedding(self, grid_hw: tuple[int, int]) -> jax.Array:
        """(1 + h * w, D) float32: the cls entry, then the patch grid resampled to `grid_hw`."""
        pos = self.pos_embed[...][0].astype(jnp.float32)
        size = self.pretrain_grid
        patches = resample_pos_grid(pos[1:].reshape(size, size, -1), grid_hw, self.pos_interpolation)
        return jnp.concatenate([pos[:1], patches.reshape(-1, pos.shape[-1])])

    def embed(self, images: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """The token sequence entering the blocks, (B, 1 + registers + h * w, D) in the compute dtype.

        `token_mask` (B, h * w) bool: True patch tokens are replaced by `mask_token` after the
        patch embedding, before the cls token and the position embedding (so they keep their
        position). Registers come after the position embedding, without one, as in DINOv2.
        """
        batch = images.shape[0]
        grid_hw = self.patch_grid(images.shape[1:3])
        x = self.patch_embed(images).reshape(batch, grid_hw[0] * grid_hw[1], -1)
        if token_mask is not None:
            if token_mask.shape != x.shape[:2]:
                raise ValueError(
                    f"token_mask of shape {token_mask.shape}; expected {x.shape[:2]} (batch, patch tokens)"
                )
            x = jnp.where(token_mask[..., None], self.mask_token[...].astype(x.dtype), x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (batch, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding(grid_hw).astype(x.dtype)
        if self.register_tokens is None:
            return x
        registers = jnp.broadcast_to(
            self.register_tokens[...].astype(x.dtype), (batch, self.num_register_tokens, x.shape[-1])
        )
        return jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)

    def __call__(
        self,
        images: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
        use_batch_stats: bool = False,
        num_batch_groups: int = 1,
        token_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, ...]:
        """`images` NHWC float, resized by `input_scale` first; `dropout_key` turns stochastic
        depth on (training); `token_mask` as in `embed`, on the resized input's token grid.
        Returns `(tokens,)`, (B, h, w, D). The ViT has no BatchNorm: `use_batch_stats` and
        `num_batch_groups` are the encoder interface's."""
        del use_batch_stats, num_batch_groups
        images = layers.resize_bilinear(images, scaled_input_hw(images.shape[1:3], self.input_scale, self.patch_size))
        grid_hw = self.patch_grid(images.shape[1:3])
        x = self.embed(images, token_mask)
        block_keys = None if dropout_key is None else jax.random.split(dropout_key, self.depth)
        x = layers.apply_blocks(
            self.blocks, x, self.drop_path_rates, block_keys, scan=self.scan_blocks, remat=self.remat
        )
        patches = self.norm(x)[:, 1 + self.num_register_tokens :]
        return (patches.reshape(x.shape[0], *grid_hw, x.shape[-1]),)


def build_vit(
    encoder_config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
) -> ViT:
    """ViT from `config.model.encoder` (shape) and `config.model` (dtype, scan, remat, attention)."""
    return ViT(
        embed_dim=int(encoder_config.embed_dim),
        depth=int(encoder_config.depth),
        num_heads=int(encoder_config.num_heads),
        patch_size=int(encoder_config.patch_size),
        mlp_ratio=float(encoder_config.mlp_ratio),
        ffn=str(encoder_config.ffn),
        num_register_tokens=int(encoder_config.num_register_tokens),
        pretrain_size=int(encoder_config.pretrain_size),
        pos_interpolation=str(encoder_config.pos_interpolation),
        layerscale_init=float(encoder_config.layerscale_init),
        drop_path_rate=float(encoder_config.drop_path_rate),
        norm_eps=float(encoder_config.norm_eps),
        input_scale=float(encoder_config.input_scale),
        attention_impl=attention_implementation(model_config.attention_impl),
        scan_blocks=bool(model_config.scan_blocks),
        remat=str(model_config.remat),
        dtype=layers.compute_dtype(model_config.dtype),
        rngs=rngs,
    )
