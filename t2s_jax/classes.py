"""Class lists: names and picture palette per train id; Cityscapes' and the SYNTHIA subsets.

Cityscapes, GTA5, SYNTHIA and synthetic_city share `CITYSCAPES`; an image folder brings its
own (classes.txt), stored with the prepared dataset (`t2s_jax.data.class_list`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

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


class ClassList(NamedTuple):
    """The classes of a dataset, in train-id order."""

    names: tuple[str, ...]
    palette: np.ndarray  # (K, 3) uint8 RGB picture colour per class

    @property
    def is_cityscapes(self) -> bool:
        """The 19 Cityscapes classes: mIoU16 / mIoU13 (SYNTHIA protocol) apply."""
        return tuple(self.names) == CITYSCAPES_CLASSES


CITYSCAPES = ClassList(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)


def _voc_colour(index: int) -> tuple[int, int, int]:
    """PASCAL VOC's colour map: the bits of `index` interleaved into R, G, B from the top
    bit down. Distinct for distinct indices; black only for 0."""
    rgb = [0, 0, 0]
    for bit in range(7, -1, -1):
        for channel in range(3):
            rgb[channel] |= ((index >> channel) & 1) << bit
        index >>= 3
    return tuple(rgb)


def generate_palette(num_classes: int, taken: Iterable[tuple[int, int, int]] = ()) -> np.ndarray:
    """(num_classes, 3) uint8 distinct colours, none black (ignore) nor in `taken`: the VOC
    colour map from index 1 on."""
    taken, colours, index = set(map(tuple, taken)), [], 1
    while len(colours) < num_classes:
        colour = _voc_colour(index)
        if colour not in taken:
            colours.append(colour)
        index += 1
    return np.array(colours, np.uint8).reshape(num_classes, 3)


def colorize(label_map: np.ndarray, palette: np.ndarray = CITYSCAPES_PALETTE) -> np.ndarray:
    """(..., H, W) class ids -> (..., H, W, 3) uint8 RGB; ignore and unknown ids are black."""
    lookup = np.zeros((256, 3), np.uint8)
    lookup[: len(palette)] = palette
    return lookup[np.asarray(label_map).astype(np.uint8)]
