"""A tiny run config for tests: the synthetic demo shrunk to 64x64 crops and a few steps."""

import importlib.util
import json
import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "synthetic_demo.py")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# Overrides on top of configs/synthetic_demo.py, usable as flags too (see `as_flags`).
TINY_OVERRIDES = {
    "data.crop_hw": (64, 64),
    "data.eval_resize_hw": (64, 128),
    "data.max_eval_examples": 8,
    "data.eval_batch_size": 4,
    "pull.num_queries": 16,
    "pull.num_negatives": 32,
    "train.num_steps": 4,
    "train.log_every": 1,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "train.num_pictures": 1,
}


def xla_flags(num_devices: int) -> str:
    """XLA_FLAGS for a child process: `num_devices` fake CPU devices, the suite's compile options."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return " ".join([f"--xla_force_host_platform_device_count={num_devices}", *flags])


def tiny_config(data_dir: str, method: str = "t2s", **overrides) -> ml_collections.ConfigDict:
    config = load_config_file(DEMO_CONFIG)
    config.compare_methods = ()
    config.method = method
    config.data.data_dir = data_dir
    for dotted, value in {**TINY_OVERRIDES, **overrides}.items():
        node = config
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def as_flags(data_dir: str, method: str = "t2s", **overrides) -> list[str]:
    """The same tiny config as `python -m t2s_jax.main` flags."""
    values = {"method": method, "data.data_dir": data_dir, "compare_methods": (), **TINY_OVERRIDES, **overrides}
    return [f"--config={DEMO_CONFIG}"] + [f"--config.{key}={value!r}" if not isinstance(value, str)
                                         else f"--config.{key}={value}" for key, value in values.items()]


def logged_losses(run_dir: str) -> dict[int, float]:
    """{step: train/loss} from a run's metrics.jsonl, asserting each step was logged exactly once."""
    from t2s_jax import reporting  # here: this module stays importable without jax

    with open(os.path.join(run_dir, reporting.METRICS_FILE)) as f:
        logged = [record for record in map(json.loads, f) if "train/loss" in record]
    steps = [record["step"] for record in logged]
    assert len(steps) == len(set(steps)), f"steps logged twice in {run_dir}: {steps}"
    return {record["step"]: record["train/loss"] for record in logged}
