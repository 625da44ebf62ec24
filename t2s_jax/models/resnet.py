"""ResNet encoder with bottleneck blocks: mmcv's ResNetV1c (deep stem) or torchvision's 7x7 stem.

DAFormer's DeepLab-V2 host uses ResNetV1c-101 with strides (1, 2, 1, 1) and dilations
(1, 1, 2, 4), i.e. output stride 8. Bottlenecks are "pytorch" style (the stride sits on the
3x3 conv); with `contract_dilation` the first block of a dilated stage uses half the
dilation (mmseg's `ResLayer`), the pattern torchvision's `replace_stride_with_dilation`
produces too. BatchNorm is trained and normalises with batch statistics in training.
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

EXPANSION = 4  # bottleneck output channels = EXPANSION * width
STEMS = ("deep", "7x7")


def _conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, dilation: int = 1, dtype, rngs):
    """Conv without bias (BatchNorm follows), PyTorch padding `dilation * (k // 2)`, mmcv's Kaiming init."""
    pad = dilation * (kernel_size // 2)
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=dilation,
        use_bias=False,
        kernel_init=layers.kaiming_fan_out,
        dtype=dtype,
        rngs=rngs,
    )


def output_strides(strides: Sequence[int]) -> tuple[int, ...]:
    """Input pixels per feature of each stage: the stem and its pool (4), then each stage's stride."""
    return tuple(int(4 * np.prod(strides[: i + 1])) for i in range(len(strides)))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """PyTorch `MaxPool2d(3, stride=2, padding=1)`: the padding never wins (-inf)."""
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Bottleneck(nnx.Module):
    """1x1 -> BN -> ReLU -> 3x3 (stride, dilation) -> BN -> ReLU -> 1x1 -> BN, + shortcut, ReLU.

    The shortcut is a strided 1x1 conv + BN when the stride or the channels change. `bn3`
    starts at scale 0 (mmseg's `zero_init_residual=True`), so a fresh block is the identity
    on its shortcut.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        *,
        stride: int,
        dilation: int,
        bn_momentum: float,
        bn_eps: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        out_channels = width * EXPANSION
        bn = dict(momentum=bn_momentum, epsilon=bn_eps, dtype=dtype)
        self.conv1 = _conv(in_channels, width, 1, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(width, **bn)
        self.conv2 = _conv(width, width, 3, stride=stride, dilation=dilation, dtype=dtype, rngs=rngs)
        self.bn2 = layers.BatchNorm(width, **bn)
        self.conv3 = _conv(width, out_channels, 1, dtype=dtype, rngs=rngs)
        self.bn3 = layers.BatchNorm(out_channels, **bn)
        self.bn3.scale[...] = jnp.zeros_like(self.bn3.scale[...])
        if stride != 1 or in_channels != out_channels:
            self.downsample_conv = _conv(in_channels, out_channels, 1, stride=stride, dtype=dtype, rngs=rngs)
            self.downsample_bn = layers.BatchNorm(out_channels, **bn)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: jax.Array, *, use_batch_stats: bool, num_batch_groups: int = 1) -> jax.Array:
        bn = dict(use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups)
        y = jax.nn.relu(self.bn1(self.conv1(x), **bn))
        y = jax.nn.relu(self.bn2(self.conv2(y), **bn))
        y = self.bn3(self.conv3(y), **bn)
        shortcut = x if self.downsample_conv is None else self.downsample_bn(self.downsample_conv(x), **bn)
        return jax.nn.relu(y + shortcut)


def _apply_block(
    graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, *, use_batch_stats: bool, num_batch_groups: int
) -> tuple[jax.Array, nnx.State]:
    """A block as a pure function: (output, its updated BatchNorm statistics)."""
    block = nnx.merge(graphdef, state, copy=True)
    y = block(x, use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups)
    return y, nnx.state(block, nnx.BatchStat)


class ResNet(nnx.Module):
    """Bottleneck ResNet returning the four stage outputs (NHWC, compute dtype).

    `stem` "deep": three 3x3 convs (stride 2 on the first; stem_channels // 2,
    stem_channels // 2, stem_channels), each with BN + ReLU (mmcv ResNetV1c); "7x7": one
    7x7/2 conv + BN + ReLU (torchvision). Both end in a 3x3/2 max-pool. `remat`
    rematerialises each bottleneck block (`layers.REMAT_POLICIES`).
    """

    def __init__(
        self,
        *,
        depths: Sequence[int],
        base_widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "deep",
        stem_channels: int = 64,
        strides: Sequence[int] = (1, 2, 1, 1),
        dilations: Sequence[int] = (1, 1, 2, 4),
        contract_dilation: bool = True,
        bn_momentum: float,
        bn_eps: float,
        remat: str = "none",
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if stem not in STEMS:
            raise ValueError(f"unknown config.model.encoder.stem {stem!r}; expected one of {list(STEMS)}")
        if not len(depths) == len(base_widths) == len(strides) == len(dilations):
            raise ValueError(
                "config.model.encoder.{depths, base_widths, strides, dilations} must have one entry per stage; "
                f"got {list(depths)}, {list(base_widths)}, {list(strides)}, {list(dilations)}"
            )
        self.stem = stem
        self.depths = tuple(depths)
        self.remat = layers.check_remat(remat)
        bn = dict(momentum=bn_momentum, epsilon=bn_eps, dtype=dtype)
        if stem == "deep":
            half = stem_channels // 2
            self.stem_conv1 = _conv(3, half, 3, stride=2, dtype=dtype, rngs=rngs)
            self.stem_bn1 = layers.BatchNorm(half, **bn)
            self.stem_conv2 = _conv(half, half, 3, dtype=dtype, rngs=rngs)
            self.stem_bn2 = layers.BatchNorm(half, **bn)
            self.stem_conv3 = _conv(half, stem_channels, 3, dtype=dtype, rngs=rngs)
            self.stem_bn3 = layers.BatchNorm(stem_channels, **bn)
        else:
            self.conv1 = _conv(3, stem_channels, 7, stride=2, dtype=dtype, rngs=rngs)
            self.bn1 = layers.BatchNorm(stem_channels, **bn)
        stages, in_channels = [], stem_channels
        for depth, width, stride, dilation in zip(depths, base_widths, strides, dilations, strict=True):
            first_dilation = dilation // 2 if contract_dilation and dilation > 1 else dilation
            blocks = []
            for index in range(depth):
                blocks.append(
                    Bottleneck(
                        in_channels,
                        width,
                        stride=stride if index == 0 else 1,
                        dilation=first_dilation if index == 0 else dilation,
                        bn_momentum=bn_momentum,
                        bn_eps=bn_eps,
                        dtype=dtype,
                        rngs=rngs,
                    )
                )
                in_channels = width * EXPANSION
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.embed_dims = tuple(width * EXPANSION for width in base_widths)
        self.dtype = dtype

    def _stem(self, x: jax.Array, bn: dict) -> jax.Array:
        if self.stem == "deep":
            convs = (self.stem_conv1, self.stem_conv2, self.stem_conv3)
            for conv, batch_norm in zip(convs, (self.stem_bn1, self.stem_bn2, self.stem_bn3), strict=True):
                x = jax.nn.relu(batch_norm(conv(x), **bn))
        else:
            x = jax.nn.relu(self.bn1(self.conv1(x), **bn))
        return max_pool_3x3_s2(x)

    def __call__(
        self,
        images: jax.Array,
        *,
        use_batch_stats: bool,
        num_batch_groups: int = 1,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, ...]:
        """NHWC normalised images -> the stage outputs. BatchNorm running statistics update in
        place when `use_batch_stats`. `dropout_key` is accepted for the encoder interface and
        unused: ResNet has no stochastic depth or dropout."""
        del dropout_key
        bn = dict(use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups)
        x = self._stem(images.astype(self.dtype), bn)
        outputs = []
        for stage in self.stages:
            for block in stage:
                # A pure function of the block's state, so that jax.checkpoint can wrap it and
                # the running statistics it updates still come out.
                graphdef, state = nnx.split(block)
                apply = layers.checkpoint(functools.partial(_apply_block, graphdef, **bn), self.remat)
                x, statistics = apply(state, x)
                if use_batch_stats:  # eval mode leaves them (and a frozen model's variables) alone
                    nnx.update(block, statistics)
            outputs.append(x)
        return tuple(outputs)


def build_resnet(
    encoder_config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
) -> ResNet:
    """The ResNet `config.model.encoder` (type 'resnet') describes, with `config.model`'s BatchNorm,
    remat and dtype settings."""
    return ResNet(
        depths=tuple(encoder_config.depths),
        base_widths=tuple(encoder_config.base_widths),
        stem=encoder_config.stem,
        stem_channels=encoder_config.stem_channels,
        strides=tuple(encoder_config.strides),
        dilations=tuple(encoder_config.dilations),
        contract_dilation=encoder_config.contract_dilation,
        bn_momentum=model_config.bn_momentum,
        bn_eps=model_config.bn_eps,
        remat=model_config.remat,
        dtype=layers.compute_dtype(model_config.dtype),
        rngs=rngs,
    )
