"""Decode heads on the encoder stage outputs: DAFormer (separable-ASPP fusion), SegFormer
(all-MLP), DeepLab-V2 (summed dilated convs on the last stage) and VFM-UDA's light upscaling
head on a ViT's patch tokens.

Each returns `(logits, feature)`: float32 logits and the feature the classifier reads (the
T2S-DA projector's default input): the fused stride-4 feature before dropout for DAFormer
and SegFormer, the last stage output for DeepLab-V2, the last upscaled map for VFM-UDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t2s_jax.models import layers

# mmseg's decode heads initialise the 1x1 classifier with normal(0, 0.01).
_classifier_init = jax.nn.initializers.normal(stddev=0.01)


def build_classifier(in_channels: int, num_classes: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """A 1x1 classifier conv with bias, initialised as mmseg's decode heads."""
    return nnx.Conv(in_channels, num_classes, (1, 1), kernel_init=_classifier_init, dtype=dtype, rngs=rngs)


def embed_and_resize(
    features: Sequence[jax.Array], embeds: Sequence[nnx.Linear]
) -> list[jax.Array]:
    """Per-stage Linear to a common width, then bilinear resize to the stride-4 grid."""
    size_hw = features[0].shape[1:3]
    return [layers.resize_bilinear(embed(f), size_hw) for f, embed in zip(features, embeds, strict=True)]


class DAFormerHead(nnx.Module):
    """DAFormer: per-stage Linear (no norm/act), resize to stride 4, concat, separable ASPP, 3x3 fuse.

    Follows lhoyer/DAFormer `DAFormerHead` with `fusion_cfg=dict(type='aspp', sep=True,
    dilations=(1, *aspp_dilations), pool=False)`: convs followed by BatchNorm have no bias
    (mmcv `ConvModule(bias='auto')`), the embedding Linears and the classifier have one.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        channels: int,
        num_classes: int,
        aspp_dilations: Sequence[int],
        dropout_rate: float,
        bn_momentum: float,
        bn_eps: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        bn = dict(bn_momentum=bn_momentum, bn_eps=bn_eps, dtype=dtype, rngs=rngs)
        concat = channels * len(in_channels)
        self.embed = nnx.List([nnx.Linear(c, channels, dtype=dtype, rngs=rngs) for c in in_channels])
        self.aspp_1x1 = layers.ConvBNReLU(concat, channels, 1, **bn)
        self.aspp_depthwise = nnx.List(
            [layers.ConvBNReLU(concat, concat, 3, dilation=d, groups=concat, **bn) for d in aspp_dilations]
        )
        self.aspp_pointwise = nnx.List([layers.ConvBNReLU(concat, channels, 1, **bn) for _ in aspp_dilations])
        self.bottleneck = layers.ConvBNReLU(channels * (1 + len(aspp_dilations)), channels, 3, **bn)
        self.classifier = build_classifier(channels, num_classes, dtype, rngs)
        self.dropout_rate = dropout_rate
        self.feature_channels = channels  # of `fused`, the projector's 'decoder' input

    def __call__(
        self,
        features: Sequence[jax.Array],
        *,
        use_batch_stats: bool,
        num_batch_groups: int = 1,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        bn = dict(use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups)
        x = jnp.concatenate(embed_and_resize(features, self.embed), axis=-1)
        branches = [self.aspp_1x1(x, **bn)]
        for depthwise, pointwise in zip(self.aspp_depthwise, self.aspp_pointwise, strict=True):
            branches.append(pointwise(depthwise(x, **bn), **bn))
        fused = self.bottleneck(jnp.concatenate(branches, axis=-1), **bn)
        return classify(self.classifier, fused, self.dropout_rate, dropout_key), fused


class SegFormerHead(nnx.Module):
    """SegFormer all-MLP head, as Hugging Face `SegformerDecodeHead`.

    Per-stage Linear (`linear_c`), resize to stride 4, concat in reversed stage order (4, 3, 2,
    1, as the reference does), 1x1 conv without bias + BatchNorm + ReLU (`linear_fuse`),
    dropout, 1x1 classifier. Dropout drops whole channels (mmseg's `Dropout2d`).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        channels: int,
        num_classes: int,
        dropout_rate: float,
        bn_momentum: float,
        bn_eps: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.linear_c = nnx.List([nnx.Linear(c, channels, dtype=dtype, rngs=rngs) for c in in_channels])
        self.linear_fuse = layers.ConvBNReLU(
            channels * len(in_channels), channels, 1, bn_momentum=bn_momentum, bn_eps=bn_eps, dtype=dtype, rngs=rngs
        )
        self.classifier = build_classifier(channels, num_classes, dtype, rngs)
        self.dropout_rate = dropout_rate
        self.feature_channels = channels

    def __call__(
        self,
        features: Sequence[jax.Array],
        *,
        use_batch_stats: bool,
        num_batch_groups: int = 1,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        embedded = embed_and_resize(features, self.linear_c)
        fused = self.linear_fuse(
            jnp.concatenate(embedded[::-1], axis=-1), use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups
        )
        return classify(self.classifier, fused, self.dropout_rate, dropout_key), fused


def classify(classifier: nnx.Conv, fused: jax.Array, dropout_rate: float, dropout_key: jax.Array | None) -> jax.Array:
    """Channel dropout (when a key is given), 1x1 classifier, float32 logits."""
    if dropout_key is not None:
        fused = layers.channel_dropout(fused, dropout_rate, dropout_key)
    return classifier(fused).astype(jnp.float32)


class DeepLabV2Head(nnx.Module):
    """DeepLab-V2 (mmseg `DLV2Head`): the sum over `dilations` of a 3x3 conv with bias and
    padding = dilation on the last stage, straight to the classes.

    DAFormer's `dlv2red` uses dilations (6, 12), `dlv2` (6, 12, 18, 24). Logits are at the last
    stage's stride. No BatchNorm and no dropout: the BatchNorm and dropout arguments are
    accepted for the head interface and unused.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        num_classes: int,
        dilations: Sequence[int] = (6, 12),
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.aspp_convs = nnx.List(
            [
                nnx.Conv(
                    in_channels[-1],
                    num_classes,
                    (3, 3),
                    padding=((d, d), (d, d)),
                    kernel_dilation=d,
                    kernel_init=_classifier_init,
                    dtype=dtype,
                    rngs=rngs,
                )
                for d in dilations
            ]
        )
        self.feature_channels = in_channels[-1]  # the classifier reads the last stage itself

    def __call__(
        self,
        features: Sequence[jax.Array],
        *,
        use_batch_stats: bool,
        num_batch_groups: int = 1,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        del use_batch_stats, num_batch_groups, dropout_key
        feature = features[-1]
        logits = sum(conv(feature).astype(jnp.float32) for conv in self.aspp_convs)
        return logits, feature


class TransposedConv2x2(nnx.Module):
    """PyTorch `ConvTranspose2d(k=2, s=2, bias=False)` as an einsum: each input pixel writes its
    own 2x2 output block, y[2i+a, 2j+c, o] = sum_k x[i, j, k] W[a, c, k, o]."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        # PyTorch reads the fan-in of a transposed conv weight [in, out, 2, 2] from `out`.
        init, _ = layers.torch_conv_init(out_channels * 4)
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, in_channels, out_channels)))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("bhwk,acko->bhawco", x.astype(self.dtype), self.kernel.value.astype(self.dtype))
        b, h, _, w, _, o = y.shape
        return y.reshape(b, 2 * h, 2 * w, o)


class VFMHead(nnx.Module):
    """VFM-UDA's light head (tue-mps/vfm-uda `VITLightweightHead`) on the last ViT layer's patch
    tokens (B, h, w, D): 2x transposed conv to D/2, LayerNorm, GELU, 2x transposed conv to D/4,
    LayerNorm, 3x3 conv, LayerNorm, then a 1x1 classifier without bias, N(0, 0.1^2): logits at
    4x the token grid (the loss and evaluation upsample them to the crop). The LayerNorms are
    timm's LayerNorm2d (eps 1e-6 over channels); the convs have PyTorch's default init and no
    bias. No BatchNorm and no dropout: those arguments are the head interface's."""

    def __init__(self, in_channels: Sequence[int], *, num_classes: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        dim = in_channels[-1]
        half, quarter = dim // 2, dim // 4
        norm = dict(epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.upscale_1 = TransposedConv2x2(dim, half, dtype=dtype, rngs=rngs)
        self.norm_1 = nnx.LayerNorm(half, **norm)
        self.upscale_2 = TransposedConv2x2(half, quarter, dtype=dtype, rngs=rngs)
        self.norm_2 = nnx.LayerNorm(quarter, **norm)
        self.conv = nnx.Conv(
            quarter, quarter, (3, 3), padding=1, use_bias=False,
            kernel_init=layers.torch_conv_init(quarter * 9)[0], dtype=dtype, rngs=rngs,
        )  # fmt: skip
        self.norm_3 = nnx.LayerNorm(quarter, **norm)
        self.classifier = nnx.Conv(
            quarter, num_classes, (1, 1), use_bias=False,
            kernel_init=jax.nn.initializers.normal(stddev=0.1), dtype=dtype, rngs=rngs,
        )  # fmt: skip
        self.feature_channels = quarter

    def __call__(
        self,
        features: Sequence[jax.Array],
        *,
        use_batch_stats: bool,
        num_batch_groups: int = 1,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        del use_batch_stats, num_batch_groups, dropout_key
        x = jax.nn.gelu(self.norm_1(self.upscale_1(features[-1])), approximate=False)
        x = self.norm_2(self.upscale_2(x))
        feature = self.norm_3(self.conv(x))
        return self.classifier(feature).astype(jnp.float32), feature


def build_head(
    model_config: ml_collections.ConfigDict, in_channels: Sequence[int], *, dtype: jnp.dtype, rngs: nnx.Rngs
) -> DAFormerHead | SegFormerHead | DeepLabV2Head | VFMHead:
    """The decode head `config.model.head` names, on encoder stages of `in_channels`."""
    num_classes = int(model_config.num_classes)
    if model_config.head == "vfm":
        return VFMHead(in_channels, num_classes=num_classes, dtype=dtype, rngs=rngs)
    if model_config.head == "deeplabv2":
        return DeepLabV2Head(in_channels, num_classes=num_classes, dilations=tuple(model_config.aspp_dilations), dtype=dtype, rngs=rngs)
    common = dict(
        channels=int(model_config.head_channels),
        num_classes=num_classes,
        dropout_rate=float(model_config.dropout_rate),
        bn_momentum=float(model_config.bn_momentum),
        bn_eps=float(model_config.bn_eps),
        dtype=dtype,
        rngs=rngs,
    )
    if model_config.head == "daformer":
        return DAFormerHead(in_channels, aspp_dilations=tuple(model_config.aspp_dilations), **common)
    if model_config.head == "segformer":
        return SegFormerHead(in_channels, **common)
    raise ValueError(f"unknown head {model_config.head!r}; expected 'daformer', 'segformer', 'deeplabv2' or 'vfm'")
