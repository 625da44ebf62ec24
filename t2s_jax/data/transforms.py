"""Host-side transforms of one example (method.md section 2), NumPy and OpenCV.

Images are (H, W, 3) uint8, labels (H, W) uint8 train ids with 255 = ignore, validity maps
(H, W) uint8 with 1 = valid. Random choices come from the `np.random.Generator` grain hands
each element, so every transform is a pure function of (example, rng). Resizing follows
mmcv (`imrescale`, `imresize`), which DAFormer's pipeline calls: OpenCV bilinear for images,
nearest for labels.
"""

from __future__ import annotations

import cv2
import numpy as np

from data_pipelines.convert import resize_nearest
from t2s_jax.classes import IGNORE_INDEX
from t2s_jax.config import ConfigError


def fit_size(hw: tuple[int, int], max_hw: tuple[int, int]) -> tuple[int, int]:
    """mmcv's `rescale_size` for a (long edge, short edge) bound given as `max_hw` in either order.

    scale = min(long bound / long side, short bound / short side), sides int(x * scale + 0.5):
    GTA5's 1052x1914 into (720, 1280) gives 704x1280, Cityscapes' 1024x2048 into (512, 1024)
    gives 512x1024; a portrait image gets its long side bounded by the long bound too.
    """
    scale = min(max(max_hw) / max(hw), min(max_hw) / min(hw))
    return int(hw[0] * scale + 0.5), int(hw[1] * scale + 0.5)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize, `cv2.INTER_LINEAR` as mmcv: half-pixel centres, no antialiasing."""
    if image.shape[:2] == tuple(hw):
        return image
    return cv2.resize(image, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize, `cv2.INTER_NEAREST` as mmcv (`convert.resize_nearest`)."""
    if label.shape == tuple(hw):
        return label
    return resize_nearest(label, hw)


def pad_map(array: np.ndarray, min_hw: tuple[int, int], value: int) -> np.ndarray:
    """Pads bottom/right up to `min_hw` with `value` (mmcv's `impad` as mmseg's Pad calls it)."""
    pad_h, pad_w = max(min_hw[0] - array.shape[0], 0), max(min_hw[1] - array.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return array
    return np.pad(array, ((0, pad_h), (0, pad_w)) + ((0, 0),) * (array.ndim - 2), constant_values=value)


def pad_to(image: np.ndarray, label: np.ndarray, min_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pads bottom/right up to `min_hw`: image with 0, label with ignore (as mmseg's Pad)."""
    return pad_map(image, min_hw, 0), pad_map(label, min_hw, IGNORE_INDEX)


def validity_map(hw: tuple[int, int], margins: tuple[int, int, int, int]) -> np.ndarray:
    """HRDA's pseudo-label validity (v2) of a stored target image of size `hw`: (h, w) uint8,
    0 on the rows and columns within `margins` = (top, bottom, left, right) pixels of its
    borders, 1 inside. The pipeline carries it as the label is carried (resize, crop, flip)."""
    (h, w), (top, bottom, left, right) = hw, margins
    if top + bottom >= h or left + right >= w:
        raise ConfigError(
            f"config.data.pseudo_margins={tuple(margins)} (top, bottom, left, right) leave no valid pixel "
            f"of a {h}x{w} target image: top + bottom must be below its height, left + right below its width"
        )
    valid = np.zeros((h, w), np.uint8)
    valid[top : h - bottom, left : w - right] = 1
    return valid


def random_offset(rng: np.random.Generator, hw: tuple[int, int], crop_hw: tuple[int, int]) -> tuple[int, int]:
    """Uniform top-left corner of a `crop_hw` window inside `hw` (which is at least crop_hw)."""
    return int(rng.integers(0, hw[0] - crop_hw[0] + 1)), int(rng.integers(0, hw[1] - crop_hw[1] + 1))


def _crop(array: np.ndarray, offset: tuple[int, int], crop_hw: tuple[int, int]) -> np.ndarray:
    return array[offset[0] : offset[0] + crop_hw[0], offset[1] : offset[1] + crop_hw[1]]


def _class_counts(label: np.ndarray) -> np.ndarray:
    return np.bincount(label.ravel(), minlength=256)


def cat_max_ratio_offset(
    rng: np.random.Generator,
    label: np.ndarray,
    crop_hw: tuple[int, int],
    cat_max_ratio: float,
    retries: int,
) -> tuple[int, int]:
    """mmseg RandomCrop: redraw up to `retries` times until the crop holds more than one
    non-ignore class and the largest covers < cat_max_ratio of them; keeps the last draw."""
    offset = random_offset(rng, label.shape, crop_hw)
    if cat_max_ratio >= 1.0:
        return offset
    for _ in range(retries):
        counts = _class_counts(_crop(label, offset, crop_hw))[:IGNORE_INDEX]
        present = counts[counts > 0]
        if len(present) > 1 and present.max() / present.sum() < cat_max_ratio:
            break
        offset = random_offset(rng, label.shape, crop_hw)
    return offset


def rare_class_offset(
    rng: np.random.Generator,
    label: np.ndarray,
    crop_hw: tuple[int, int],
    rare_class: int,
    min_crop_pixels: int,
    cat_max_ratio: float,
    retries: int,
) -> tuple[int, int]:
    """DAFormer RCS: redraw the (cat_max_ratio) crop up to `retries` times until it holds
    more than `min_crop_pixels` pixels of `rare_class`; keeps the last draw."""
    offset = cat_max_ratio_offset(rng, label, crop_hw, cat_max_ratio, retries)
    for _ in range(retries):
        if np.count_nonzero(_crop(label, offset, crop_hw) == rare_class) > min_crop_pixels:
            break
        offset = cat_max_ratio_offset(rng, label, crop_hw, cat_max_ratio, retries)
    return offset


def crop_and_flip(
    rng: np.random.Generator,
    maps: tuple[np.ndarray, ...],
    offset: tuple[int, int],
    crop_hw: tuple[int, int],
    flip_prob: float,
) -> tuple[np.ndarray, ...]:
    """The same `crop_hw` window at `offset` of every (H, W, ...) map of one example (image,
    label, validity), all flipped horizontally together with probability `flip_prob`."""
    maps = tuple(_crop(array, offset, crop_hw) for array in maps)
    if rng.random() < flip_prob:
        maps = tuple(array[:, ::-1] for array in maps)
    return tuple(np.ascontiguousarray(array) for array in maps)
