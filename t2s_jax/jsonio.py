"""The run's JSON files (metrics, evaluations, comparisons) and their one rule for numbers
that are not finite: strict JSON has no NaN or Inf, so they are written as null and read
back as nan. Files are written whole or not at all (a temporary file, then a rename)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def to_json(value: Any) -> Any:
    """`value` with numpy scalars and arrays as Python numbers and lists, tuples as lists and
    every non-finite float as None."""
    if isinstance(value, Mapping):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_json(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def nan_for_null(value: Any) -> Any:
    """The inverse of `to_json` for numbers: every None in `value` becomes nan."""
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {key: nan_for_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [nan_for_null(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of `to_json(value)`."""
    return json.dumps(to_json(value), allow_nan=False, **kwargs)


def loads(text: str) -> Any:
    """`text` parsed, null read as nan. Raises json.JSONDecodeError (a ValueError)."""
    return nan_for_null(json.loads(text))


def write(path: str, value: Any) -> None:
    """Writes `value` to `path` atomically: a kill or a full disk leaves the old file or none,
    never a part. Raises OSError (and leaves no temporary file) when the write fails."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w") as file:
            file.write(dumps(value, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def read(path: str) -> Any:
    """The JSON value of `path`, null read as nan. Raises OSError or ValueError."""
    with open(path) as file:
        return loads(file.read())
