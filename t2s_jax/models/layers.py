"""Small building blocks shared by the encoder, the heads and the projector.

Randomness never lives inside a module: drop-path and dropout take an explicit key, so a
model's state is only `nnx.Param` and `nnx.BatchStat` and pure step functions can thread it
with `nnx.split` / `nnx.merge`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# `config.model.remat`: what the backward pass keeps of each encoder block (`jax.checkpoint`
# policies); everything else is recomputed from the block's input.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every intermediate is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input
    "dots": jax.checkpoint_policies.dots_saveable,  # matmul and convolution outputs
    # Linear outputs; attention, convolutions, GELU and norms are recomputed.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# `config.model.attention_impl='chunked'`: queries per chunk of the memory-bounded attention.
ATTENTION_QUERY_CHUNK = 512


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None) -> jax.Array:
    """Softmax attention over (B, T, heads, head_dim) queries, keys and values.

    implementation: None / 'xla' / 'cudnn' as `jax.nn.dot_product_attention` takes them;
    'chunked': the queries in chunks of `ATTENTION_QUERY_CHUNK`, one after the other, each
    recomputed in the backward pass, so at most one chunk's (B, heads, chunk, T_k) scores
    exist at a time: a memory-bounded attention on any backend (a ViT at 1120^2 has 6401
    tokens; its full scores are 1.3 GB per image, head group and layer).
    """
    if implementation != "chunked":
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    batch, tokens = q.shape[:2]
    chunk = min(ATTENTION_QUERY_CHUNK, tokens)
    chunks = -(-tokens // chunk)
    padded = jnp.pad(q, ((0, 0), (0, chunks * chunk - tokens), (0, 0), (0, 0)))
    per_chunk = padded.reshape(batch, chunks, chunk, *q.shape[2:]).swapaxes(0, 1)
    attend = jax.checkpoint(lambda queries: jax.nn.dot_product_attention(queries, k, v))
    out = jax.lax.map(attend, per_chunk).swapaxes(0, 1)
    return out.reshape(batch, chunks * chunk, *q.shape[2:])[:, :tokens]


def compute_dtype(name: str) -> jnp.dtype:
    """The compute dtype named by `config.model.dtype`."""
    if name not in DTYPES:
        raise ValueError(f"unknown model dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_remat(remat: str) -> str:
    """`remat` if it names a policy of `REMAT_POLICIES`."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown config.model.remat {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    return remat


def checkpoint(fn, remat: str, *, prevent_cse: bool = True):
    """`fn` rematerialised under the policy `remat` names (`fn` itself for 'none').

    prevent_cse=False is safe (and cheaper) inside `lax.scan`, whose loop already keeps the
    recomputation from being merged with the forward pass.
    """
    if check_remat(remat) == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


def checkpoint_module_call(fn, remat: str):
    """`fn(module, *args)` rematerialised under the policy `remat` names, the module's
    BatchNorm statistics still updated (`nnx.remat`); `fn` itself for 'none'."""
    if check_remat(remat) == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[remat])


def build_blocks(make_block: Callable[..., nnx.Module], depth: int, *, scan: bool, rngs: nnx.Rngs) -> nnx.Module:
    """`depth` blocks of `make_block(rngs=...)`: one block whose parameters carry a leading
    `depth` axis (scan: XLA compiles it once, however deep), or a list of blocks."""
    if not scan:
        return nnx.List([make_block(rngs=rngs) for _ in range(depth)])

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_stacked(block_rngs: nnx.Rngs) -> nnx.Module:
        return make_block(rngs=block_rngs)

    return make_stacked(rngs)


def _apply_block(graphdef: nnx.GraphDef, x: jax.Array, state: nnx.State, rate: jax.Array, key: jax.Array | None):
    """Pure application of one block: what `lax.scan` and `jax.checkpoint` wrap."""
    return nnx.merge(graphdef, state)(x, rate, key)


def apply_blocks(
    blocks: nnx.Module,
    x: jax.Array,
    drop_path_rates: Sequence[float],
    block_keys: jax.Array | None,
    *,
    scan: bool,
    remat: str,
) -> jax.Array:
    """`x` through the blocks of `build_blocks`, each called `block(x, drop_path_rate, key)` and
    rematerialised under `remat`; `block_keys` (depth, key) or None (no stochastic depth)."""
    if scan:
        graphdef, state = nnx.split(blocks)
        apply = checkpoint(functools.partial(_apply_block, graphdef), remat, prevent_cse=False)

        def body(carry, per_block):
            block_state, rate, key = per_block
            return apply(carry, block_state, rate, key), None

        x, _ = jax.lax.scan(body, x, (state, jnp.asarray(drop_path_rates, jnp.float32), block_keys))
        return x
    for i, block in enumerate(blocks):
        graphdef, state = nnx.split(block)
        apply = checkpoint(functools.partial(_apply_block, graphdef), remat)
        x = apply(x, state, jnp.float32(drop_path_rates[i]), None if block_keys is None else block_keys[i])
    return x


def torch_conv_init(fan_in: int) -> tuple[jax.nn.initializers.Initializer, jax.nn.initializers.Initializer]:
    """PyTorch's default Conv2d / Linear initialisation (kaiming_uniform with a = sqrt(5), i.e.
    U(+-1/sqrt(fan_in)), for the weight and the bias), as (kernel_init, bias_init)."""
    bound = 1.0 / math.sqrt(fan_in)

    def uniform(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return uniform, uniform


def conv_fan_out_init(kernel_size: int, out_channels: int, groups: int = 1) -> jax.nn.initializers.Initializer:
    """Normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups, the MiT (mmseg) conv init."""
    fan_out = kernel_size * kernel_size * out_channels // groups
    return jax.nn.initializers.normal(stddev=math.sqrt(2.0 / fan_out))


# Kaiming normal (fan_out, ReLU gain): mmcv's ConvModule init for the head's convolutions.
kaiming_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def drop_path(x: jax.Array, rate: float | jax.Array, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones;
    `key` None (evaluation, teacher): `x` itself.

    `rate` may be traced (one value per block inside a scanned stage).
    """
    if key is None:
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


def channel_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Dropout of whole NHWC feature maps (PyTorch `Dropout2d`), kept maps scaled by 1/(1-rate)."""
    if rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0], 1, 1, x.shape[-1]))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def stack_passes(passes: list[jax.Array]) -> jax.Array:
    """One batch from G equal passes, interleaved example-major (see `BatchNorm`)."""
    stacked = jnp.stack(passes, axis=1)
    return stacked.reshape(-1, *stacked.shape[2:])


def unstack_passes(x: jax.Array, num_passes: int) -> list[jax.Array]:
    """The G passes of a batch built by `stack_passes`."""
    grouped = x.reshape(-1, num_passes, *x.shape[1:])
    return [grouped[:, index] for index in range(num_passes)]


def resize_bilinear(x: jax.Array, size_hw: tuple[int, int]) -> jax.Array:
    """Bilinear NHWC resize matching PyTorch `interpolate(mode='bilinear', align_corners=False)`.

    Half-pixel centres; no antialiasing, so downsampling also samples like PyTorch (jax
    antialiases by default). The one resize of features, logits and evaluation outputs.
    """
    if tuple(x.shape[1:3]) == tuple(size_hw):
        return x
    shape = (x.shape[0], *size_hw, x.shape[-1])
    return jax.image.resize(x, shape, method="linear", antialias=False)


class BatchNorm(nnx.Module):
    """BatchNorm over NHWC with ghost batches, running statistics as PyTorch keeps them.

    One jitted training step often runs several passes (source images, mixed images, ...) as
    one batched forward; each pass must be normalised with its own statistics. With
    `num_batch_groups=G` the batch holds G passes interleaved example-major: row i*G + g is
    example i of pass g (`stack_passes` builds it). That layout keeps every example of a
    device on that device when the batch axis is sharded, where consecutive groups would
    need an all-to-all. Each pass is normalised with its own mean and biased variance.

    The running statistics then take one update per pass, in pass order, as DAFormer's
    separate forwards do (source, then mixed, then the pseudo-target pass of T2S-DA):

        for g in 0 .. G-1:
            mean = momentum * mean + (1 - momentum) * pass_mean[g]
            var  = momentum * var  + (1 - momentum) * pass_var[g] * n / (n - 1)

    with n the values per channel in one pass: `var` holds the unbiased variance, as PyTorch's
    `running_var` does (mmseg checkpoints import unchanged, evaluation normalises with it).
    Flax's `momentum` 0.9 is PyTorch's 0.1. Statistics and normalisation are computed in
    float32 whatever the compute dtype.
    """

    def __init__(self, num_features: int, *, momentum: float, epsilon: float, dtype: jnp.dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, use_batch_stats: bool, num_batch_groups: int = 1) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if use_batch_stats:
            batch = x.shape[0]
            if num_batch_groups < 1 or batch % num_batch_groups:
                raise ValueError(f"batch of {batch} cannot be split into {num_batch_groups} equal BatchNorm groups")
            groups = x32.reshape(batch // num_batch_groups, num_batch_groups, *x.shape[1:])
            axes = (0, *range(2, groups.ndim - 1))  # all but the pass and channel axes
            mean = groups.mean(axes, keepdims=True)
            var = jnp.square(groups - mean).mean(axes, keepdims=True)  # two-pass: safe for large means
            y = ((groups - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            values_per_pass = x.size // (num_batch_groups * x.shape[-1])
            unbiased = values_per_pass / max(values_per_pass - 1, 1)  # n = 1: the variance is 0 anyway
            pass_means = jax.lax.stop_gradient(mean.reshape(num_batch_groups, -1))
            pass_vars = jax.lax.stop_gradient(var.reshape(num_batch_groups, -1)) * unbiased
            running_mean, running_var = self.mean[...], self.var[...]
            for g in range(num_batch_groups):
                running_mean = self.momentum * running_mean + (1.0 - self.momentum) * pass_means[g]
                running_var = self.momentum * running_var + (1.0 - self.momentum) * pass_vars[g]
            self.mean[...], self.var[...] = running_mean, running_var
        else:
            y = (x32 - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.epsilon)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class ConvBNReLU(nnx.Module):
    """Conv (no bias: BatchNorm follows) + BatchNorm + ReLU, mmcv's `ConvModule`.

    `groups == in_channels` makes it depthwise.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        dilation: int = 1,
        groups: int = 1,
        bn_momentum: float,
        bn_eps: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        pad = dilation * (kernel_size // 2)
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            (kernel_size, kernel_size),
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=dilation,
            feature_group_count=groups,
            use_bias=False,
            kernel_init=kaiming_fan_out,
            dtype=dtype,
            rngs=rngs,
        )
        self.bn = BatchNorm(out_channels, momentum=bn_momentum, epsilon=bn_eps, dtype=dtype)

    def __call__(self, x: jax.Array, *, use_batch_stats: bool, num_batch_groups: int = 1) -> jax.Array:
        y = self.bn(self.conv(x), use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups)
        return jax.nn.relu(y)
