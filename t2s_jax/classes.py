"""Cityscapes train-id classes: names, picture palette and the SYNTHIA evaluation subsets."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

# Train ids 0..18, in order (method.md section 1).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# The standard Cityscapes colours (cityscapesscripts labels.py), one RGB triple per train id.
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
        (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)  # fmt: skip

# SYNTHIA -> Cityscapes is reported over 16 classes (no terrain, truck, train) and over
# 13 classes (also no wall, fence, pole).
SYNTHIA16_CLASS_IDS = tuple(c for c in range(19) if c not in (9, 14, 16))
SYNTHIA13_CLASS_IDS = tuple(c for c in SYNTHIA16_CLASS_IDS if c not in (3, 4, 5))


def colorize(label_map: np.ndarray, palette: np.ndarray = CITYSCAPES_PALETTE) -> np.ndarray:
    """(..., H, W) class ids -> (..., H, W, 3) uint8 RGB; ignore and unknown ids are black."""
    lookup = np.zeros((256, 3), np.uint8)
    lookup[: len(palette)] = palette
    return lookup[np.asarray(label_map).astype(np.uint8)]
