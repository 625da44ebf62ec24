"""FDA against the Fourier-domain definition and a float64 NumPy reference; the pseudo-target engines."""
import functools

import jax
import numpy as np
import pytest

from t2s_jax.uda import fda, translation


def _images(seed, shape):
    return np.random.default_rng(seed).uniform(0.0, 255.0, size=shape).astype(np.float32)


def _numpy_fda(source, target, beta):
    """float64 FDA written after the original code: per image and channel, four corner slices."""
    out = np.empty(source.shape, np.float64)
    batch, height, width, channels = source.shape
    b = int(np.floor(min(height, width) * beta))
    for i in range(batch):
        for ch in range(channels):
            spec_s = np.fft.fft2(source[i, :, :, ch].astype(np.float64))
            spec_t = np.fft.fft2(target[i, :, :, ch].astype(np.float64))
            amp_s, phase_s, amp_t = np.abs(spec_s), np.angle(spec_s), np.abs(spec_t)
            amp = amp_s.copy()
            amp[0:b, 0:b] = amp_t[0:b, 0:b]
            amp[0:b, width - b : width] = amp_t[0:b, width - b : width]
            amp[height - b : height, 0:b] = amp_t[height - b : height, 0:b]
            amp[height - b : height, width - b : width] = amp_t[height - b : height, width - b : width]
            out[i, :, :, ch] = np.real(np.fft.ifft2(amp * np.exp(1j * phase_s)))
    return np.clip(out, 0.0, 255.0)


def test_beta_zero_is_identity():
    source, target = _images(0, (2, 12, 10, 3)), _images(1, (2, 12, 10, 3))
    out = np.asarray(fda.fda_source_to_target(source, target, 0.0))
    np.testing.assert_allclose(out, source, atol=1e-3)


@pytest.mark.parametrize("shape,beta", [((2, 16, 16, 3), 0.2), ((1, 15, 20, 3), 0.25)])
def test_low_frequencies_take_target_amplitude_and_keep_source_phase(shape, beta):
    source, target = _images(2, shape), _images(3, shape)
    out = np.asarray(fda.fda_source_to_target_unclipped(source, target, beta)).astype(np.float64)
    _, height, width, _ = shape
    b = int(np.floor(min(height, width) * beta))
    assert b >= 3
    spec_out = np.fft.fft2(out, axes=(1, 2))
    spec_s = np.fft.fft2(source.astype(np.float64), axes=(1, 2))
    spec_t = np.fft.fft2(target.astype(np.float64), axes=(1, 2))
    # Frequencies -(b-1)..(b-1) on both axes: inside the window together with their mirror.
    freq_h = np.minimum(np.arange(height), height - np.arange(height))
    freq_w = np.minimum(np.arange(width), width - np.arange(width))
    inner = (freq_h[:, None] < b) & (freq_w[None, :] < b)
    # Frequencies whose own index and mirror index are both outside the window: untouched.
    window = fda.low_frequency_window(height, width, beta)
    mirror = window[(-np.arange(height)) % height][:, (-np.arange(width)) % width]
    outer = ~window & ~mirror
    assert inner.sum() == (2 * b - 1) ** 2 and outer.any()
    scale = np.abs(spec_s).max()
    expected_inner = np.abs(spec_t) * np.exp(1j * np.angle(spec_s))
    assert np.abs(spec_out - expected_inner)[:, inner].max() <= 1e-5 * scale
    np.testing.assert_allclose(np.abs(spec_out)[:, inner], np.abs(spec_t)[:, inner], rtol=1e-4, atol=1e-5 * scale)
    assert np.abs(spec_out - spec_s)[:, outer].max() <= 1e-5 * scale
    # The exchange is real: the target amplitude differs from the source's there.
    assert np.abs(np.abs(spec_t) - np.abs(spec_s))[:, inner].max() > 1e-2 * scale


@pytest.mark.parametrize("shape,beta", [((2, 32, 32, 3), 0.1), ((2, 24, 40, 3), 0.3), ((1, 17, 9, 1), 0.01)])
def test_matches_float64_numpy_reference(shape, beta):
    source, target = _images(4, shape), _images(5, shape)
    fn = jax.jit(functools.partial(fda.fda_source_to_target, beta=beta))
    out = np.asarray(fn(source, target))
    reference = _numpy_fda(source, target, beta)
    assert np.abs(out - reference).max() <= 1e-4 * np.abs(reference).max()
    assert out.min() >= 0.0 and out.max() <= 255.0
    if beta >= 0.1:  # the style really changed, and the clip was exercised
        assert np.abs(out - source).max() > 1.0
        assert (np.asarray(fda.fda_source_to_target_unclipped(source, target, beta)) > 255.0).any()


def test_window_is_four_corner_blocks():
    window = fda.low_frequency_window(10, 12, 0.25)  # b = 2
    expected = np.zeros((10, 12), bool)
    for rows in (slice(0, 2), slice(8, 10)):
        for cols in (slice(0, 2), slice(10, 12)):
            expected[rows, cols] = True
    np.testing.assert_array_equal(window, expected)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="equal NHWC shape"):
        fda.fda_source_to_target(np.zeros((2, 8, 8, 3)), np.zeros((1, 8, 8, 3)), 0.1)
    with pytest.raises(ValueError, match="fda_beta"):
        fda.fda_source_to_target(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)), 1.5)


# ---------------------------------------------------------------- pseudo-target engines
_ENGINE_KNOBS = dict(
    fda_beta=0.2,
    color_jitter_semantics="kornia",
    color_jitter_prob=1.0,
    color_jitter_strength=0.4,
    color_jitter_hue=0.2,
    blur_prob=1.0,
    blur_sigma=(1.0, 1.5),
    blur_kernel_size=5,
    coins_per="batch",
    order_per="image",
    sigma_per="image",
)


def _checkerboard(batch=2, size=8):
    board = (np.indices((size, size)).sum(axis=0) % 2).astype(bool)
    colours = np.array([[200.0, 40.0, 90.0], [30.0, 160.0, 220.0]], np.float32)
    return np.broadcast_to(np.where(board[..., None], colours[0], colours[1]), (batch, size, size, 3)).copy()


def test_fda_engine_is_fda():
    source, target = _images(6, (2, 16, 16, 3)), _images(7, (2, 16, 16, 3))
    out = translation.pseudo_target_images(jax.random.key(0), source, target, engine="fda", **_ENGINE_KNOBS)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(fda.fda_source_to_target(source, target, 0.2)))


def test_color_jitter_engine_changes_colours_not_layout():
    source = _checkerboard()
    out = np.asarray(
        translation.pseudo_target_images(jax.random.key(1), source, None, engine="color_jitter", **_ENGINE_KNOBS)
    )
    assert np.abs(out - source).max() > 1.0
    # No blur: pixels of equal input colour keep one output colour.
    board = (np.indices((8, 8)).sum(axis=0) % 2).astype(bool)
    for i in range(out.shape[0]):
        for cells in (board, ~board):
            assert np.ptp(out[i][cells], axis=0).max() < 1e-3


def test_gaussian_blur_engine_blurs_without_colour_change():
    flat = np.broadcast_to(np.array([120.0, 60.0, 30.0], np.float32), (2, 8, 8, 3)).copy()
    out = translation.pseudo_target_images(jax.random.key(2), flat, None, engine="gaussian_blur", **_ENGINE_KNOBS)
    np.testing.assert_allclose(np.asarray(out), flat, atol=1e-3)
    board = _checkerboard()
    out = np.asarray(
        translation.pseudo_target_images(jax.random.key(2), board, None, engine="gaussian_blur", **_ENGINE_KNOBS)
    )
    assert np.ptp(out, axis=(1, 2)).max() < 0.5 * np.ptp(board, axis=(1, 2)).max()


def test_engine_errors():
    source = _images(8, (1, 8, 8, 3))
    with pytest.raises(ValueError, match="needs target images"):
        translation.pseudo_target_images(jax.random.key(0), source, None, engine="fda", **_ENGINE_KNOBS)
    with pytest.raises(ValueError, match="unknown pull.translation"):
        translation.pseudo_target_images(jax.random.key(0), source, source, engine="cyclegan", **_ENGINE_KNOBS)
