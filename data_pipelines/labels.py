"""Raw label ids of each published dataset and their mapping to Cityscapes train ids.

Tables from `docs/method.md` section 1. A mapping is a 65536-entry lookup table so
8-bit and 16-bit raw labels map with one indexing operation; every id that is not a key
of the table maps to 255 (ignore). Ids a dataset never defines at all ("unknown") are
counted separately by the conversion so the report can name the files holding them.
"""

from __future__ import annotations

import numpy as np

from t2s_jax.classes import IGNORE_INDEX

# Cityscapes label id -> train id (cityscapesscripts labels.py); GTA5 uses the same ids.
CITYSCAPES_LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
# Every id of the Cityscapes label table (0 'unlabeled' .. 33 'bicycle'); others are unknown.
CITYSCAPES_LABEL_IDS = frozenset(range(34))

# SYNTHIA-RAND-CITYSCAPES class (R channel of GT/LABELS) -> train id. Terrain (16), truck (18)
# and train (20) have no match in the 16-class protocol and map to ignore like void (0).
SYNTHIA_ID_TO_TRAIN_ID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10,
    10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}  # fmt: skip
SYNTHIA_IDS = frozenset(range(23))  # 0 void .. 22 lane marking


def train_id_lookup(mapping: dict[int, int]) -> np.ndarray:
    """A uint8 table over all 16-bit ids: table[raw] = train id, 255 for unmapped ids."""
    table = np.full(1 << 16, IGNORE_INDEX, np.uint8)
    for raw_id, train_id in mapping.items():
        table[raw_id] = train_id
    return table


def identity_mapping(num_classes: int) -> dict[int, int]:
    """Train ids stored as they are (Cityscapes labelTrainIds, a user's image folder)."""
    return {c: c for c in range(num_classes)}
