"""Input pipeline: prepared datasets, host transforms and the grain iterators.

Images leave the host as uint8 0-255 (4x less to transfer than float32); the device
normalises them (`t2s_jax/uda/normalize.py`, method.md section 2).
"""

from t2s_jax.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX, ClassList
from t2s_jax.data.pipeline import (
    make_eval_iterator,
    make_train_dataset,
    make_train_iterator,
    num_eval_examples,
)
from t2s_jax.data.sources import DamagedDataError, check_classes, class_list, class_names, ensure_prepared


__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "IGNORE_INDEX",
    "ClassList",
    "DamagedDataError",
    "check_classes",
    "class_list",
    "class_names",
    "ensure_prepared",
    "make_eval_iterator",
    "make_train_dataset",
    "make_train_iterator",
    "num_eval_examples",
]
