"""Block masks of masked image consistency (MIC, docs/method.md §6) and MaskTwins' complementary views (§7).

A mask keeps whole b x b blocks: a grid of round(H/b) x round(W/b) cells, each kept
independently with probability 1 - ratio (kept iff U > ratio, U ~ U(0, 1), as the
original), upsampled to the image by nearest neighbour with PyTorch's rule (output pixel i
reads cell floor(i * g / H)), which makes exact b x b blocks when b divides the size.
Masked pixels take the ImageNet mean colour, i.e. exactly 0 after normalisation: the
original multiplies the normalised image by the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from t2s_jax.uda.normalize import IMAGENET_MEAN


def mask_grid_hw(image_hw: tuple[int, int], block_size: int) -> tuple[int, int]:
    """The static cell grid of a mask: Python round(H / b), round(W / b) (the original's rule)."""
    if block_size <= 0:
        raise ValueError(f"mask block size must be positive, got {block_size}")
    return max(round(image_hw[0] / block_size), 1), max(round(image_hw[1] / block_size), 1)


def upsample_cells(cells: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
    """(N, gh, gw) cell values -> (N, H, W) by nearest neighbour, PyTorch's floor(i * g / H) rule."""
    grid_h, grid_w = cells.shape[1:3]
    rows = np.arange(image_hw[0]) * grid_h // image_hw[0]
    cols = np.arange(image_hw[1]) * grid_w // image_hw[1]
    return cells[:, rows][:, :, cols]


def block_mask_cells(key: jax.Array, num_images: int, grid_hw: tuple[int, int], ratio: float) -> jax.Array:
    """(N, gh, gw) bool: cell kept iff U > ratio."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    return jax.random.uniform(key, (num_images, *grid_hw)) > ratio


def block_masks(key: jax.Array, num_images: int, image_hw: tuple[int, int], block_size: int, ratio: float) -> jax.Array:
    """(N, H, W) bool keep-masks, one independent draw per image."""
    cells = block_mask_cells(key, num_images, mask_grid_hw(image_hw, block_size), ratio)
    return upsample_cells(cells, image_hw)


def view_masks(
    key: jax.Array,
    num_images: int,
    image_hw: tuple[int, int],
    block_size: int,
    ratio: float,
    *,
    num_views: int,
    complementary: bool,
) -> jax.Array:
    """(V, N, H, W) bool keep-masks of MaskTwins' views of the same images.

    complementary, 2 views: M (kept iff U > ratio) and its exact complement 1 - M.
    complementary, V > 2 views: each cell goes to exactly one view, uniformly (the K-view
    partition), so the views' masks sum to 1 everywhere. Not complementary (the "two random
    masks" ablation): view 1 as above, every other view an independent mask of ratio 1 - ratio.
    """
    if num_views < 2:
        raise ValueError(f"masktwins needs at least 2 views, got {num_views}")
    grid_hw = mask_grid_hw(image_hw, block_size)
    if complementary and num_views == 2:
        first = block_mask_cells(key, num_images, grid_hw, ratio)
        cells = jnp.stack([first, ~first])
    elif complementary:
        owner = jax.random.randint(key, (num_images, *grid_hw), 0, num_views)
        cells = owner[None] == jnp.arange(num_views)[:, None, None, None]
    else:
        first_key, *other_keys = jax.random.split(key, num_views)
        cells = jnp.stack(
            [block_mask_cells(first_key, num_images, grid_hw, ratio)]
            + [block_mask_cells(k, num_images, grid_hw, 1.0 - ratio) for k in other_keys]
        )
    return jax.vmap(lambda c: upsample_cells(c, image_hw))(cells)


def apply_mask(images: jax.Array, keep: jax.Array) -> jax.Array:
    """(N, H, W, 3) images 0..255 with masked pixels set to the ImageNet mean (0 once normalised)."""
    return jnp.where(keep[..., None], images, jnp.asarray(IMAGENET_MEAN, images.dtype))
