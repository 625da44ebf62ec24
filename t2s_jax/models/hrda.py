"""HRDA's multi-resolution pieces (lhoyer/HRDA), as pure functions on NHWC arrays, and its
scale-attention head.

A training crop is seen twice by the same segmentor: whole at `context_scale` (context, LR)
and as a full-resolution detail crop inside it (detail, HR). A learned scale attention `a`
on the context features fuses both on the HR logit grid:

    fused = up(a * m) * paste(detail) + up((1 - a * m) * context)

with `m` the detail box on the LR grid. The order is HRDA's: the attention is masked and
(1 - a) applied on the LR grid, before upsampling, so the bilinear kernel spreads the
masked attention by about one HR cell across the box border. The teacher and evaluation
cover the crop with an overlapping detail slide instead of one box and use no mask.

Geometry (MiT, output stride 4; crop 1024, detail 512, scale 0.5): context input 512²,
context logits 128², detail logits 128², fused 256²; one LR cell is os / scale = 8 pixels,
so box offsets are multiples of 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t2s_jax.models import heads, layers


def context_resize(images: jax.Array, scale: float) -> jax.Array:
    """(B, H, W, C) -> (B, floor(H*scale), floor(W*scale), C), bilinear without antialiasing.

    PyTorch's `interpolate(x, scale_factor=scale, mode='bilinear', align_corners=False)`:
    output pixel i samples input (i + 0.5) / scale - 0.5, also when H * scale is not an
    integer (a plain resize to the output size would sample at the size ratio instead).
    """
    batch, height, width, channels = images.shape
    out_hw = (math.floor(height * scale), math.floor(width * scale))
    if min(out_hw) < 1:
        raise ValueError(f"context_scale {scale} shrinks a {height}x{width} image to nothing")
    return jax.image.scale_and_translate(
        images,
        (batch, *out_hw, channels),
        (1, 2),
        jnp.asarray([scale, scale], jnp.float32),
        jnp.zeros((2,), jnp.float32),
        method="linear",
        antialias=False,
    )


def draw_detail_box(
    key: jax.Array, crop_hw: tuple[int, int], detail_hw: tuple[int, int], divisible: int
) -> jax.Array:
    """int32 (2,) = (y1, x1): the detail box's top-left corner in the crop, one for the batch.

    HRDA's `get_crop_bbox` with `crop_coord_divisible`: y1 = divisible * U{0 .. n - 1} with
    n = (crop_h - detail_h + 1) // divisible (0 .. 504 for 1024 / 512 / 8; 512 is never drawn).
    """
    margins = [crop - detail for crop, detail in zip(crop_hw, detail_hw, strict=True)]
    if min(margins) < 0:
        raise ValueError(f"model.hrda.detail_crop_hw {tuple(detail_hw)} exceeds the crop {tuple(crop_hw)}")
    if divisible < 1:
        raise ValueError(f"model.hrda.crop_divisible must be >= 1, got {divisible}")
    counts = jnp.asarray([max((margin + 1) // divisible, 1) for margin in margins], jnp.int32)
    return divisible * jax.random.randint(key, (2,), 0, counts, dtype=jnp.int32)


def crop_box(x: jax.Array, box: jax.Array, size_hw: tuple[int, int]) -> jax.Array:
    """(B, H, W, ...) -> (B, h, w, ...) starting at the traced `box` (y1, x1): images, labels, weights."""
    box = jnp.asarray(box, jnp.int32)
    starts = (jnp.int32(0), box[0], box[1]) + (jnp.int32(0),) * (x.ndim - 3)
    return jax.lax.dynamic_slice(x, starts, (x.shape[0], *size_hw, *x.shape[3:]))


def _upsampled_hw(lr_hw: Sequence[int], context_scale: float) -> tuple[int, int]:
    """The HR logit grid of an LR grid: lr / context_scale, which must be whole."""
    hr_hw = tuple(round(size / context_scale) for size in lr_hw)
    if any(abs(hr - size / context_scale) > 1e-6 for hr, size in zip(hr_hw, lr_hw)):
        raise ValueError(f"context logits {tuple(lr_hw)} / model.hrda.context_scale {context_scale} are not whole")
    return hr_hw


def _fuse(context_logits: jax.Array, attention: jax.Array, detail_canvas: jax.Array) -> jax.Array:
    """up(a) * detail_canvas + up((1 - a) * context_logits) on the canvas's grid."""
    hr_hw = detail_canvas.shape[1:3]
    weighted_context = (1.0 - attention) * context_logits
    return layers.resize_bilinear(attention, hr_hw) * detail_canvas + layers.resize_bilinear(weighted_context, hr_hw)


def fuse_in_box(
    context_logits: jax.Array,
    attention: jax.Array,
    detail_logits: jax.Array,
    box: jax.Array,
    *,
    output_stride: int,
    context_scale: float,
    with_weighted_context: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The training fusion: (B, h, w, K) context logits, (B, h, w, K or 1) attention and the
    detail logits of the crop at `box` -> (B, h / context_scale, w / context_scale, K).

    The attention is zeroed outside the box on the LR grid (cells of output_stride /
    context_scale pixels, rows floor(y1 / cell) .. floor(y2 / cell) as HRDA's `scale_box`),
    (1 - a) weights the context logits there, both are upsampled, and the detail logits are
    pasted at box / output_stride into zeros. with_weighted_context: also return the
    weighted context logits (1 - a * m) * context (B, h, w, K), what HRDA's LR loss reads.
    """
    lr_h, lr_w = context_logits.shape[1:3]
    hr_hw = _upsampled_hw((lr_h, lr_w), context_scale)
    box = jnp.asarray(box, jnp.int32)
    cell = output_stride / context_scale
    top_left = jnp.floor(box.astype(jnp.float32) / cell).astype(jnp.int32)
    detail_px = jnp.asarray([detail_logits.shape[1] * output_stride, detail_logits.shape[2] * output_stride])
    bottom_right = jnp.floor((box + detail_px).astype(jnp.float32) / cell).astype(jnp.int32)
    rows = jnp.arange(lr_h)[:, None]
    cols = jnp.arange(lr_w)[None, :]
    in_box = (rows >= top_left[0]) & (rows < bottom_right[0]) & (cols >= top_left[1]) & (cols < bottom_right[1])
    masked_attention = attention * in_box[None, :, :, None].astype(attention.dtype)
    canvas = jnp.zeros((context_logits.shape[0], *hr_hw, detail_logits.shape[-1]), jnp.float32)
    paste_at = box // output_stride
    canvas = jax.lax.dynamic_update_slice(
        canvas, detail_logits.astype(jnp.float32), (jnp.int32(0), paste_at[0], paste_at[1], jnp.int32(0))
    )
    fused = _fuse(context_logits, masked_attention, canvas)
    if with_weighted_context:
        return fused, (1.0 - masked_attention) * context_logits
    return fused


def fuse_full(
    context_logits: jax.Array, attention: jax.Array, detail_canvas: jax.Array, *, context_scale: float
) -> jax.Array:
    """The inference fusion: unmasked attention, `detail_canvas` (B, h / context_scale,
    w / context_scale, K) covering the whole crop on the HR logit grid (`detail_slide`)."""
    hr_hw = _upsampled_hw(context_logits.shape[1:3], context_scale)
    if tuple(detail_canvas.shape[1:3]) != hr_hw:
        raise ValueError(f"detail canvas {detail_canvas.shape[1:3]} is not the HR grid {hr_hw} of the context logits")
    return _fuse(context_logits, attention, detail_canvas.astype(jnp.float32))


def detail_slide(
    apply_detail: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    *,
    window_hw: tuple[int, int],
    stride_hw: tuple[int, int],
    output_stride: int,
) -> jax.Array:
    """(B, H, W, 3) full-resolution images -> (B, H/os, W/os, K): the detail logits of an
    overlapping slide (mmseg's window grid), averaged over the windows covering each cell.

    All windows go through `apply_detail` ((N, wh, ww, 3) -> (N, wh/os, ww/os, K)) as one
    batch, window-major (window k holds rows k*B .. k*B + B - 1), as HRDA stacks them: with
    batch statistics the BatchNorms normalise over all windows together.
    """
    from t2s_jax.evaluate import slide_windows  # here: evaluate imports this package

    batch, height, width = images.shape[:3]
    windows = slide_windows((height, width), window_hw, stride_hw)
    window_h, window_w = windows[0][1] - windows[0][0], windows[0][3] - windows[0][2]
    if any(size % output_stride for size in (height, width, window_h, window_w)):
        raise ValueError(
            f"image {height}x{width} and detail window {window_h}x{window_w} must be multiples of the output stride"
            f" {output_stride}"
        )
    crops = jnp.concatenate([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows], axis=0)
    logits = apply_detail(crops).astype(jnp.float32)
    cell_hw = (window_h // output_stride, window_w // output_stride)
    if tuple(logits.shape[1:3]) != cell_hw:
        raise ValueError(
            f"apply_detail gave {logits.shape[1:3]} logits for {window_h}x{window_w} windows, not {cell_hw}"
        )
    canvas_hw = (height // output_stride, width // output_stride)
    summed = jnp.zeros((batch, *canvas_hw, logits.shape[-1]), jnp.float32)
    coverage = np.zeros(canvas_hw, np.float32)
    for index, (y1, _, x1, _) in enumerate(windows):
        rows = slice(y1 // output_stride, y1 // output_stride + cell_hw[0])
        cols = slice(x1 // output_stride, x1 // output_stride + cell_hw[1])
        summed = summed.at[:, rows, cols].add(logits[index * batch : (index + 1) * batch])
        coverage[rows, cols] += 1
    return summed / coverage[None, :, :, None]


def inference_logits(
    apply_context: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    apply_detail: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    *,
    context_scale: float,
    window_hw: tuple[int, int],
    stride_hw: tuple[int, int],
    output_stride: int,
) -> jax.Array:
    """(B, H, W, 3) -> (B, H/os, W/os, K) fused logits of the teacher and of evaluation:
    the context pass (`apply_context` -> (logits, attention)) on the images at
    `context_scale`, the detail slide over the full-resolution images, unmasked fusion."""
    context_logits, attention = apply_context(context_resize(images, context_scale))
    detail_canvas = detail_slide(
        apply_detail, images, window_hw=window_hw, stride_hw=stride_hw, output_stride=output_stride
    )
    return fuse_full(context_logits, attention, detail_canvas, context_scale=context_scale)


class ScaleAttentionHead(nnx.Module):
    """HRDA's scale attention: a DAFormer-type head with a 1x1 fusion, sigmoid output.

    Per-stage Linear to `channels`, bilinear resize to stride 4, concat, one 1x1 conv
    (no bias) + BatchNorm + ReLU, channel dropout, 1x1 classifier to `num_outputs` (K for
    class-wise attention, else 1) initialised N(0, 0.01^2) with bias 0, so the attention
    starts near sigmoid(0) = 0.5.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        channels: int,
        num_outputs: int,
        dropout_rate: float,
        bn_momentum: float,
        bn_eps: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.List([nnx.Linear(c, channels, dtype=dtype, rngs=rngs) for c in in_channels])
        self.fuse = layers.ConvBNReLU(
            channels * len(in_channels), channels, 1, bn_momentum=bn_momentum, bn_eps=bn_eps, dtype=dtype, rngs=rngs
        )
        self.classifier = heads.build_classifier(channels, num_outputs, dtype, rngs)
        self.dropout_rate = dropout_rate

    def __call__(
        self,
        features: Sequence[jax.Array],
        *,
        use_batch_stats: bool,
        num_batch_groups: int = 1,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Attention (B, H/4, W/4, num_outputs) float32 in (0, 1) from the four encoder stages."""
        x = jnp.concatenate(heads.embed_and_resize(features, self.embed), axis=-1)
        fused = self.fuse(x, use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups)
        return jax.nn.sigmoid(heads.classify(self.classifier, fused, self.dropout_rate, dropout_key))


class DeepLabScaleAttention(nnx.Module):
    """HRDA's scale attention on DeepLab-V2 (HRDA builds it as a second DLV2Head): the sum of the
    dilated 3x3 convs on the last stage to `num_outputs` maps, sigmoid; at the head's stride."""

    def __init__(
        self, in_channels: Sequence[int], *, num_outputs: int, dilations: Sequence[int], dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        self.head = heads.DeepLabV2Head(in_channels, num_classes=num_outputs, dilations=dilations, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        features: Sequence[jax.Array],
        *,
        use_batch_stats: bool,
        num_batch_groups: int = 1,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        logits, _ = self.head(features, use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups)
        return jax.nn.sigmoid(logits)


def build_scale_attention(
    model_config: ml_collections.ConfigDict, in_channels: Sequence[int], *, dtype: jnp.dtype, rngs: nnx.Rngs
) -> ScaleAttentionHead | DeepLabScaleAttention:
    """HRDA's attention head for the decode head `config.model.head` (as HRDA builds it: a 1x1-fusion
    DAFormer head for the MiT heads, a second DLV2 head for DeepLab-V2)."""
    options = model_config.hrda
    num_outputs = int(model_config.num_classes) if options.attention_classwise else 1
    if model_config.head == "deeplabv2":
        return DeepLabScaleAttention(
            in_channels, num_outputs=num_outputs, dilations=tuple(model_config.aspp_dilations), dtype=dtype, rngs=rngs
        )
    return ScaleAttentionHead(
        in_channels,
        channels=int(options.attention_channels),
        num_outputs=num_outputs,
        dropout_rate=float(model_config.dropout_rate),
        bn_momentum=float(model_config.bn_momentum),
        bn_eps=float(model_config.bn_eps),
        dtype=dtype,
        rngs=rngs,
    )
