"""Strong augmentation on device (method.md section 4.6, docs/method.md §6): colour jitter, then blur.

Colour jitter has two semantics (`config.uda.color_jitter_semantics`):

* 'kornia' (default): kornia 0.5.8's `ColorJitter(s, s, s, h)`, which DAFormer (and so the
  paper's numbers) used. Factors: brightness b ~ U[clip(1 - s, 0, 2), clip(1 + s, 0, 2)]
  applied additively (x + b - 1), contrast c ~ U[max(0, 1 - s), 1 + s] as a plain multiply
  (x * c), saturation ~ U[max(0, 1 - s), 1 + s] multiplying S in HSV (S clipped to [0, 1]),
  hue ~ U[-h, h] turns, added to H in radians (x 2 pi, `fmod` 2 pi). Brightness and contrast
  clip to [0, 1]. HSV as kornia computes it: S = delta / (V + 1e-6), grey pixels get H = 0,
  channel ties resolve to the first maximum (R, G, B).
* 'torchvision': torchvision's `ColorJitter`: brightness, contrast and saturation blend with
  black, the grey mean and the grey image (factors ~ U[max(0, 1 - s), 1 + s]); hue rotates H
  by U[-h, h] turns; each adjustment clips to [0, 1].

Either way the factors are drawn per image and the four adjustments run in a random order.
Then a Gaussian blur with sigma ~ U(blur_sigma), an odd kernel per axis and reflect padding
(kornia's `GaussianBlur2d`).

Which draws are shared is explicit (`strong_augment`'s `coins_per`, `order_per`, `sigma_per`):
DAFormer's DACS draws one jitter coin and one blur coin per step for the whole batch and calls
kornia once per mixed image (order and sigma per image); MIC augments its masked batch with
one kornia call (one order and one sigma for the batch, factors still per image).
`strong_augment_options` builds the keyword arguments from `config.uda`.

Images are NHWC RGB in 0..255 (float); the result is float32 in 0..255.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

SEMANTICS = ("kornia", "torchvision")
DRAWS = ("batch", "image")  # one draw shared by the batch, or one per image

# ITU-R 601-2 luma, torchvision's `rgb_to_grayscale`.
_GRAY_WEIGHTS = np.array((0.2989, 0.587, 0.114), np.float32)
_KORNIA_HSV_EPS = 1e-6  # kornia.color.rgb_to_hsv's default eps


def blur_kernel_size_for(crop_side: int, fraction: float) -> int:
    """DAFormer's odd blur kernel for an image side: ceil(fraction * side), minus 1 if even (51 for 512)."""
    size = math.ceil(fraction * crop_side)
    return size if size % 2 else size - 1


# ----------------------------------------------------------------------------- torchvision semantics


def _grayscale(image: jax.Array) -> jax.Array:
    """(..., H, W, 3) -> (..., H, W, 1)."""
    return jnp.sum(image * _GRAY_WEIGHTS, axis=-1, keepdims=True)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def torchvision_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """One `(H, W, 3)` image in [0, 1]: scale towards black by `factor`."""
    return _blend(image, jnp.zeros_like(image), factor)


def torchvision_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """One `(H, W, 3)` image in [0, 1]: blend with the mean of its grayscale image."""
    return _blend(image, jnp.mean(_grayscale(image)), factor)


def torchvision_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """One `(H, W, 3)` image in [0, 1]: blend with its grayscale image."""
    return _blend(image, _grayscale(image), factor)


def _rgb_to_hsv(image: jax.Array) -> jax.Array:
    """torchvision's HSV, every channel in [0, 1]."""
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


def _hsv_sectors(h6: jax.Array, s: jax.Array, v: jax.Array, clip: bool) -> jax.Array:
    """RGB from hue in sixths (any real), saturation and value: the standard six sectors."""
    sector = jnp.floor(h6)
    frac = jnp.mod(h6, 6.0) - jnp.mod(sector, 6.0)
    p, q, t = v * (1.0 - s), v * (1.0 - s * frac), v * (1.0 - s * (1.0 - frac))
    if clip:
        p, q, t = (jnp.clip(c, 0.0, 1.0) for c in (p, q, t))
    # Per sector (0..5) which of v, q, p, t each channel takes.
    red = jnp.stack((v, q, p, p, t, v), axis=-1)
    green = jnp.stack((t, v, v, q, p, p), axis=-1)
    blue = jnp.stack((p, p, t, v, v, q), axis=-1)
    pick = jax.nn.one_hot(jnp.mod(sector, 6.0).astype(jnp.int32), 6, dtype=v.dtype)
    return jnp.stack([jnp.sum(channel * pick, axis=-1) for channel in (red, green, blue)], axis=-1)


def torchvision_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
    """One `(H, W, 3)` image in [0, 1]: rotate the hue by `shift` turns (in [-0.5, 0.5])."""
    hsv = _rgb_to_hsv(image)
    hue = jnp.mod(hsv[..., 0] + shift, 1.0)
    return _hsv_sectors(hue * 6.0, hsv[..., 1], hsv[..., 2], clip=True)


# ----------------------------------------------------------------------------- kornia 0.5.8 semantics


def kornia_brightness(image: jax.Array, shift: jax.Array) -> jax.Array:
    """`kornia.enhance.adjust_brightness`: add `shift`, clip to [0, 1]."""
    return jnp.clip(image + shift, 0.0, 1.0)


def kornia_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """`kornia.enhance.adjust_contrast`: multiply by `factor`, clip to [0, 1]."""
    return jnp.clip(image * factor, 0.0, 1.0)


def kornia_rgb_to_hsv(image: jax.Array) -> jax.Array:
    """`kornia.color.rgb_to_hsv` on (..., 3): H in [0, 2 pi), S = delta / (V + 1e-6), V = max."""
    max_c = jnp.max(image, axis=-1)
    delta = max_c - jnp.min(image, axis=-1)
    saturation = delta / (max_c + _KORNIA_HSV_EPS)
    delta = jnp.where(delta == 0, 1.0, delta)  # grey: every numerator below is 0, so H = 0
    below_max = max_c[..., None] - image
    rc, gc, bc = below_max[..., 0], below_max[..., 1], below_max[..., 2]
    candidates = jnp.stack((bc - gc, 2.0 * delta + rc - bc, 4.0 * delta + gc - rc), axis=-1)
    first_max = jnp.argmax(image == max_c[..., None], axis=-1)  # ties: the first channel
    hue = jnp.take_along_axis(candidates, first_max[..., None], axis=-1)[..., 0] / delta
    hue = 2.0 * math.pi * jnp.mod(hue / 6.0, 1.0)
    return jnp.stack((hue, saturation, max_c), axis=-1)


def kornia_hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """`kornia.color.hsv_to_rgb` on (..., 3): H in radians (any real), no clipping."""
    return _hsv_sectors(hsv[..., 0] / (2.0 * math.pi) * 6.0, hsv[..., 1], hsv[..., 2], clip=False)


def kornia_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """`kornia.enhance.adjust_saturation`: S * factor in HSV, clipped to [0, 1]."""
    hsv = kornia_rgb_to_hsv(image)
    hsv = hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * factor, 0.0, 1.0))
    return kornia_hsv_to_rgb(hsv)


def kornia_hue(image: jax.Array, radians: jax.Array) -> jax.Array:
    """`kornia.enhance.adjust_hue`: H + radians, `fmod` 2 pi (negative stays negative; the
    sectors wrap it)."""
    hsv = kornia_rgb_to_hsv(image)
    hsv = hsv.at[..., 0].set(jnp.fmod(hsv[..., 0] + radians, 2.0 * math.pi))
    return kornia_hsv_to_rgb(hsv)


# ----------------------------------------------------------------------------- jitter


def color_jitter(
    image: jax.Array,
    brightness: jax.Array,
    contrast: jax.Array,
    saturation: jax.Array,
    hue: jax.Array,
    order: jax.Array,
    *,
    semantics: str,
) -> jax.Array:
    """One `(H, W, 3)` image in [0, 1] through `ColorJitter`'s adjustments with drawn factors.

    `brightness`, `contrast`, `saturation` are factors around 1 and `hue` is in turns, as both
    libraries draw them; `semantics` applies them ('kornia': x + brightness - 1, hue * 2 pi).
    `order` is a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue).
    """
    if semantics == "kornia":
        adjustments = (
            lambda x: kornia_brightness(x, brightness - 1.0),
            lambda x: kornia_contrast(x, contrast),
            lambda x: kornia_saturation(x, saturation),
            lambda x: kornia_hue(x, hue * 2.0 * math.pi),
        )
    elif semantics == "torchvision":
        adjustments = (
            lambda x: torchvision_brightness(x, brightness),
            lambda x: torchvision_contrast(x, contrast),
            lambda x: torchvision_saturation(x, saturation),
            lambda x: torchvision_hue(x, hue),
        )
    else:
        raise ValueError(f"unknown colour-jitter semantics {semantics!r}; expected one of {SEMANTICS}")
    for position in range(len(adjustments)):
        image = jax.lax.switch(order[position], adjustments, image)
    return image


def jitter_factor_ranges(semantics: str, strength: float, hue: float) -> np.ndarray:
    """(4, 2) uniform ranges of the brightness, contrast, saturation and hue (turns) factors."""
    low = max(0.0, 1.0 - strength)
    brightness = (min(low, 2.0), min(1.0 + strength, 2.0)) if semantics == "kornia" else (low, 1.0 + strength)
    return np.array((brightness, (low, 1.0 + strength), (low, 1.0 + strength), (-hue, hue)), np.float32)


# ----------------------------------------------------------------------------- blur


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


# ----------------------------------------------------------------------------- the augmentation


def _draw(key: jax.Array, draws: str, batch: int, draw_one) -> jax.Array:
    """`draw_one(key)` for every image ('image'), or once, broadcast to the batch ('batch')."""
    if draws == "image":
        return jax.vmap(draw_one)(jax.random.split(key, batch))
    one = draw_one(key)
    return jnp.broadcast_to(one, (batch, *one.shape))


def draw_augment_params(
    key: jax.Array,
    batch: int,
    *,
    color_jitter_semantics: str,
    color_jitter_strength: float,
    color_jitter_hue: float,
    blur_sigma: tuple[float, float],
    coins_per: str,
    order_per: str,
    sigma_per: str,
) -> dict[str, jax.Array]:
    """The random draws of `strong_augment` for `batch` images.

    'coins' (B, 2): U[0, 1) for [jitter, blur]; 'factors' (B, 4): brightness, contrast,
    saturation, hue (turns), always per image; 'orders' (B, 4): op permutations; 'sigmas' (B,).
    Coins, orders and sigmas are drawn once and shared when their `*_per` is 'batch'.
    """
    for name, draws in (("coins_per (config.uda.augment_coins)", coins_per), ("order_per", order_per),
                        ("sigma_per", sigma_per)):
        if draws not in DRAWS:
            raise ValueError(f"strong_augment: {name} must be one of {DRAWS}, got {draws!r}")
    low, high = jitter_factor_ranges(color_jitter_semantics, color_jitter_strength, color_jitter_hue).T
    coin_key, factor_key, order_key, sigma_key = jax.random.split(key, 4)
    return {
        "coins": _draw(coin_key, coins_per, batch, lambda k: jax.random.uniform(k, (2,))),
        "factors": jax.random.uniform(factor_key, (batch, 4), minval=low, maxval=high),
        "orders": _draw(order_key, order_per, batch, lambda k: jax.random.permutation(k, 4)),
        "sigmas": _draw(
            sigma_key, sigma_per, batch, lambda k: jax.random.uniform(k, (), minval=blur_sigma[0], maxval=blur_sigma[1])
        ),
    }


def strong_augment(
    key: jax.Array,
    images: jax.Array,
    *,
    color_jitter_semantics: str,
    color_jitter_prob: float,
    color_jitter_strength: float,
    color_jitter_hue: float,
    blur_prob: float,
    blur_sigma: tuple[float, float],
    blur_kernel_size: int | tuple[int, int],
    coins_per: str,
    order_per: str,
    sigma_per: str,
) -> jax.Array:
    """`(B, H, W, 3)` RGB 0..255 -> float32 0..255: colour jitter, then Gaussian blur.

    Jitter is applied with probability `color_jitter_prob` and blur with `blur_prob`, the
    coins drawn per 'batch' (DAFormer, MIC) or per 'image' (`coins_per`). Jitter factors are
    per image; the op order (`order_per`) and the blur sigma (`sigma_per`) per 'image' (DACS:
    one kornia call per mixed image) or per 'batch' (MIC: one call for the batch).
    """
    if color_jitter_semantics not in SEMANTICS:
        raise ValueError(
            f"strong_augment: color_jitter_semantics (config.uda.color_jitter_semantics) must be one of "
            f"{SEMANTICS}, got {color_jitter_semantics!r}"
        )
    if not 0.0 <= color_jitter_hue <= 0.5:
        raise ValueError(f"strong_augment: color_jitter_hue must lie in [0, 0.5], got {color_jitter_hue}")
    if isinstance(blur_kernel_size, int):
        blur_kernel_size = (blur_kernel_size, blur_kernel_size)
    if any(size < 1 or size % 2 == 0 for size in blur_kernel_size):
        raise ValueError(f"strong_augment: blur_kernel_size must be odd and positive, got {blur_kernel_size}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"strong_augment: expected (B, H, W, 3) RGB images, got {images.shape}")
    params = draw_augment_params(
        key,
        images.shape[0],
        color_jitter_semantics=color_jitter_semantics,
        color_jitter_strength=color_jitter_strength,
        color_jitter_hue=color_jitter_hue,
        blur_sigma=blur_sigma,
        coins_per=coins_per,
        order_per=order_per,
        sigma_per=sigma_per,
    )

    def augment_one(image, coin, factor, order, sigma):
        image = jnp.clip(image.astype(jnp.float32) / 255.0, 0.0, 1.0)
        jittered = color_jitter(image, *factor, order, semantics=color_jitter_semantics)
        image = jnp.where(coin[0] < color_jitter_prob, jittered, image)
        blurred = gaussian_blur(image, sigma, blur_kernel_size)
        image = jnp.where(coin[1] < blur_prob, blurred, image)
        return image * 255.0

    return jax.vmap(augment_one)(images, params["coins"], params["factors"], params["orders"], params["sigmas"])


def strong_augment_options(
    uda: ml_collections.ConfigDict, images_hw: tuple[int, int], *, order_per: str = "image", sigma_per: str = "image"
) -> dict:
    """`strong_augment`'s keyword arguments from `config.uda` for images of `images_hw`.

    The defaults are DACS's draws for the mixed images (one kornia call per image); MIC's
    masked batch passes order_per='batch', sigma_per='batch' (docs/method.md §6). DAFormer sizes
    the blur kernel per axis.
    """
    height, width = images_hw
    return dict(
        color_jitter_semantics=uda.color_jitter_semantics,
        color_jitter_prob=uda.color_jitter_prob,
        color_jitter_strength=uda.color_jitter_strength,
        color_jitter_hue=uda.color_jitter_hue,
        blur_prob=uda.blur_prob,
        blur_sigma=tuple(uda.blur_sigma),
        blur_kernel_size=(
            blur_kernel_size_for(height, uda.blur_kernel_fraction),
            blur_kernel_size_for(width, uda.blur_kernel_fraction),
        ),
        coins_per=uda.augment_coins,
        order_per=order_per,
        sigma_per=sigma_per,
    )
