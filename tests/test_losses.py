"""t2s_jax.losses against PyTorch (method.md 4.2 and 4.5–4.7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from t2s_jax import losses


def _torch_ce_mean_over_all(logits, labels, weights=None):
    torch_logits = torch.from_numpy(logits).permute(0, 3, 1, 2)
    per_pixel = F.cross_entropy(torch_logits, torch.from_numpy(labels).long(), reduction="none", ignore_index=255)
    if weights is not None:
        per_pixel = per_pixel * torch.from_numpy(weights)
    return float(per_pixel.sum() / per_pixel.numel())


def _random_batch(seed, num_classes=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(2, 6, 7, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(2, 6, 7)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.3] = 255
    return logits, labels, rng


def test_cross_entropy_matches_torch_mean_over_all_pixels():
    logits, labels, _ = _random_batch(1)
    ours = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(ours), _torch_ce_mean_over_all(logits, labels), rtol=1e-6)
    # Not torch's default mean over the valid pixels only.
    valid_mean = float(
        F.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels).long(), ignore_index=255)
    )
    assert abs(float(ours) - valid_mean) > 1e-3


def test_cross_entropy_with_pixel_weights_matches_torch():
    logits, labels, rng = _random_batch(2)
    weights = rng.random(labels.shape).astype(np.float32)
    ours = jax.jit(losses.cross_entropy)(jnp.asarray(logits), jnp.asarray(labels), weights=jnp.asarray(weights))
    np.testing.assert_allclose(float(ours), _torch_ce_mean_over_all(logits, labels, weights), rtol=1e-6)


def test_cross_entropy_bfloat16_logits_are_computed_in_float32():
    logits, labels, _ = _random_batch(3)
    rounded = np.array(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    ours = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(float(ours), _torch_ce_mean_over_all(rounded, labels), rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_zero_gradient():
    logits, labels, _ = _random_batch(4)
    labels[:] = 255
    value, grad = jax.value_and_grad(losses.cross_entropy)(jnp.asarray(logits), jnp.asarray(labels))
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_cross_entropy_bad_label_gives_nan_and_shape_mismatch_raises():
    logits, labels, _ = _random_batch(5)
    labels[0, 0, 0] = 7  # 5 classes: out of range and not ignore
    assert np.isnan(float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))))
    with pytest.raises(ValueError, match="do not match"):
        losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels[:, :5]))
