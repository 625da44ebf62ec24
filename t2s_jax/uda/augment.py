"""Strong augmentation of the mixed images on device (method.md section 4.6).

Colour jitter with torchvision's `ColorJitter` semantics on [0, 1] images: brightness,
contrast and saturation factors ~ U[max(0, 1 - s), 1 + s], hue shift ~ U[-h, h], the four
adjustments in a random order per example (as torchvision does), each clipped to [0, 1];
applied per example with probability `color_jitter_prob`. Then a Gaussian blur with
sigma ~ U(blur_sigma) and an odd kernel, reflect padding (torchvision / kornia), applied
per example with probability `blur_prob`. DAFormer itself used kornia 0.5's ColorJitter
(now kornia's `ColorJiggle`: additive brightness, contrast without the mean) and drew the
apply-or-not coins once per batch; here every draw is per example.

Images are NHWC RGB in 0..255 (float); the result is float32 in 0..255.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# ITU-R 601-2 luma, torchvision's `rgb_to_grayscale`.
_GRAY_WEIGHTS = np.array((0.2989, 0.587, 0.114), np.float32)


def blur_kernel_size_for(crop_side: int, fraction: float) -> int:
    """DAFormer's odd blur kernel for an image side: ceil(fraction * side), minus 1 if even (51 for 512)."""
    size = math.ceil(fraction * crop_side)
    return size if size % 2 else size - 1


def _grayscale(image: jax.Array) -> jax.Array:
    """(..., H, W, 3) -> (..., H, W, 1)."""
    return jnp.sum(image * _GRAY_WEIGHTS, axis=-1, keepdims=True)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """One `(H, W, 3)` image in [0, 1]: scale towards black by `factor`."""
    return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """One `(H, W, 3)` image in [0, 1]: blend with the mean of its grayscale image."""
    return _blend(image, jnp.mean(_grayscale(image)), factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """One `(H, W, 3)` image in [0, 1]: blend with its grayscale image."""
    return _blend(image, _grayscale(image), factor)


def _rgb_to_hsv(image: jax.Array) -> jax.Array:
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    max_c = jnp.max(image, axis=-1)
    min_c = jnp.min(image, axis=-1)
    chroma = max_c - min_c
    grey = max_c == min_c  # hue and saturation undefined: torchvision sets both to 0
    saturation = chroma / jnp.where(grey, 1.0, max_c)
    divisor = jnp.where(grey, 1.0, chroma)
    rc, gc, bc = (max_c - r) / divisor, (max_c - g) / divisor, (max_c - b) / divisor
    is_r = max_c == r
    is_g = (max_c == g) & ~is_r
    hue = jnp.where(is_r, bc - gc, jnp.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = jnp.mod(hue / 6.0 + 1.0, 1.0)
    return jnp.stack((hue, saturation, max_c), axis=-1)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = jnp.floor(h * 6.0)
    frac = h * 6.0 - sector
    sector = sector.astype(jnp.int32) % 6
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * frac), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - frac)), 0.0, 1.0)
    # Per sector (0..5) which of v, q, p, t each channel takes.
    red = jnp.stack((v, q, p, p, t, v), axis=-1)
    green = jnp.stack((t, v, v, q, p, p), axis=-1)
    blue = jnp.stack((p, p, t, v, v, q), axis=-1)
    pick = jax.nn.one_hot(sector, 6, dtype=hsv.dtype)
    return jnp.stack([jnp.sum(channel * pick, axis=-1) for channel in (red, green, blue)], axis=-1)


def adjust_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
    """One `(H, W, 3)` image in [0, 1]: rotate the hue by `shift` turns (in [-0.5, 0.5])."""
    hsv = _rgb_to_hsv(image)
    hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
    return _hsv_to_rgb(hsv)


def color_jitter(
    image: jax.Array,
    brightness: jax.Array,
    contrast: jax.Array,
    saturation: jax.Array,
    hue: jax.Array,
    order: jax.Array,
) -> jax.Array:
    """One `(H, W, 3)` image in [0, 1]; `order` is a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    adjustments = (
        lambda x: adjust_brightness(x, brightness),
        lambda x: adjust_contrast(x, contrast),
        lambda x: adjust_saturation(x, saturation),
        lambda x: adjust_hue(x, hue),
    )
    for position in range(len(adjustments)):
        image = jax.lax.switch(order[position], adjustments, image)
    return image


def _random_color_jitter(key: jax.Array, image: jax.Array, strength: float, hue: float) -> jax.Array:
    """torchvision ColorJitter(strength, strength, strength, hue) on one `(H, W, 3)` image in [0, 1]."""
    factors_key, hue_key, order_key = jax.random.split(key, 3)
    factors = jax.random.uniform(factors_key, (3,), minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)
    hue_shift = jax.random.uniform(hue_key, (), minval=-hue, maxval=hue)
    order = jax.random.permutation(order_key, 4)
    return color_jitter(image, factors[0], factors[1], factors[2], hue_shift, order)


def _reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Reflect padding without repeating the edge (PyTorch / NumPy 'reflect'), for any offset."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


def _blur_matrix(sigma: jax.Array, size: int, kernel_size: int) -> jax.Array:
    """`(size, size)` matrix M with (M @ x) = x convolved with a Gaussian under reflect padding."""
    radius = kernel_size // 2
    offsets = np.arange(-radius, radius + 1)
    taps = jnp.exp(-(offsets.astype(np.float32) ** 2) / (2.0 * sigma**2))
    taps = taps / jnp.sum(taps)
    sources = _reflect_index(np.arange(size)[:, None] + offsets[None, :], size)  # (size, kernel_size), static
    rows = np.broadcast_to(np.arange(size)[:, None], sources.shape)
    return jnp.zeros((size, size), jnp.float32).at[rows, sources].add(jnp.broadcast_to(taps, sources.shape))


def gaussian_blur(image: jax.Array, sigma: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """One `(H, W, C)` image: separable Gaussian blur, odd `kernel_size` (kh, kw), reflect padding."""
    height, width = image.shape[:2]
    blur_h = _blur_matrix(sigma, height, kernel_size[0])
    blur_w = _blur_matrix(sigma, width, kernel_size[1])
    # Dense matrices fold the padding in; HIGHEST keeps float32 accuracy on TF32 hardware.
    highest = jax.lax.Precision.HIGHEST
    image = jnp.einsum("ih,hwc->iwc", blur_h, image, precision=highest)
    return jnp.einsum("jw,iwc->ijc", blur_w, image, precision=highest)


def strong_augment(
    key: jax.Array,
    images: jax.Array,
    *,
    color_jitter_prob: float,
    color_jitter_strength: float,
    color_jitter_hue: float,
    blur_prob: float,
    blur_sigma: tuple[float, float],
    blur_kernel_size: int | tuple[int, int],
) -> jax.Array:
    """`(B, H, W, 3)` RGB 0..255 -> float32 0..255: per-example colour jitter, then Gaussian blur."""
    if not 0.0 <= color_jitter_hue <= 0.5:
        raise ValueError(f"strong_augment: color_jitter_hue must lie in [0, 0.5], got {color_jitter_hue}")
    if isinstance(blur_kernel_size, int):
        blur_kernel_size = (blur_kernel_size, blur_kernel_size)
    if any(size < 1 or size % 2 == 0 for size in blur_kernel_size):
        raise ValueError(f"strong_augment: blur_kernel_size must be odd and positive, got {blur_kernel_size}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"strong_augment: expected (B, H, W, 3) RGB images, got {images.shape}")

    def augment_one(example_key: jax.Array, image: jax.Array) -> jax.Array:
        jitter_coin, jitter_key, blur_coin, sigma_key = jax.random.split(example_key, 4)
        image = jnp.clip(image.astype(jnp.float32) / 255.0, 0.0, 1.0)
        jittered = _random_color_jitter(jitter_key, image, color_jitter_strength, color_jitter_hue)
        image = jnp.where(jax.random.bernoulli(jitter_coin, color_jitter_prob), jittered, image)
        sigma = jax.random.uniform(sigma_key, (), minval=blur_sigma[0], maxval=blur_sigma[1])
        blurred = gaussian_blur(image, sigma, blur_kernel_size)
        image = jnp.where(jax.random.bernoulli(blur_coin, blur_prob), blurred, image)
        return image * 255.0

    return jax.vmap(augment_one)(jax.random.split(key, images.shape[0]), images)


def strong_augment_options(uda_config, images_hw: tuple[int, int]) -> dict:
    """`strong_augment`'s keyword arguments from `config.uda` for images of `images_hw`;
    DAFormer sizes the blur kernel per axis."""
    height, width = images_hw
    return dict(
        color_jitter_prob=uda_config.color_jitter_prob,
        color_jitter_strength=uda_config.color_jitter_strength,
        color_jitter_hue=uda_config.color_jitter_hue,
        blur_prob=uda_config.blur_prob,
        blur_sigma=tuple(uda_config.blur_sigma),
        blur_kernel_size=(
            blur_kernel_size_for(height, uda_config.blur_kernel_fraction),
            blur_kernel_size_for(width, uda_config.blur_kernel_fraction),
        ),
    )
