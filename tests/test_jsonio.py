"""The one rule for non-finite numbers in the run's JSON files, and whole-file writes."""

import json
import math
import os

import numpy as np
import pytest

from t2s_jax import jsonio


def test_nan_and_inf_are_written_as_null_and_read_back_as_nan(tmp_path):
    value = {"miou": np.float32("nan"), "iou": np.array([0.5, np.inf]), "n": np.int64(3), "ok": np.bool_(True),
             "pair": (1, 2.5), "name": "a"}  # fmt: skip
    path = str(tmp_path / "eval" / "step_2.json")
    jsonio.write(path, value)
    assert json.load(open(path)) == {"miou": None, "iou": [0.5, None], "n": 3, "ok": True, "pair": [1, 2.5], "name": "a"}
    read = jsonio.read(path)
    assert math.isnan(read["miou"]) and read["iou"][0] == 0.5 and math.isnan(read["iou"][1])
    assert jsonio.dumps({"x": float("-inf")}) == '{"x": null}'  # strict JSON, never NaN/Infinity


def test_a_failed_write_keeps_the_old_file_and_leaves_no_part(tmp_path):
    path = str(tmp_path / "summary.json")
    jsonio.write(path, {"miou": 0.5})
    with pytest.raises(TypeError):
        jsonio.write(path, {"miou": object()})  # fails in the middle of writing
    assert jsonio.read(path) == {"miou": 0.5} and os.listdir(tmp_path) == ["summary.json"]
