"""MIC's block masks and MaskTwins' complementary views (docs/method.md §6, §7), and their losses
against plain NumPy."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2s_jax.hosts import SingleScaleHost
from t2s_jax.models import SegmentorOutput
from t2s_jax.uda import masking, masktwins, mic, normalize
from t2s_jax.uda.term import PseudoLabels, StepContext

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402


@pytest.mark.parametrize("ratio, block, hw", [(0.7, 32, (512, 512)), (0.5, 16, (64, 96)), (0.3, 24, (100, 70))])
def test_block_masks_keep_one_minus_ratio_and_are_constant_on_blocks(ratio, block, hw):
    keep = np.asarray(masking.block_masks(jax.random.key(0), 512, hw, block, ratio))
    assert keep.shape == (512, *hw) and keep.dtype == bool
    assert abs(keep.mean() - (1 - ratio)) < 0.01
    grid = masking.mask_grid_hw(hw, block)
    assert grid == (round(hw[0] / block), round(hw[1] / block))
    # Each output pixel reads cell floor(i * g / H): constant on the pre-images of the cells.
    rows = np.arange(hw[0]) * grid[0] // hw[0]
    cols = np.arange(hw[1]) * grid[1] // hw[1]
    for r in range(grid[0]):
        for c in range(grid[1]):
            cell = keep[:, rows == r][:, :, cols == c]
            assert (cell == cell[:, :1, :1]).all()
    if hw[0] % block == 0 and hw[1] % block == 0:  # exact b x b blocks
        assert (keep.reshape(512, grid[0], block, grid[1], block) == keep[:, ::block, ::block][:, :, None, :, None]).all()


def test_complementary_views_partition_the_pixels():
    two = np.asarray(masking.view_masks(jax.random.key(1), 4, (64, 64), 16, 0.5, num_views=2, complementary=True))
    assert (two[0] ^ two[1]).all()  # D + (1 - D) = 1 everywhere, no overlap
    three = np.asarray(masking.view_masks(jax.random.key(2), 4, (64, 64), 16, 0.5, num_views=3, complementary=True))
    assert (three.sum(0) == 1).all()
    independent = np.asarray(
        masking.view_masks(jax.random.key(3), 256, (64, 64), 16, 0.5, num_views=2, complementary=False)
    )
    assert (independent[0] & independent[1]).any() and (~independent[0] & ~independent[1]).any()


def test_masked_pixels_are_exactly_zero_after_normalisation():
    images = jax.random.uniform(jax.random.key(4), (2, 32, 32, 3), maxval=255.0)
    keep = masking.block_masks(jax.random.key(5), 2, (32, 32), 8, 0.5)
    normalised = np.asarray(normalize.normalize(masking.apply_mask(images, keep)))
    assert (normalised[~np.asarray(keep)] == 0.0).all()
    np.testing.assert_array_equal(
        normalised[np.asarray(keep)], np.asarray(normalize.normalize(images))[np.asarray(keep)]
    )


# ------------------------------------------------------------------ the terms' images and losses


def _context(config, batch=2, hw=(32, 32), num_classes=19, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, (batch, *hw))
    weight = np.full((batch, *hw), 0.4, np.float32)
    weight[:, :2] = 0.0
    pseudo = PseudoLabels(
        jnp.asarray(label, jnp.int32), jnp.asarray(weight), jnp.full((batch, *hw), 0.9), jnp.asarray(0.4)
    )
    images = lambda: jnp.asarray(rng.uniform(0, 255, (batch, *hw, 3)), jnp.float32)  # noqa: E731
    keys = {name: jax.random.key(i) for i, name in enumerate(("mask", "augment"))}
    return StepContext(
        config=config, mesh=None, host=SingleScaleHost(), keys=keys, step=jnp.zeros((), jnp.int32),
        source_image=images(), source_label=jnp.asarray(rng.integers(0, num_classes, (batch, *hw)), jnp.int32),
        target_image=images(), target_valid=None, teacher={}, pseudo=pseudo, imagenet_features=None, teacher_forward=None,
    )  # fmt: skip


def _numpy_weighted_ce(logits, labels, weights):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )
    picked = np.take_along_axis(log_probs, np.asarray(labels)[..., None], -1)[..., 0]
    return float(np.mean(-picked * np.asarray(weights)))


def _output(logits):
    return SegmentorOutput(logits=logits, encoder_features=(), decoder_features=None)


def test_mic_term_masks_the_augmented_target_and_uses_the_host_pseudo_labels():
    config = tiny.tiny_config("unused", "mic")
    config.mic.block_size = 8
    context = _context(config)
    term = mic.MicTerm(config)
    passes, targets = term.prepare(context)
    masked = np.asarray(passes[mic.MASKED_PASS])
    augmented = np.asarray(mic.mic_augment(context.keys["augment"], context.target_image, config.uda))
    masked_out = np.all(np.asarray(normalize.normalize(masked)) == 0.0, axis=-1)
    assert 0.5 < masked_out.mean() < 0.9  # ratio 0.7 of 16 cells per image
    np.testing.assert_allclose(masked[~masked_out], augmented[~masked_out], rtol=1e-6)
    logits = jax.random.normal(jax.random.key(7), (2, 32, 32, 19))
    term_losses, _ = term.losses(context, {mic.MASKED_PASS: _output(logits)}, targets)
    expected = _numpy_weighted_ce(logits, context.pseudo.label, context.pseudo.weight)
    np.testing.assert_allclose(float(term_losses["loss_mic"]), config.mic.weight * expected, rtol=1e-5)


def test_mic_threshold_none_keeps_only_the_row_mask():
    config = tiny.tiny_config("unused", "mic")
    config.mic.pseudo_weighting = "none"
    config.uda.pseudo_ignore_top, config.uda.pseudo_ignore_bottom = 2, 3
    context = _context(config)
    _, targets = mic.MicTerm(config).prepare(context)
    weight = np.asarray(targets.weight)
    assert (weight[:, :2] == 0).all() and (weight[:, -3:] == 0).all() and (weight[:, 2:-3] == 1).all()


def test_masktwins_views_share_one_augmentation_and_the_loss_is_half_ce_each_plus_consistency():
    config = tiny.tiny_config("unused", "masktwins")
    config.masktwins.block_size = 8
    context = _context(config)
    term = masktwins.MaskTwinsTerm(config)
    passes, prepared = term.prepare(context)
    views = [np.asarray(passes[masktwins.view_pass(v)]) for v in range(2)]
    kept = [~np.all(np.asarray(normalize.normalize(v)) == 0.0, axis=-1) for v in views]
    assert (kept[0] ^ kept[1]).all()
    augmented = np.asarray(mic.mic_augment(context.keys["augment"], context.target_image, config.uda))
    recombined = np.where(kept[0][..., None], views[0], views[1])
    np.testing.assert_allclose(recombined, augmented, rtol=1e-6)

    logits = [jax.random.normal(jax.random.key(10 + v), (2, 32, 32, 19)) for v in range(2)]

    def total(first, second):
        out, _ = term.losses(context, {"twin_0": _output(first), "twin_1": _output(second)}, prepared)
        return out["loss_twins"] + out["loss_twins_consistency"], out

    (value, out), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(*logits)
    ce = [_numpy_weighted_ce(x, context.pseudo.label, context.pseudo.weight) for x in logits]
    mse = float(np.mean((np.asarray(logits[0], np.float64) - np.asarray(logits[1], np.float64)) ** 2))
    np.testing.assert_allclose(float(out["loss_twins"]), 0.5 * ce[0] + 0.5 * ce[1], rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_twins_consistency"]), 0.01 * mse, rtol=1e-5)
    np.testing.assert_allclose(float(value), 0.5 * ce[0] + 0.5 * ce[1] + 0.01 * mse, rtol=1e-5)
    # The consistency's gradient reaches both views (no stop-gradient), with opposite signs.
    consistency_grad = jax.grad(lambda a, b: masktwins.consistency([a, b]), argnums=(0, 1))(*logits)
    assert float(jnp.abs(consistency_grad[0]).sum()) > 0 and float(jnp.abs(consistency_grad[1]).sum()) > 0
    np.testing.assert_allclose(np.asarray(consistency_grad[0]), -np.asarray(consistency_grad[1]), rtol=1e-6)
    assert all(float(jnp.abs(g).sum()) > 0 for g in grads)
