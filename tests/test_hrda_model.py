"""HRDA's network pieces (t2s_jax.models.hrda) against a PyTorch re-expression of HRDA's forward
(docs of lhoyer/HRDA's `HRDAHead` / `HRDAEncoderDecoder`, NCHW, written here): the context
resize, detail boxes and crops, the training fusion, the detail slide, the inference fusion,
the slide-averaged evaluation logits; the scale-attention head and the segmentor's attention.

Stand-in networks (average pooling to the output stride and fixed random 1x1 maps) compute
the same in both frameworks, so every difference is one of the HRDA geometry.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from t2s_jax.evaluate import predict_logits
from t2s_jax.models import build_segmentor, hrda, is_head_param
from t2s_jax.optim import parameter_groups, path_names, weight_decay_mask

sys.path.insert(0, os.path.dirname(__file__))
from test_models import TINY_DIMS, forward, images, numpy_filled, tiny_config  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def to_torch(x) -> torch.Tensor:
    """NHWC array -> NCHW tensor."""
    return torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def torch_resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------- PyTorch re-expression


def torch_fuse_in_box(s_c, att, s_d, box, os_, scale):
    """§9.5 steps 7-11: mask the attention to the box on the LR grid, (1 - a) s_c, upsample
    both, paste s_d at box / os into zeros, fuse. Returns (fused, weighted s_c)."""
    y1, x1 = (int(v) for v in box)
    y2, x2 = y1 + s_d.shape[2] * os_, x1 + s_d.shape[3] * os_
    cell = os_ / scale
    mask = torch.zeros(s_c.shape[0], 1, *s_c.shape[2:])
    mask[:, :, int(y1 / cell) : int(y2 / cell), int(x1 / cell) : int(x2 / cell)] = 1
    att = att * mask
    s_c = (1 - att) * s_c
    up_s_c, up_att = torch_resize(s_c, 1 / scale), torch_resize(att, 1 / scale)
    inserted = torch.zeros_like(up_s_c)
    inserted[:, :, int(y1 / os_) : int(y2 / os_), int(x1 / os_) : int(x2 / os_)] = s_d
    return up_att * inserted + up_s_c, s_c


def torch_slide_windows(h_img, w_img, crop, stride):
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * h_stride + h_crop, h_img), min(w_idx * w_stride + w_crop, w_img)
            boxes.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return boxes


def torch_detail_slide(apply_detail, img, window, stride, os_):
    """§9.8 steps 2-3: windows cat window-major, one head call, pad-and-sum, / count."""
    bs, _, h_img, w_img = img.shape
    boxes = torch_slide_windows(h_img, w_img, window, stride)
    logits = apply_detail(torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes], dim=0))
    preds = torch.zeros(bs, logits.shape[1], h_img // os_, w_img // os_)
    count = torch.zeros(bs, 1, h_img // os_, w_img // os_)
    for i, box in enumerate(boxes):
        y1, y2, x1, x2 = (int(v / os_) for v in box)
        preds += F.pad(logits[i * bs : (i + 1) * bs], (x1, preds.shape[3] - x2, y1, preds.shape[2] - y2))
        count[:, :, y1:y2, x1:x2] += 1
    assert (count == 0).sum() == 0
    return preds / count


def torch_inference(apply_context, apply_detail, img, scale, window, stride, os_):
    """§9.8 steps 1-4: context pass at `scale`, detail slide, up(a) H + up((1 - a) s_c)."""
    s_c, att = apply_context(torch_resize(img, scale))
    hr = torch_detail_slide(apply_detail, img, window, stride, os_)
    return torch_resize(att, 1 / scale) * hr + torch_resize((1 - att) * s_c, 1 / scale)


def torch_slide_eval(encode_decode, img, crop, stride):
    """§9.9: mmseg's batched slide_inference of `encode_decode` (logits at the window size)."""
    bs, _, h_img, w_img = img.shape
    boxes = torch_slide_windows(h_img, w_img, crop, stride)
    logits = encode_decode(torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes], dim=0))
    preds = torch.zeros(bs, logits.shape[1], h_img, w_img)
    count = torch.zeros(bs, 1, h_img, w_img)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        preds += F.pad(logits[i * bs : (i + 1) * bs], (x1, w_img - x2, y1, h_img - y2))
        count[:, :, y1:y2, x1:x2] += 1
    return preds / count


# ------------------------------------------------------------------- stand-in networks


class StandIn:
    """Average pooling to the output stride, then fixed random 1x1 maps: logits (K) and a
    sigmoid attention (A channels); `by_row` adds 0.1 * batch row so the batch layout shows."""

    def __init__(self, os_, num_classes, attention_channels, seed=0, by_row=False):
        rng = np.random.RandomState(seed)
        self.os, self.by_row = os_, by_row
        widths = (num_classes, num_classes, attention_channels)
        self.w_ctx, self.w_det, self.w_att = (rng.randn(3, n).astype(np.float32) for n in widths)
        self.b_ctx, self.b_det = rng.randn(num_classes).astype(np.float32), rng.randn(num_classes).astype(np.float32)

    def _pool_jax(self, x):
        n, h, w, c = x.shape
        return x.reshape(n, h // self.os, self.os, w // self.os, self.os, c).mean((2, 4))

    def _row_jax(self, x):
        return 0.1 * jnp.arange(x.shape[0], dtype=jnp.float32)[:, None, None, None] if self.by_row else 0.0

    def context_jax(self, x):
        pooled = self._pool_jax(x)
        return pooled @ self.w_ctx + self.b_ctx, jax.nn.sigmoid(pooled @ self.w_att)

    def detail_jax(self, x):
        return self._pool_jax(x) @ self.w_det + self.b_det + self._row_jax(x)

    def _map_torch(self, pooled, w, b=None):
        y = torch.einsum("nchw,ck->nkhw", pooled, torch.from_numpy(w))
        return y if b is None else y + torch.from_numpy(b)[None, :, None, None]

    def context_torch(self, x):
        pooled = F.avg_pool2d(x, self.os)
        return self._map_torch(pooled, self.w_ctx, self.b_ctx), torch.sigmoid(self._map_torch(pooled, self.w_att))

    def detail_torch(self, x):
        y = self._map_torch(F.avg_pool2d(x, self.os), self.w_det, self.b_det)
        return y + 0.1 * torch.arange(x.shape[0], dtype=torch.float32)[:, None, None, None] if self.by_row else y


def random_nhwc(shape, seed):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


# ------------------------------------------------------------------- resize, boxes, crops


@pytest.mark.parametrize(
    "shape, scale", [((2, 16, 24, 3), 0.5), ((2, 17, 23, 3), 0.5), ((1, 21, 12, 2), 0.25), ((1, 20, 13, 2), 0.75)]
)
def test_context_resize_is_torch_interpolate_by_scale_factor(shape, scale):
    x = random_nhwc(shape, 0)
    expected = to_nhwc(torch_resize(to_torch(x), scale))
    got = hrda.context_resize(jnp.asarray(x), scale)
    assert got.shape == expected.shape == (shape[0], int(shape[1] * scale), int(shape[2] * scale), shape[3])
    np.testing.assert_allclose(got, expected, **TOL)
    if shape[1] % 2 == 0 and shape[2] % 2 == 0 and scale == 0.5:  # an exact factor 2: 2x2 average pooling
        pooled = x.reshape(shape[0], shape[1] // 2, 2, shape[2] // 2, 2, shape[3]).mean((2, 4))
        np.testing.assert_allclose(got, pooled, **TOL)


def test_detail_boxes_are_divisible_offsets_up_to_504_never_512():
    draw = jax.jit(jax.vmap(lambda k: hrda.draw_detail_box(k, (1024, 1024), (512, 512), 8)))
    boxes = np.asarray(draw(jax.random.split(jax.random.key(0), 4096)))
    assert boxes.shape == (4096, 2) and boxes.dtype == np.int32
    assert (boxes % 8 == 0).all() and boxes.min() == 0 and boxes.max() == 504
    for axis in range(2):  # every one of the 64 offsets is reached, 512 never
        assert set(boxes[:, axis].tolist()) == set(range(0, 505, 8))
    assert (boxes[:, 0] != boxes[:, 1]).any()  # y and x are drawn independently
    draw_small = jax.vmap(lambda k: hrda.draw_detail_box(k, (64, 96), (32, 32), 8))
    small = np.asarray(draw_small(jax.random.split(jax.random.key(1), 512)))
    assert set(small[:, 0].tolist()) == {0, 8, 16, 24} and set(small[:, 1].tolist()) == set(range(0, 57, 8))
    assert (np.asarray(hrda.draw_detail_box(jax.random.key(2), (64, 64), (64, 64), 8)) == 0).all()
    with pytest.raises(ValueError, match="detail_crop_hw"):
        hrda.draw_detail_box(jax.random.key(0), (64, 64), (96, 32), 8)


def test_crop_box_crops_images_labels_and_weights_at_a_traced_box():
    rng = np.random.RandomState(0)
    image = rng.randn(2, 1024, 1024, 3).astype(np.float32)
    label = rng.randint(0, 256, (2, 1024, 1024)).astype(np.uint8)
    weight = rng.rand(2, 1024, 1024).astype(np.float32)
    crop = jax.jit(hrda.crop_box, static_argnums=2)
    for box in [(0, 0), (504, 504), (8, 256), (496, 0)]:
        y1, x1 = box
        for x in (image, label, weight):
            got = np.asarray(crop(jnp.asarray(x), jnp.asarray(box, jnp.int32), (512, 512)))
            expected = torch.from_numpy(x)[:, y1 : y1 + 512, x1 : x1 + 512].numpy()  # HRDA's `crop`
            assert got.dtype == x.dtype
            np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------- training fusion


FUSION_CASES = [
    # (crop, output stride, context scale, classes, attention channels, boxes)
    (64, 4, 0.5, 5, 5, [(0, 0), (24, 24), (8, 16), (16, 0)]),
    (64, 4, 0.5, 5, 1, [(0, 0), (24, 8)]),
    (64, 8, 0.5, 3, 3, [(8, 24), (16, 8)]),  # DeepLab-V2: 16 px cells, offsets truncated as HRDA does
    (1024, 4, 0.5, 19, 19, [(0, 0), (504, 504), (8, 256), (256, 496)]),  # the real geometry
]


@pytest.mark.parametrize("crop, os_, scale, num_classes, att_channels, boxes", FUSION_CASES)
def test_training_fusion_equals_hrda(crop, os_, scale, num_classes, att_channels, boxes):
    lr, hr = int(crop * scale) // os_, crop // 2 // os_  # detail crop: half the crop
    s_c = random_nhwc((2, lr, lr, num_classes), 0)
    att = jax.nn.sigmoid(random_nhwc((2, lr, lr, att_channels), 1))
    s_d = random_nhwc((2, hr, hr, num_classes), 2)
    traces = []

    def fuse_both(*args):
        traces.append(1)
        return hrda.fuse_in_box(*args, output_stride=os_, context_scale=scale, with_weighted_context=True)

    fuse = jax.jit(fuse_both)
    for box in boxes:
        fused, weighted = fuse(s_c, att, s_d, jnp.asarray(box, jnp.int32))
        expected, expected_weighted = torch_fuse_in_box(to_torch(s_c), to_torch(att), to_torch(s_d), box, os_, scale)
        assert fused.shape == (2, int(lr / scale), int(lr / scale), num_classes) and fused.dtype == jnp.float32
        np.testing.assert_allclose(fused, to_nhwc(expected), **TOL)
        np.testing.assert_allclose(weighted, to_nhwc(expected_weighted), **TOL)
    assert len(traces) == 1  # the box is traced: one program for every box
    alone = hrda.fuse_in_box(s_c, att, s_d, jnp.asarray(boxes[-1]), output_stride=os_, context_scale=scale)
    np.testing.assert_allclose(alone, fused, **TOL)


def test_fusion_masks_the_attention_before_upsampling():
    """The order matters at the box border: masking after upsampling is another result."""
    s_c, s_d = random_nhwc((1, 8, 8, 3), 0), random_nhwc((1, 8, 8, 3), 1)
    att = jax.nn.sigmoid(random_nhwc((1, 8, 8, 3), 2))
    box = (8, 16)
    fused = np.asarray(hrda.fuse_in_box(s_c, att, s_d, jnp.asarray(box), output_stride=4, context_scale=0.5))
    up = functools.partial(torch_resize, factor=2.0)
    mask_hr = torch.zeros(1, 1, 16, 16)
    mask_hr[:, :, 2:10, 4:12] = 1
    inserted = torch.zeros(1, 3, 16, 16)
    inserted[:, :, 2:10, 4:12] = to_torch(s_d)
    a_hr = up(to_torch(att)) * mask_hr
    late = to_nhwc(a_hr * inserted + (1 - a_hr) * up(to_torch(s_c)))
    assert np.abs(fused - late).max() > 1e-2
    # Rows 11+ sample only LR rows outside the box: the pure context prediction there.
    np.testing.assert_allclose(fused[:, 11:], to_nhwc(up(to_torch(s_c)))[:, 11:], **TOL)
    assert np.abs(fused[:, 10] - to_nhwc(up(to_torch(s_c)))[:, 10]).max() > 1e-3  # row 10 reads the box


# ------------------------------------------------------------------- slide and inference


@pytest.mark.parametrize(
    "image_hw, window, stride",
    [((64, 64), (32, 32), (16, 16)), ((48, 80), (32, 32), (16, 16)), ((64, 64), (32, 32), (32, 32))],
)
def test_detail_slide_is_one_window_major_batch_averaged_per_cell(image_hw, window, stride):
    net = StandIn(4, 5, 5, by_row=True)
    x = random_nhwc((2, *image_hw, 3), 3)
    calls = []

    def apply_detail(crops):
        calls.append(crops.shape)
        return net.detail_jax(crops)

    got = hrda.detail_slide(apply_detail, jnp.asarray(x), window_hw=window, stride_hw=stride, output_stride=4)
    num_windows = len(torch_slide_windows(*image_hw, window, stride))
    assert calls == [(2 * num_windows, *window, 3)]
    expected = torch_detail_slide(net.detail_torch, to_torch(x), window, stride, 4)
    assert got.shape == (2, image_hw[0] // 4, image_hw[1] // 4, 5)
    np.testing.assert_allclose(got, to_nhwc(expected), **TOL)


@pytest.mark.parametrize("att_channels", [5, 1])
def test_inference_logits_equal_hrda(att_channels):
    net = StandIn(4, 5, att_channels, seed=1, by_row=True)
    x = random_nhwc((2, 64, 64, 3), 4)
    run = jax.jit(
        lambda images: hrda.inference_logits(
            net.context_jax, net.detail_jax, images, context_scale=0.5, window_hw=(32, 32), stride_hw=(16, 16),
            output_stride=4,
        )
    )
    got = run(jnp.asarray(x))
    expected = torch_inference(net.context_torch, net.detail_torch, to_torch(x), 0.5, (32, 32), (16, 16), 4)
    assert got.shape == (2, 16, 16, 5)
    np.testing.assert_allclose(got, to_nhwc(expected), **TOL)


@pytest.mark.parametrize(
    "image_hw, crop, stride, window, window_stride, num_classes",
    [
        ((64, 128), (64, 64), (32, 32), (32, 32), (16, 16), 5),  # 1024x2048 / 16
        ((1024, 2048), (1024, 1024), (512, 512), (512, 512), (256, 256), 2),  # the real geometry
    ],
)
def test_slide_averaged_eval_logits_equal_hrda(image_hw, crop, stride, window, window_stride, num_classes):
    """evaluate.predict_logits(mode='slide') of the HRDA inference = mmseg's batched slide of HRDA."""
    net = StandIn(4, num_classes, num_classes, seed=2)
    x = random_nhwc((1, *image_hw, 3), 5)
    inference = functools.partial(
        hrda.inference_logits, net.context_jax, net.detail_jax, context_scale=0.5, window_hw=window,
        stride_hw=window_stride, output_stride=4,
    )  # fmt: skip
    run = jax.jit(lambda images: predict_logits(inference, images, mode="slide", crop_hw=crop, stride_hw=stride))
    got = run(jnp.asarray(x))

    def encode_decode(crops):
        fused = torch_inference(net.context_torch, net.detail_torch, crops, 0.5, window, window_stride, 4)
        return F.interpolate(fused, size=crops.shape[2:], mode="bilinear", align_corners=False)

    expected = torch_slide_eval(encode_decode, to_torch(x), crop, stride)
    assert got.shape == (1, *image_hw, num_classes)
    np.testing.assert_allclose(got, to_nhwc(expected), **TOL)


# ------------------------------------------------------------------- attention head, segmentor


def test_scale_attention_head_starts_near_one_half_and_follows_its_outputs():
    features = [jnp.asarray(random_nhwc((2, 16 // 2**i, 16 // 2**i, c), i)) for i, c in enumerate(TINY_DIMS)]
    common = dict(channels=16, dropout_rate=0.1, bn_momentum=0.9, bn_eps=1e-5, dtype=jnp.float32)
    head = hrda.ScaleAttentionHead(TINY_DIMS, num_outputs=5, rngs=nnx.Rngs(0), **common)
    kernel = np.asarray(head.classifier.kernel[...])
    assert abs(kernel.std() - 0.01) < 0.003 and (np.asarray(head.classifier.bias[...]) == 0).all()
    attention = np.asarray(head(features, use_batch_stats=True))
    assert attention.shape == (2, 16, 16, 5) and attention.dtype == np.float32
    assert ((attention > 0) & (attention < 1)).all() and np.abs(attention - 0.5).max() < 0.05
    dropped = [np.asarray(head(features, use_batch_stats=True, dropout_key=jax.random.key(k))) for k in (0, 1)]
    assert np.abs(dropped[0] - dropped[1]).max() > 1e-4  # channel dropout with a key, none without
    np.testing.assert_array_equal(np.asarray(head(features, use_batch_stats=True)), attention)
    single = hrda.ScaleAttentionHead(TINY_DIMS, num_outputs=1, rngs=nnx.Rngs(0), **common)
    assert single(features, use_batch_stats=True).shape == (2, 16, 16, 1)


def hrda_tiny_config(classwise: bool = True):
    config = tiny_config()
    config.hrda.enabled = True
    config.hrda.attention_classwise = classwise
    config.hrda.attention_channels = 8
    return config


def abstract_segmentor(model_config):
    """The segmentor's structure with shapes only (no init compile)."""
    return nnx.eval_shape(lambda: build_segmentor(model_config, rngs=nnx.Rngs(0)))


def test_segmentor_with_hrda_returns_the_attention_of_its_context_pass():
    model = numpy_filled(hrda_tiny_config())
    x = images()
    with_att, _ = forward(model, x, jax.random.key(0), train=True, with_attention=True)
    without, _ = forward(model, x, jax.random.key(0), train=True)
    assert with_att.attention.shape == (2, 12, 16, 5) and with_att.attention.dtype == jnp.float32
    assert without.attention is None
    # The attention's dropout key is its own: the encoder's and the head's randomness are unchanged.
    np.testing.assert_allclose(with_att.logits, without.logits, rtol=1e-4, atol=1e-5)  # two programs
    graphdef, state = nnx.split(abstract_segmentor(hrda_tiny_config(classwise=False)))
    single = jax.eval_shape(lambda s, y: nnx.merge(graphdef, s).forward(y, with_attention=True).attention, state, x)
    assert single.shape == (2, 12, 16, 1)
    plain = numpy_filled(tiny_config())
    assert plain.attention_head is None
    with pytest.raises(ValueError, match="hrda.enabled"):
        plain.forward(x, with_attention=True)


def test_attention_head_trains_at_the_head_rate_with_weight_decay():
    params = nnx.state(abstract_segmentor(hrda_tiny_config()), nnx.Param)
    groups = {path_names(p): g for p, g in jax.tree_util.tree_leaves_with_path(parameter_groups(params))}
    decayed = {path_names(p): d for p, d in jax.tree_util.tree_leaves_with_path(weight_decay_mask(params))}
    attention_paths = [p for p in groups if p[0] == "attention_head"]
    assert attention_paths and all(groups[p] == "head" for p in attention_paths)
    assert decayed[("attention_head", "fuse", "bn", "scale")] and decayed[("attention_head", "classifier", "kernel")]
    assert is_head_param(("attention_head", "embed", "0", "kernel"))
