"""The pure pieces of the DAFormer (DACS) step against plain NumPy (method.md section 4)."""

import colorsys
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2s_jax.uda import augment, classmix, ema, feature_distance, normalize, pseudo_labels

NUM_CLASSES = 5


# ---------------------------------------------------------------- normalisation (method.md 2)


def test_normalize_and_denormalize_match_numpy():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 4, 5, 3)).astype(np.uint8)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    normalized = normalize.normalize(jnp.asarray(images))
    assert normalized.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(normalized), (images - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(normalize.denormalize(normalized)), images, atol=1e-4)


# ---------------------------------------------------------------- EMA teacher (method.md 4.1)


def test_ema_alpha_schedule():
    for step in (0, 1, 2, 9, 998, 999, 1000, 40_000):
        expected = min(1 - 1 / (step + 1), 0.999)
        np.testing.assert_allclose(float(ema.ema_alpha(step)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(ema.ema_alpha(jnp.int32(3), max_alpha=0.5)), 0.5)


def test_update_teacher_matches_numpy_and_copies_at_step_zero():
    rng = np.random.default_rng(1)

    def tree():
        dense = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)}
        return jax.tree.map(lambda x: np.asarray(x, np.float32), {"dense": dense, "scale": rng.normal(size=())})

    teacher, student = tree(), tree()
    update = jax.jit(ema.update_teacher, static_argnames="max_alpha")

    copied = update(teacher, student, jnp.int32(0), max_alpha=0.999)
    jax.tree.map(lambda c, s: np.testing.assert_array_equal(np.asarray(c), s), copied, student)

    for step in (1, 7, 5000):
        alpha = min(1 - 1 / (step + 1), 0.999)
        updated = update(teacher, student, jnp.int32(step), max_alpha=0.999)
        jax.tree.map(
            lambda u, t, s: np.testing.assert_allclose(u, alpha * t + (1 - alpha) * s, rtol=1e-6, atol=1e-7),
            updated, teacher, student,
        )
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updated))


# ---------------------------------------------------------------- pseudo-labels (method.md 4.4)


def test_pseudo_labels_match_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=4.0, size=(2, 16, 16, NUM_CLASSES)).astype(np.float32)
    threshold, top, bottom = 0.9, 3, 5
    labels, weight, confidence, quality = jax.jit(
        pseudo_labels.pseudo_labels, static_argnames=("threshold", "ignore_top", "ignore_bottom")
    )(jnp.asarray(logits), threshold=threshold, ignore_top=top, ignore_bottom=bottom)

    exp = np.exp(logits - logits.max(-1, keepdims=True))
    probs = exp / exp.sum(-1, keepdims=True)
    expected_q = np.sum(probs.max(-1) >= threshold) / probs[..., 0].size  # one scalar over the batch
    expected_weight = np.full((2, 16, 16), expected_q, np.float32)
    expected_weight[:, :top] = 0
    expected_weight[:, 16 - bottom:] = 0

    assert 0.1 < expected_q < 0.9  # the threshold splits the pixels: the test can see a wrong q
    np.testing.assert_array_equal(np.asarray(labels), probs.argmax(-1))
    assert labels.dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(confidence), probs.max(-1), rtol=1e-5)
    np.testing.assert_allclose(float(quality), expected_q, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(weight), expected_weight, rtol=1e-6)


def test_pseudo_labels_no_ignored_rows_and_bad_rows():
    logits = jnp.zeros((1, 6, 4, 2), jnp.bfloat16)  # confidence exactly 0.5: p >= threshold counts
    _, weight, _, quality = pseudo_labels.pseudo_labels(logits, threshold=0.5, ignore_top=0, ignore_bottom=0)
    assert float(quality) == 1.0 and np.all(np.asarray(weight) == 1.0)
    with pytest.raises(ValueError, match="height 6"):
        pseudo_labels.pseudo_labels(logits, threshold=0.5, ignore_top=4, ignore_bottom=3)


# ---------------------------------------------------------------- ClassMix (method.md 4.5)


def _source_labels(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 2, 3, 255], size=(2, 16, 16)).astype(np.int32)
    labels[1, :4, :4] = 4  # a class only example 1 holds: the candidate set is the batch's
    return labels


def test_classmix_masks_choose_half_of_the_batch_classes_and_mask_their_pixels():
    labels = _source_labels(4)
    present = np.unique(labels)  # DAFormer: torch.unique over the batch, 255 included
    num_chosen = math.ceil(len(present) / 2)
    masks_fn = jax.jit(classmix.classmix_masks, static_argnums=2)
    draws = []
    for seed in range(5):
        key = jax.random.key(seed)
        masks = np.asarray(masks_fn(key, jnp.asarray(labels), NUM_CLASSES))
        chosen = np.asarray(classmix.chosen_classes(key, jnp.asarray(labels), NUM_CLASSES))
        assert masks.shape == labels.shape and masks.dtype == np.float32
        for example in range(2):
            values = [255 if slot == NUM_CLASSES else slot for slot in np.flatnonzero(chosen[example])]
            assert len(values) == num_chosen and set(values) <= set(present)
            np.testing.assert_array_equal(masks[example], np.isin(labels[example], values).astype(np.float32))
            draws.append(tuple(values))
    assert len(set(draws)) > 1  # examples and keys draw independently


def test_classmix_draws_are_uniform_subsets():
    labels = jnp.asarray(_source_labels(5))  # 5 candidates (0, 2, 3, 4, 255): choose 3 of 5
    keys = jax.random.split(jax.random.key(0), 2000)
    chosen = np.asarray(jax.jit(jax.vmap(lambda k: classmix.chosen_classes(k, labels, NUM_CLASSES)))(keys))
    subsets = [tuple(np.flatnonzero(row)) for row in chosen.reshape(-1, NUM_CLASSES + 1)]
    combinations = list(itertools.combinations([0, 2, 3, 4, NUM_CLASSES], 3))
    assert set(subsets) == set(combinations)
    frequencies = np.array([subsets.count(c) for c in combinations]) / len(subsets)
    np.testing.assert_allclose(frequencies, 1 / len(combinations), atol=0.025)  # ~5 standard errors


def test_mix_selects_per_pixel_and_keeps_label_dtype():
    rng = np.random.default_rng(6)
    mask = (rng.random((2, 4, 5)) < 0.5).astype(np.float32)
    a, b = rng.random((2, 4, 5, 3)).astype(np.float32), rng.random((2, 4, 5, 3)).astype(np.float32)
    expected = mask[..., None] * a + (1 - mask[..., None]) * b
    np.testing.assert_allclose(np.asarray(classmix.mix(jnp.asarray(mask), a, b)), expected)
    la, lb = rng.integers(0, 5, (2, 4, 5)).astype(np.int32), rng.integers(0, 5, (2, 4, 5)).astype(np.int32)
    mixed = classmix.mix(jnp.asarray(mask), jnp.asarray(la), jnp.asarray(lb))
    assert mixed.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(mixed), np.where(mask > 0, la, lb))
    with pytest.raises(ValueError, match="does not fit"):
        classmix.mix(jnp.asarray(mask), a[:, :3], b[:, :3])


# ---------------------------------------------------------------- strong augmentation (method.md 4.6)
# NumPy versions of torchvision's functional tensor ops (torchvision is not installed here);
# the hue reference goes through the standard library's colorsys instead of torchvision's formulas.


def _np_gray(x):
    return 0.2989 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3]


def _np_blend(x, other, factor):
    return np.clip(factor * x + (1 - factor) * other, 0, 1)


def _np_hue(x, shift):
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:-1]):
        h, s, v = colorsys.rgb_to_hsv(*x[index])
        out[index] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out


def _np_blur(x, sigma, kernel_size):
    radius = kernel_size // 2
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps /= taps.sum()
    padded = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    out = np.zeros_like(x)
    for i, j in np.ndindex(x.shape[:2]):
        window = padded[i : i + kernel_size, j : j + kernel_size]
        out[i, j] = np.einsum("ijc,i,j->c", window, taps, taps)
    return out


def _image(seed, shape=(6, 7, 3)):
    image = np.random.default_rng(seed).random(shape).astype(np.float32)
    image[0, 0] = image[0, 0, 0]  # a grey pixel: hue and saturation are undefined there
    image[0, 1] = (1.0, 1.0, 0.0)  # ties between channels
    return image


@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_brightness_contrast_saturation_match_torchvision_formulas(factor):
    x = _image(7)
    gray = _np_gray(x)
    np.testing.assert_allclose(augment.torchvision_brightness(x, factor), _np_blend(x, 0.0, factor), atol=1e-6)
    np.testing.assert_allclose(augment.torchvision_contrast(x, factor), _np_blend(x, gray.mean(), factor), atol=1e-6)
    np.testing.assert_allclose(augment.torchvision_saturation(x, factor), _np_blend(x, gray, factor), atol=1e-6)


@pytest.mark.parametrize("shift", [-0.2, 0.07, 0.5])
def test_hue_matches_hsv_rotation(shift):
    x = _image(8)
    np.testing.assert_allclose(augment.torchvision_hue(x, shift), _np_hue(x.astype(np.float64), shift), atol=1e-5)


@pytest.mark.parametrize("shape,sigma,kernel_size", [((9, 8, 3), 0.8, 5), ((6, 7, 3), 1.1, 13)])
def test_gaussian_blur_matches_numpy_reflect_convolution(shape, sigma, kernel_size):
    x = _image(9, shape)  # the second case pads beyond the image: reflections repeat
    ours = augment.gaussian_blur(jnp.asarray(x), jnp.float32(sigma), (kernel_size, kernel_size))
    np.testing.assert_allclose(np.asarray(ours), _np_blur(x, sigma, kernel_size), atol=1e-5)


def test_blur_kernel_size_matches_daformer_formula():
    for side in (16, 17, 100, 255, 256, 360, 512, 513, 640, 1024):
        daformer = int(np.floor(np.ceil(0.1 * side) - 0.5 + np.ceil(0.1 * side) % 2))
        assert augment.blur_kernel_size_for(side, 0.1) == daformer
    assert augment.blur_kernel_size_for(512, 0.1) == 51


def test_color_jitter_applies_the_adjustments_in_the_given_order():
    x = _image(16)
    factors = dict(brightness=1.3, contrast=0.7, saturation=1.25, hue=0.15)
    steps = {
        0: lambda y: _np_blend(y, 0.0, factors["brightness"]),
        1: lambda y: _np_blend(y, _np_gray(y).mean(), factors["contrast"]),
        2: lambda y: _np_blend(y, _np_gray(y), factors["saturation"]),
        3: lambda y: _np_hue(y, factors["hue"]),
    }
    orders = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]], np.int32)
    # Batched over orders, as inside `strong_augment`'s vmap.
    jitter = jax.vmap(lambda o: augment.color_jitter(jnp.asarray(x), order=o, semantics="torchvision", **factors))
    ours = jitter(jnp.asarray(orders))
    results = []
    for order, out in zip(orders, np.asarray(ours)):
        expected = x.astype(np.float64)
        for op in order:
            expected = steps[op](expected)
        np.testing.assert_allclose(out, expected, atol=1e-5)
        results.append(out)
    assert np.abs(results[0] - results[1]).max() > 1e-2  # the order matters for these factors


# torchvision semantics with per-image coins here; tests/test_augment_kornia.py covers DAFormer's.
AUGMENT = dict(color_jitter_semantics="torchvision", color_jitter_prob=1.0, color_jitter_strength=0.0,
               color_jitter_hue=0.0, blur_prob=0.0, blur_sigma=(0.15, 1.15), blur_kernel_size=3,
               coins_per="image", order_per="image", sigma_per="image")


def _augment(images, seed=0, **overrides):
    fn = jax.jit(lambda k, x: augment.strong_augment(k, x, **{**AUGMENT, **overrides}))
    return np.asarray(fn(jax.random.key(seed), jnp.asarray(images)))


def test_strong_augment_identity_settings():
    images = np.random.default_rng(10).uniform(0, 255, size=(3, 6, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(_augment(images), images, atol=1e-3)  # jitter with neutral factors
    np.testing.assert_allclose(_augment(images, color_jitter_prob=0.0, color_jitter_strength=0.5), images, atol=1e-3)


def test_strong_augment_brightness_on_grey_images_and_jitter_probability():
    # On a uniform grey image contrast and saturation are no-ops and hue is 0: only brightness acts.
    images = np.full((400, 2, 2, 3), 100.0, np.float32)
    out = _augment(images, color_jitter_prob=0.8, color_jitter_strength=0.3)
    ratio = out[:, 0, 0, 0] / 100.0
    np.testing.assert_allclose(out, ratio[:, None, None, None] * images, rtol=1e-5)
    changed = np.abs(ratio - 1) > 1e-6
    assert np.all((ratio[changed] >= 0.7 - 1e-6) & (ratio[changed] <= 1.3 + 1e-6))
    assert 0.72 < changed.mean() < 0.88  # applied with p = 0.8, per example
    assert ratio[changed].std() > 0.1  # per-example factors


def test_strong_augment_hue_shift_is_per_example_and_bounded():
    images = _image(11, (4, 3, 3, 3)) * 0.8 + 0.1
    out = _augment(images * 255, color_jitter_hue=0.2) / 255
    shifts = []
    for before, after in zip(images, out):
        hue = lambda x: np.array([colorsys.rgb_to_hsv(*p)[0] for p in x.reshape(-1, 3)])
        delta = (hue(after) - hue(before) + 0.5) % 1.0 - 0.5
        np.testing.assert_allclose(delta[1:], delta[1], atol=1e-4)  # pixel 0 is grey
        shifts.append(delta[1])
    assert np.all(np.abs(shifts) <= 0.2 + 1e-4) and np.ptp(shifts) > 1e-3


def test_strong_augment_blur_probability_and_values():
    images = np.random.default_rng(12).uniform(0, 255, size=(200, 5, 6, 3)).astype(np.float32)
    out = _augment(images, color_jitter_prob=0.0, blur_prob=0.5, blur_sigma=(0.7, 0.7), blur_kernel_size=3)
    blurred = np.array([not np.allclose(o, x, atol=1e-3) for o, x in zip(out, images)])
    assert 0.4 < blurred.mean() < 0.6
    for o, x in zip(out[blurred][:5], images[blurred][:5]):
        np.testing.assert_allclose(o, _np_blur(x, 0.7, 3), rtol=1e-5, atol=1e-3)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255


def test_strong_augment_rejects_bad_settings():
    images = np.zeros((1, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="odd"):
        _augment(images, blur_kernel_size=4)
    with pytest.raises(ValueError, match="hue"):
        _augment(images, color_jitter_hue=0.6)


# ---------------------------------------------------------------- ImageNet feature distance (method.md 4.3)

THINGS = (3, 4)  # of the 5 test classes


def _np_feature_distance(student, imagenet, labels, min_ratio):
    batch, grid_h, grid_w, _ = student.shape
    scale = labels.shape[1] // grid_h
    distances = []
    for b, i, j in np.ndindex(batch, grid_h, grid_w):
        cell = labels[b, i * scale : (i + 1) * scale, j * scale : (j + 1) * scale].ravel()
        cell = np.where(cell == 255, NUM_CLASSES, cell)
        counts = np.bincount(cell, minlength=NUM_CLASSES + 1) / cell.size
        majority = int(np.argmax(counts))
        if majority in THINGS and counts[majority] >= min_ratio:
            distances.append(np.linalg.norm(student[b, i, j] - imagenet[b, i, j]))
    return (np.mean(distances) if distances else 0.0), len(distances)


def _fd_labels():
    rng = np.random.default_rng(13)
    labels = rng.integers(0, NUM_CLASSES, size=(2, 16, 16)).astype(np.int32)
    cells = labels.reshape(2, 4, 4, 4, 4).transpose(0, 1, 3, 2, 4)  # view: (b, i, j, 4, 4)
    cells[0, 0, 0] = 3  # pure thing
    cells[0, 0, 1] = 4
    cells[0, 0, 1, 0] = 255  # 12/16 = 0.75 thing, ignore counts in the histogram: in
    cells[0, 0, 2] = 3
    cells[0, 0, 2, 0, :1] = 0  # 11/16 < 0.75: out
    cells[0, 0, 2, 1] = 0
    cells[0, 1, 0] = 255  # pure ignore: out
    cells[1, 2, 3] = 1  # pure stuff: out
    cells[1, 0, 0] = 255
    cells[1, 0, 0, 0] = 3  # 4/16 thing, the rest ignore: ignore is the majority, out
    cells[1, 3, 3] = 4  # pure thing
    return labels


def test_thing_feature_distance_matches_numpy_loop():
    rng = np.random.default_rng(14)
    student, imagenet = rng.normal(size=(2, 2, 4, 4, 8)).astype(np.float32)
    labels = _fd_labels()
    fn = jax.jit(lambda s, i, l: feature_distance.thing_feature_distance(
        s, i, l, thing_classes=THINGS, min_ratio=0.75, num_classes=NUM_CLASSES))
    expected, count = _np_feature_distance(student, imagenet, labels, 0.75)
    assert count == 3
    np.testing.assert_allclose(float(fn(student, imagenet, labels)), expected, rtol=1e-6)

    # Gradient: (f_S - f_I) / ||f_S - f_I|| / count on masked cells, nothing through the ImageNet side.
    grad_s, grad_i = jax.grad(fn, argnums=(0, 1))(student, imagenet, labels)
    cell_labels = feature_distance.downscale_label_ratio(labels, (4, 4), min_ratio=0.75, num_classes=NUM_CLASSES)
    mask = np.isin(np.asarray(cell_labels), THINGS)[..., None]
    diff = student - imagenet
    expected_grad = mask * diff / np.linalg.norm(diff, axis=-1, keepdims=True) / count
    np.testing.assert_allclose(np.asarray(grad_s), expected_grad, atol=1e-6)
    assert np.all(np.asarray(grad_i) == 0)


def test_thing_feature_distance_empty_mask_and_equal_features_have_finite_gradients():
    features = jnp.asarray(np.random.default_rng(15).normal(size=(2, 4, 4, 8)), jnp.float32)
    loss = lambda s, i, l: feature_distance.thing_feature_distance(
        s, i, l, thing_classes=THINGS, min_ratio=0.75, num_classes=NUM_CLASSES)
    stuff_only = np.zeros((2, 16, 16), np.int32)
    value, grad = jax.value_and_grad(loss)(features + 1.0, features, stuff_only)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)
    one_thing_cell = stuff_only.copy()
    one_thing_cell[1, 4:8, 8:12] = 3
    value = loss(features + 1.0, features, one_thing_cell)
    np.testing.assert_allclose(float(value), np.sqrt(8.0), rtol=1e-6)  # a mean over 1 cell
    # Student == ImageNet encoder (the first step): norm 0 on masked cells, gradient 0 not NaN.
    value, grad = jax.value_and_grad(loss)(features, features, _fd_labels())
    assert float(value) == 0.0 and np.all(np.isfinite(np.asarray(grad)))


def test_thing_feature_distance_requires_a_whole_stride():
    features = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match="multiple of the feature grid"):
        feature_distance.thing_feature_distance(
            features, features, jnp.zeros((1, 18, 16), jnp.int32), thing_classes=THINGS, min_ratio=0.75)
