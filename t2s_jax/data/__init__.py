"""Input pipeline: prepared datasets, host transforms and the grain iterators.

Images leave the host as uint8 0-255; the device normalises them with IMAGENET_MEAN and
IMAGENET_STD (RGB, method.md section 2).
"""

from t2s_jax.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX
from t2s_jax.data.pipeline import (
    make_eval_iterator,
    make_train_dataset,
    make_train_iterator,
    num_eval_examples,
)
from t2s_jax.data.sources import class_names, ensure_prepared

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "class_names",
    "ensure_prepared",
    "make_eval_iterator",
    "make_train_dataset",
    "make_train_iterator",
    "num_eval_examples",
]
