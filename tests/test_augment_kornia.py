"""Strong augmentation with DAFormer's semantics, against kornia 0.5.8 itself (method.md 4.6,
docs/method.md §6): each colour adjustment, the whole ColorJitter with fixed parameters, the factor
ranges kornia draws from, the blur, the draws shared per batch or per image, and the coins."""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from t2s_jax.config import default_config
from t2s_jax.uda import augment

with warnings.catch_warnings(record=True):  # kornia 0.5.8 turns on every DeprecationWarning of torch.jit
    kornia = pytest.importorskip("kornia")
if kornia.__version__ != "0.5.8":
    pytest.skip(f"the reference is kornia 0.5.8 (DAFormer's pin), found {kornia.__version__}", allow_module_level=True)
from kornia.augmentation import ColorJitter  # noqa: E402


def _images(seed, shape=(5, 6, 7, 3)):
    """U(0, 1) images with the corner cases of HSV: grey, black, white and tied channels."""
    x = np.random.default_rng(seed).random(shape).astype(np.float32)
    x[0, 0, :4] = [(0.4, 0.4, 0.4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1.0, 1.0, 0.0)]
    x[0, 1, :3] = [(0.3, 0.7, 0.7), (0.6, 0.2, 0.6), (0.9, 0.9, 0.9)]
    return x


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "ours,theirs,factors",
    [
        (augment.kornia_brightness, kornia.enhance.adjust_brightness, [-0.2, -0.05, 0.0, 0.1, 0.2]),
        (augment.kornia_contrast, kornia.enhance.adjust_contrast, [0.8, 0.95, 1.0, 1.1, 1.2]),
        (augment.kornia_saturation, kornia.enhance.adjust_saturation, [0.0, 0.8, 1.0, 1.2, 3.0]),
        # Hue in radians, both signs and past +-pi (fmod keeps negative sums negative).
        (augment.kornia_hue, kornia.enhance.adjust_hue, [-3.1, -1.2, 0.0, 0.9, 2.5 * math.pi]),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_adjustments_match_kornia(ours, theirs, factors):
    x = _images(0)
    expected = _nhwc(theirs(_nchw(x), torch.tensor(factors)))
    got = jax.jit(jax.vmap(ours))(jnp.asarray(x), jnp.asarray(factors, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6)


def test_color_jitter_matches_kornia_color_jitter_with_fixed_parameters():
    x = _images(1, (3, 5, 6, 3))
    factors = np.array([[1.15, 0.85, 1.2, 0.17], [0.82, 1.18, 0.8, -0.2], [1.0, 1.0, 1.0, 0.0]], np.float32)
    orders = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
    jitter = jax.jit(jax.vmap(lambda image, f, o: augment.color_jitter(image, *f, o, semantics="kornia")))
    outputs = []
    for order in orders:
        names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        params = {name: torch.from_numpy(factors[:, i]) for i, name in enumerate(names)}
        params["order"] = torch.from_numpy(order)
        expected = _nhwc(ColorJitter(0.2, 0.2, 0.2, 0.2).apply_transform(_nchw(x), params))
        got = np.asarray(jitter(jnp.asarray(x), jnp.asarray(factors), jnp.asarray(np.tile(order, (3, 1)))))
        np.testing.assert_allclose(got, expected, atol=2e-6)
        outputs.append(got)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2  # the order matters for these factors
    np.testing.assert_allclose(outputs[0][2], x[2], atol=1e-5)  # neutral factors


@pytest.mark.parametrize("strength,hue", [(0.2, 0.2), (1.5, 0.5)])
def test_factor_ranges_match_kornia_draws(strength, hue):
    torch.manual_seed(0)
    drawn = ColorJitter(strength, strength, strength, hue).generate_parameters(torch.Size((20000, 3, 1, 1)))
    names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    drawn = np.stack([drawn[name].numpy() for name in names], axis=1)
    ranges = augment.jitter_factor_ranges("kornia", strength, hue)
    np.testing.assert_allclose(drawn.min(0), ranges[:, 0], atol=2e-3 * max(strength, hue) * 2)
    np.testing.assert_allclose(drawn.max(0), ranges[:, 1], atol=2e-3 * max(strength, hue) * 2)
    if strength > 1:  # kornia bounds the brightness factor to [0, 2]; torchvision does not
        assert ranges[0, 1] == 2.0 and augment.jitter_factor_ranges("torchvision", strength, hue)[0, 1] == 2.5


def test_gaussian_blur_matches_kornia():
    x = _images(2, (1, 9, 12, 3))
    expected = _nhwc(kornia.filters.gaussian_blur2d(_nchw(x), (5, 7), (0.9, 0.9)))
    got = jax.jit(augment.gaussian_blur, static_argnums=2)(jnp.asarray(x[0]), jnp.float32(0.9), (5, 7))
    np.testing.assert_allclose(np.asarray(got), expected[0], atol=1e-6)


@jax.jit
def _draws(key):
    return {
        per: augment.draw_augment_params(
            key, 6, color_jitter_semantics="kornia", color_jitter_strength=0.2, color_jitter_hue=0.2,
            blur_sigma=(0.15, 1.15), coins_per=per, order_per=per, sigma_per=per,
        )
        for per in ("batch", "image")
    }


def test_draws_shared_per_batch_or_per_image():
    ranges = augment.jitter_factor_ranges("kornia", 0.2, 0.2)
    for per, draws in _draws(jax.random.key(3)).items():
        draws = {name: np.asarray(value) for name, value in draws.items()}
        shared = [np.all(draws[name] == draws[name][:1]) for name in ("coins", "orders", "sigmas")]
        assert shared == [per == "batch"] * 3, per
        assert len(np.unique(draws["factors"][:, 0])) == 6  # factors are always per image
        assert np.all((draws["factors"] >= ranges[:, 0]) & (draws["factors"] <= ranges[:, 1]))
        assert np.all(np.sort(draws["orders"], axis=1) == np.arange(4))
        assert np.all((draws["sigmas"] >= 0.15) & (draws["sigmas"] <= 1.15))
    with pytest.raises(ValueError, match="order_per must be one of"):
        augment.draw_augment_params(jax.random.key(0), 2, color_jitter_semantics="kornia", color_jitter_strength=0.2,
                                    color_jitter_hue=0.2, blur_sigma=(0.1, 1.0), coins_per="batch",
                                    order_per="step", sigma_per="image")


_STEPS = 400  # both tests below run this many steps of 4 images: one compilation


@functools.cache
def _augment_steps():
    """Jitted: (keys (S,), images (S, 4, 4, 4, 3) in 0..255, jitter p, blur p) -> S augmented batches,
    with the default config's strong augmentation (kornia, coins per batch) and a radius-1 blur."""
    options = augment.strong_augment_options(default_config().uda, (4, 4))
    options.update(blur_sigma=(0.7, 0.7), blur_kernel_size=3)

    def one_step(key, images, jitter_prob, blur_prob):
        return augment.strong_augment(key, images, **{**options, "color_jitter_prob": jitter_prob,
                                                      "blur_prob": blur_prob})

    return jax.jit(jax.vmap(one_step, in_axes=(0, 0, None, None)))


def test_jitter_and_blur_coins_are_one_per_batch():
    """Grey 4x4 images with one bright corner pixel: the far corner changes iff jittered
    (blur radius 1), its neighbour differs from the far corner iff blurred."""
    options = augment.strong_augment_options(default_config().uda, (4, 4))
    assert (options["color_jitter_semantics"], options["coins_per"], options["color_jitter_prob"],
            options["blur_prob"]) == ("kornia", "batch", 0.8, 0.5)
    images = np.full((_STEPS, 4, 4, 4, 3), 0.5, np.float32)
    images[..., 0, 0, :] = 0.9
    keys = jax.random.split(jax.random.key(4), _STEPS)
    out = np.asarray(_augment_steps()(keys, jnp.asarray(images) * 255, 0.8, 0.5)) / 255
    jittered = np.abs(out[:, :, 3, 3] - 0.5).max(-1) > 1e-4  # (steps, images)
    blurred = np.abs(out[:, :, 0, 1] - out[:, :, 3, 3]).max(-1) > 1e-4
    for coin, rate in ((jittered, 0.8), (blurred, 0.5)):
        assert np.all(coin == coin[:, :1])  # all images of a step, or none
        assert abs(coin.mean() - rate) < 0.07


def test_full_jitter_changes_pixels_as_kornia_does():
    """Mean |delta| of ColorJitter(0.2, 0.2, 0.2, 0.2) on U(0, 1) pixels, ours against kornia's
    own (DAFormer: ~0.167; torchvision's semantics give ~0.133)."""
    torch.manual_seed(5)
    jitter = ColorJitter(0.2, 0.2, 0.2, 0.2)
    x = torch.rand(40, 10, 3, 4, 4)
    theirs = np.mean([(jitter(batch) - batch).abs().mean().item() for batch in x])
    images = np.random.default_rng(5).random((_STEPS, 4, 4, 4, 3)).astype(np.float32) * 255
    out = _augment_steps()(jax.random.split(jax.random.key(6), _STEPS), jnp.asarray(images), 1.0, 0.0)
    ours = float(np.abs(np.asarray(out) - images).mean()) / 255
    assert abs(ours - theirs) < 0.01, (ours, theirs)
