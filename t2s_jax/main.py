"""Entry point: `python -m t2s_jax.main --config=configs/gta_cs_daformer.py --workdir=runs/x`.

Overrides go after the config: `--config.train.num_steps=100`. Configs are locked, so a
misspelt key fails with the list of valid keys.
"""

from __future__ import annotations

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from t2s_jax import parallel, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, evaluations.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming if possible) or evaluate.")
_STEP = flags.DEFINE_integer("step", None, "--mode=eval: checkpoint step to evaluate (default: latest).")
_PRETRAINED = flags.DEFINE_string(
    "pretrained",
    "",
    "--mode=eval: evaluate a pretrained segmentor instead: a Hugging Face SegFormer directory or a "
    "directory written by `python -m t2s_jax.models.convert`.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-process: host:port of process 0 (default: from the environment)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index.")
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True,
    "Keep compiled steps in JAX's persistent cache, $JAX_COMPILATION_CACHE_DIR or else "
    "<workdir>/jax_cache, so a resumed run skips compiling them.",
)  # fmt: skip

flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
    """Keeps INFO chatter of checkpointing and dataset libraries out of the progress log."""

    _NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/absl/")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(
            part in record.pathname for part in self._NOISY
        )


def enable_compilation_cache(workdir: str) -> str:
    """Turns on JAX's persistent compilation cache (before anything compiles); returns its folder.

    An explicit `JAX_COMPILATION_CACHE_DIR` (e.g. one cache shared by several runs) wins over
    the run's own `<workdir>/jax_cache`. The cache key covers the program, the devices, the
    compiler options and the jax version, so a stale entry is never used.
    """
    cache_dir = jax.config.jax_compilation_cache_dir or os.path.join(workdir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Executables compiled in under a second (eager ops, tiny jits) cost more to read than to
    # compile; the steps and the state initialisation take longer, whatever their size.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    if _COMPILATION_CACHE.value:
        logging.info("compilation cache: %s", enable_compilation_cache(_WORKDIR.value))
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    if _MODE.value == "eval":
        train.evaluate_checkpoint(config, _WORKDIR.value, step=_STEP.value, pretrained=_PRETRAINED.value)
    elif config.get("compare_methods"):
        train.train_methods(config, _WORKDIR.value)
    else:
        train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
