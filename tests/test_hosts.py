"""The HRDA host on a real (tiny) segmentor: a pass's loss is HRDA's (fused + detail in its own
box), the teacher and evaluation are the context pass plus the overlapping detail slide, the
pseudo-label margins reach the loss, and the HRDA step compiles once and equals on 1 and 4 devices."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t2s_jax import hosts, methods
from t2s_jax.models import hrda, resize_bilinear
from t2s_jax.training import train_state
from t2s_jax.uda import normalize

sys.path.insert(0, os.path.dirname(__file__))
import test_steps  # noqa: E402

# 64^2 crops, 32^2 detail crops, context at 0.5: HRDA's 1024 / 512 geometry divided by 16.
HRDA_TINY = {
    "model.hrda.enabled": True, "model.hrda.detail_crop_hw": (32, 32), "model.hrda.detail_slide_stride_hw": (16, 16),
    "model.encoder.drop_path_rate": 0.0, "model.dropout_rate": 0.0,
}  # fmt: skip
K = 19


def _config(method="t2s_mic", **overrides):
    return test_steps._config(method, **{**HRDA_TINY, **overrides})


def _model(config):
    host = hosts.build_host(config)
    model = host.build_model(train_state.model_config_for_run(config), rngs=nnx.Rngs(0))
    return host, model


def _images(seed, batch=2, hw=(64, 64)):
    return jnp.asarray(np.random.default_rng(seed).uniform(0, 255, (batch, *hw, 3)), jnp.float32)


def _numpy_ce(logits, labels, weights):
    """Mean over all pixels of -w log softmax(logits)[label]; ignored labels (255) count 0."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    valid = labels != 255
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return float(np.mean(np.where(valid, -picked * weights, 0.0)))


@pytest.mark.parametrize("context_loss_weight", [0.0, 0.2])
def test_a_pass_loss_is_fused_plus_detail_in_its_own_box(context_loss_weight):
    config = _config(**{"model.hrda.context_loss_weight": context_loss_weight})
    host, model = _model(config)
    passes = {"first": _images(0), "second": _images(1)}
    outputs = host.student_forward(
        model, passes, dropout_key=jax.random.key(0), crop_key=jax.random.key(3), with_projection=True
    )
    boxes = [tuple(np.asarray(outputs[name].detail_box)) for name in passes]
    assert boxes[0] != boxes[1]  # a box per pass
    assert all(0 <= v <= 32 and v % 8 == 0 for box in boxes for v in box)
    output = outputs["first"]
    assert output.logits.shape == (2, 16, 16, K) and output.detail_logits.shape == (2, 8, 8, K)
    assert output.projection.shape[1:3] == (8, 8)  # the context pass's: T2S-DA on the LR branch

    rng = np.random.default_rng(5)
    labels = rng.integers(0, K, (2, 64, 64)).astype(np.int32)
    labels[:, :3] = 255
    weights = rng.uniform(0, 1, (2, 64, 64)).astype(np.float32)
    loss = host.segmentation_loss(output, jnp.asarray(labels), jnp.asarray(weights))
    (y, x) = boxes[0]
    in_box = np.s_[:, y : y + 32, x : x + 32]
    expected = (0.9 - context_loss_weight) * _numpy_ce(resize_bilinear(output.logits, (64, 64)), labels, weights)
    expected += 0.1 * _numpy_ce(resize_bilinear(output.detail_logits, (32, 32)), labels[in_box], weights[in_box])
    expected += context_loss_weight * _numpy_ce(resize_bilinear(output.context_logits, (64, 64)), labels, weights)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def test_teacher_and_evaluation_are_context_plus_detail_slide():
    config = _config()
    host, model = _model(config)
    images = _images(2)
    teacher = host.teacher_forward(model, {"target": images, "source": _images(3)}, with_projection=True)
    # One view alone gives the same: BatchNorm normalises each view with its own statistics.
    x = normalize.normalize(images)
    bn = dict(train=False, use_batch_stats=True)

    def apply_context(context):
        output = model.forward(context, with_attention=True, **bn)
        return output.logits, output.attention

    expected = hrda.inference_logits(
        apply_context, lambda windows: model.forward(windows, **bn).logits, x,
        context_scale=0.5, window_hw=(32, 32), stride_hw=(16, 16), output_stride=4,
    )  # fmt: skip
    np.testing.assert_allclose(teacher["target"].logits, expected, rtol=1e-4, atol=1e-5)
    context = model.forward(hrda.context_resize(x, 0.5), with_projection=True, **bn)
    np.testing.assert_allclose(teacher["target"].projection, context.projection, rtol=1e-4, atol=1e-5)

    def apply_context_eval(context):
        output = model.forward(context, with_attention=True, train=False)
        return output.logits, output.attention

    expected_eval = hrda.inference_logits(
        apply_context_eval, lambda windows: model(windows, train=False), x,
        context_scale=0.5, window_hw=(32, 32), stride_hw=(16, 16), output_stride=4,
    )  # fmt: skip
    np.testing.assert_allclose(host.eval_logits(model, x), expected_eval, rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected_eval, expected, atol=1e-3)  # running vs batch statistics


def test_the_hrda_options_are_checked_against_the_crop():
    with pytest.raises(ValueError, match=r"detail_crop_hw=\(96, 96\) must fit in data.crop_hw=\(64, 64\)"):
        hosts.build_host(_config(**{"model.hrda.detail_crop_hw": (96, 96)}))
    with pytest.raises(ValueError, match=r"config.model.hrda.detail_crop_hw=\(36, 36\): each side must be a multiple of 8"):
        hosts.build_host(_config(**{"model.hrda.detail_crop_hw": (36, 36)}))
    with pytest.raises(ValueError, match="detail_loss_weight \\+ context_loss_weight = 1.1"):
        hosts.build_host(_config(**{"model.hrda.context_loss_weight": 1.0}))


def test_pseudo_label_margins_reach_the_loss():
    """`target_valid` zeros the pseudo-label weight where it is 0 (HRDA's margins)."""
    config = methods.with_method(test_steps._config("daformer"), "daformer")
    config.uda.pseudo_ignore_top = config.uda.pseudo_ignore_bottom = 0
    batch = test_steps._batch(0)
    valid = np.ones((2, 64, 64), np.uint8)
    losses = []
    for margins in (None, (4, 12, 4, 4)):
        if margins is not None:
            top, bottom, left, right = margins
            valid[:, :top], valid[:, -bottom:], valid[:, :, :left], valid[:, :, -right:] = 0, 0, 0, 0
        history, _, _ = test_steps._run(config, [{**batch, "target_valid": valid.copy()}])
        losses.append(history[0]["loss_mixed"])
    assert losses[1] < losses[0]  # fewer weighted pixels, the same mean over all pixels


def test_the_hrda_step_compiles_once_and_4_devices_equal_1():
    """T2S-DA w/ MIC on HRDA (every term: source, FD, ClassMix, pulling, MIC; every HRDA path)."""
    # Threshold 0: every pseudo-label counts (q = 1; the random teacher is barely confident).
    config = _config("t2s_mic", **{"data.batch_size": 4, "pull.num_groups": 4, "uda.pseudo_threshold": 0.0})
    batches = [test_steps._batch(0, batch_size=4), test_steps._batch(1, batch_size=4)]
    # The feature distance's one stride-64 cell of a 64^2 crop (the LR stage 4): a car in image 0.
    batches[0]["source_label"][0] = 13
    history, _, cache_size = test_steps._run(config, batches)
    assert cache_size == 1
    assert history[0]["loss_mic"] > 0 and history[0]["loss_pull"] > 0 and history[0]["loss_fd"] > 0
    on_4, _, _ = test_steps._run(config, batches[:1], num_devices=4)
    for name, value in history[0].items():
        rtol = 1e-3 if name == "grad_norm" else 2e-4
        np.testing.assert_allclose(on_4[0][name], value, rtol=rtol, atol=1e-5, err_msg=name)
