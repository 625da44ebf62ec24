"""Tiny dataset trees in the published layouts (GTA5, SYNTHIA-RAND-CITYSCAPES, Cityscapes), for
tests that run the real preparation and the real configs end to end."""

from __future__ import annotations

import os

import cv2
import numpy as np

# Inverse tables (train id -> a raw id the dataset uses for it), typed from method.md section 1.
_TRAIN_TO_LABEL_ID = {0: 7, 1: 8, 2: 11, 3: 12, 4: 13, 5: 17, 6: 19, 7: 20, 8: 21, 9: 22, 10: 23, 11: 24,
                      12: 25, 13: 26, 14: 27, 15: 28, 16: 31, 17: 32, 18: 33}  # fmt: skip
_TRAIN_TO_SYNTHIA = {0: 3, 1: 4, 2: 2, 3: 21, 4: 5, 5: 7, 6: 15, 7: 9, 8: 6, 10: 1, 11: 10, 12: 17,
                     13: 8, 15: 19, 17: 12, 18: 11}  # fmt: skip


def _scene(rng: np.random.Generator, hw: tuple[int, int], classes: list[int]) -> np.ndarray:
    """A train-id map of horizontal bands and blocks, several classes per image."""
    label = np.empty(hw, np.int64)
    bands = rng.choice(classes, size=4, replace=False)
    for i, value in enumerate(bands):
        label[i * hw[0] // 4 : (i + 1) * hw[0] // 4] = value
    for _ in range(3):
        y, x = rng.integers(0, hw[0] // 2), rng.integers(0, hw[1] // 2)
        label[y : y + hw[0] // 3, x : x + hw[1] // 4] = rng.choice(classes)
    return label


def _image(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """RGB image whose colour follows the label (so a model can learn), plus noise."""
    palette = rng.integers(0, 256, (256, 3))
    noise = rng.integers(-20, 21, (*label.shape, 3))
    return np.clip(palette[label] + noise, 0, 255).astype(np.uint8)


def _write(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if array.ndim == 3:
        array = array[..., ::-1]  # RGB -> OpenCV's BGR
    assert cv2.imwrite(path, np.ascontiguousarray(array)), path


def write_gta5(root: str, num_images: int = 4, hw: tuple[int, int] = (52, 96), seed: int = 0) -> None:
    """images/%05d.png (RGB) and labels/%05d.png (Cityscapes label ids)."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        label = _scene(rng, hw, list(_TRAIN_TO_LABEL_ID))
        _write(f"{root}/images/{i:05d}.png", _image(rng, label))
        _write(f"{root}/labels/{i:05d}.png", np.vectorize(_TRAIN_TO_LABEL_ID.get)(label).astype(np.uint8))


def write_synthia(root: str, num_images: int = 4, hw: tuple[int, int] = (76, 128), seed: int = 1) -> None:
    """RGB/%07d.png and GT/LABELS/%07d.png: 16-bit, class in the red channel, instance ids in green."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        label = _scene(rng, hw, list(_TRAIN_TO_SYNTHIA))
        _write(f"{root}/RGB/{i:07d}.png", _image(rng, label))
        ground_truth = np.zeros((*hw, 3), np.uint16)
        ground_truth[..., 0] = np.vectorize(_TRAIN_TO_SYNTHIA.get)(label)
        ground_truth[..., 1] = rng.integers(0, 4000, hw)
        _write(f"{root}/GT/LABELS/{i:07d}.png", ground_truth)


def write_cityscapes(
    root: str, num_train: int = 4, num_val: int = 2, hw: tuple[int, int] = (64, 128), seed: int = 2
) -> None:
    """leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png and gtFine/.../<stem>_gtFine_labelTrainIds.png."""
    rng = np.random.default_rng(seed)
    for split, count, city in (("train", num_train, "aachen"), ("val", num_val, "frankfurt")):
        for i in range(count):
            stem = f"{city}_{i:06d}_000019"
            label = _scene(rng, hw, list(range(19)))
            _write(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", _image(rng, label))
            _write(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png", label.astype(np.uint8))
