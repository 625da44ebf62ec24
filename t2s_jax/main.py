"""Entry point: `python -m t2s_jax.main --config=configs/gta_cs_daformer.py --workdir=runs/x`.

`--config=FILE:METHOD` picks a method preset; overrides go after the config:
`--config.train.num_steps=100`. Mistakes in the command (a missing config file, a misspelt
key, a value of the wrong type or range, an unknown method, missing or unreadable weights, a
workdir that cannot be used) are reported in one line, exit 2, before the workdir is created
and before anything is built; so are the failures of a run
(non-finite losses, a failed save, a busy workdir, damaged prepared data, a lost peer). Exit status: 0 done, 1 the run failed,
2 the command is wrong, 128 + N stopped by signal N after a checkpoint (rerun to resume).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from t2s_jax import config as schema
from t2s_jax.training import control

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
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 600,  # = parallel.DEFAULT_PEER_TIMEOUT_S (jax is not imported yet)
    "Multi-process: seconds the processes wait for each other to connect at start-up.", lower_bound=1,
)  # fmt: skip
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True,
    "Keep compiled steps in JAX's persistent cache, $JAX_COMPILATION_CACHE_DIR or else "
    "<workdir>/jax_cache, so a resumed run skips compiling them.",
)  # fmt: skip

flags.mark_flags_as_required(["config", "workdir"])

_USAGE_ERROR = 2


class _QuietLibraries(logging.Filter):
    """Keeps the INFO chatter of the dataset libraries and absl out of the progress log
    (Orbax speaks through `t2s_jax.checkpointing`, which filters its logging itself)."""

    _NOISY = ("/tensorflow_datasets/", "/grain/", "/absl/")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(part in record.pathname for part in self._NOISY)


def _fail(message: str, exit_code: int, *, at_once: bool = False) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    if at_once:  # skips JAX's exit handler, whose shutdown barrier waits minutes for a lost process
        logging.shutdown()
        sys.stdout.flush()
        os._exit(exit_code)
    sys.exit(exit_code)


# ---------------------------------------------------------------------------- the command line


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value of --name=V or --name V in argv."""
    value = None
    for index, arg in enumerate(argv):
        if re.fullmatch(rf"--?{name}=.*", arg):
            value = arg.split("=", 1)[1]
        elif re.fullmatch(rf"--?{name}", arg) and index + 1 < len(argv):
            value = argv[index + 1]
    return value


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """The config of `--config=PATH[:ARGUMENT]`: `get_config(ARGUMENT)` of that file, unlocked.
    A file's refusal of its argument (an unknown method) is a `config.ConfigError`."""
    path, _, argument = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("t2s_run_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def _unknown_key(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """Why `config.<dotted>` names no field (with the valid keys of its section), or None."""
    node, walked = config, "config"
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return None  # a leaf's inside (a dataclass, a tuple index): ml_collections decides
        if part not in node:
            valid = sorted(node.keys())
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" (did you mean {walked}.{close[0]}?)" if close else ""
            return f"unknown key {walked}.{part}{hint}; valid keys of {walked}: {', '.join(valid)}"
        node, walked = node[part], f"{walked}.{part}"
    return None


# Config files merged into one file per host and benchmark, the method as its argument; the
# pointers go with the next release.
_RENAMED_CONFIGS = {
    "gta_cs_daformer_baseline.py": "gta_cs_daformer.py:daformer",
    "gta_cs_source_only.py": "gta_cs_daformer.py:source_only",
    "gta_cs_mic.py": "gta_cs_daformer.py:mic",
    "gta_cs_t2s_mic.py": "gta_cs_daformer.py:t2s_mic",
    "gta_cs_masktwins.py": "gta_cs_daformer.py:masktwins",
    "synthia_cs_daformer_baseline.py": "synthia_cs_daformer.py:daformer",
    "synthia_cs_mic.py": "synthia_cs_daformer.py:mic",
    "synthia_cs_t2s_mic.py": "synthia_cs_daformer.py:t2s_mic",
    "synthia_cs_masktwins.py": "synthia_cs_daformer.py:masktwins",
}


def _config_problem(argv: list[str]) -> str | None:
    """One line on a --config file or --config.* override that cannot work, or None."""
    spec = _flag_value(argv, "config")
    if spec is None:
        return None  # absl reports the missing required flag
    path = spec.partition(":")[0]
    folder, name = os.path.split(path)
    if name in _RENAMED_CONFIGS and not os.path.isfile(path):
        return f"config file {path} was renamed: use --config={os.path.join(folder, _RENAMED_CONFIGS[name])}"
    if not os.path.isfile(path):
        return f"config file {path} (--config) does not exist; the benchmark configs are in configs/, e.g. --config=configs/synthetic_demo.py"
    try:
        config = load_config_file(spec)
    except schema.ConfigError as error:
        return f"--config={spec}: {error}"
    for arg in argv:
        if match := re.fullmatch(r"--?(?:no)?config\.([\w.]+)(?:\[.*)?(?:=.*)?", arg):
            if problem := _unknown_key(config, match.group(1)):
                return problem
    return None


def _flag_problem(error: flags.Error, argv: list[str]) -> str:
    """One line for a flag absl could not parse; an override's names the key and what it may be."""
    message = str(error).splitlines()[0]
    match = re.match(r"flag --(?:no)?config\.([\w.]+)=(.*?): ", message)
    if match is None:
        return message
    key, value = match.groups()
    try:
        expected = schema.expected(load_config_file(_flag_value(argv, "config")), key)
    except (KeyError, AttributeError, TypeError):  # inside a leaf (a tuple index): absl's words
        return message
    return f"config.{key}={value} (--config.{key}): expected {expected}"


def _parse_flags(argv: list[str]) -> list[str]:
    if problem := _config_problem(argv[1:]):
        _fail(problem, _USAGE_ERROR)
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(_flag_problem(error, argv[1:]), _USAGE_ERROR)


def _pretrained_problem(config: ml_collections.ConfigDict, mode: str, pretrained: str) -> str | None:
    """One line on weights the command would read that are missing or unreadable, or None."""
    from t2s_jax.models import weights

    if mode == "eval" and pretrained:
        problem = weights.problem(pretrained, segmentor=True)
        return problem and f"--pretrained: {problem}"
    if mode == "train" and config.model.pretrained:
        problem = weights.problem(config.model.pretrained)
        return problem and f"config.model.pretrained: {problem}"
    return None


def _method_problem(config: ml_collections.ConfigDict, methods: tuple[str, ...]) -> str | None:
    method = [] if config.terms else [config.method]  # explicit terms name no preset
    for key, names in (("method", method), ("compare_methods", config.compare_methods)):
        unknown = [name for name in names if name not in methods]
        if unknown:
            return f"config.{key}: unknown method {unknown[0]!r}; expected one of {', '.join(methods)}"
    return None


def enable_compilation_cache(workdir: str) -> str:
    """Turns on JAX's persistent compilation cache (before anything compiles); returns its folder.

    An explicit `JAX_COMPILATION_CACHE_DIR` (e.g. one cache shared by several runs) wins over
    the run's own `<workdir>/jax_cache`. The cache key covers the program, the devices, the
    compiler options and the jax version, so a stale entry is never used.
    """
    import jax  # here: the command is checked before jax is imported

    cache_dir = jax.config.jax_compilation_cache_dir or os.path.join(workdir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Executables compiled in under a second (eager ops, tiny jits) cost more to read than to
    # compile; the steps and the state initialisation take longer, whatever their size. An
    # explicit JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS wins here too.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


# ---------------------------------------------------------------------------- main


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    run(_CONFIG.value, _WORKDIR.value, mode=_MODE.value, step=_STEP.value, pretrained=_PRETRAINED.value,
        compilation_cache=_COMPILATION_CACHE.value, distributed=distributed,
        distributed_timeout_s=_DISTRIBUTED_TIMEOUT.value)  # fmt: skip


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mode: str = "train",
    step: int | None = None,
    pretrained: str = "",
    compilation_cache: bool = True,
    distributed: tuple[str, int, int] = ("", 0, -1),
    distributed_timeout_s: int = 600,
) -> None:
    """What the command does once its flags are parsed (the tests call it with a loaded config).
    `distributed`: the coordinator address, process count and process id (defaults: detected);
    `distributed_timeout_s`: how long the processes wait for each other to connect."""
    if problems := schema.check(config):
        _fail("; ".join(problems), _USAGE_ERROR)
    if problem := control.workdir_problem(workdir, mode, pretrained):
        _fail(problem, _USAGE_ERROR)
    # Imported here, after the command is known to be sound: jax, flax and orbax take seconds.
    from t2s_jax import checkpointing, data, methods, parallel, workdir_lock
    from t2s_jax.models import weights
    from t2s_jax.training import comparison, eval_mode, loop

    problem = _method_problem(config, tuple(methods.PRESETS)) or _pretrained_problem(config, mode, pretrained)
    if problem:
        _fail(problem, _USAGE_ERROR)
    if mode == "train":
        try:
            control.prepare_workdir(workdir)
        except control.RunError as error:
            _fail(str(error), error.exit_code)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
            handler.addFilter(_QuietLibraries())
    if compilation_cache and (mode == "train" or os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        # An evaluation writes nothing into the run's folder: no cache there unless one is named.
        logging.info("compilation cache: %s", enable_compilation_cache(workdir))
    parallel.initialize_distributed(*distributed, timeout_s=distributed_timeout_s)
    try:
        with parallel.peer_errors():
            if mode == "eval" and pretrained:
                eval_mode.evaluate_checkpoint(config, workdir, pretrained=pretrained)
            elif mode == "eval":
                eval_mode.evaluate_workdir(config, workdir, step=step)
            elif config.compare_methods:
                comparison.train_methods(config, workdir)
            else:
                loop.train_and_evaluate(config, workdir)
    except parallel.PeerError as error:
        _fail(str(error), 1, at_once=True)
    except control.RunError as error:
        _fail(str(error), error.exit_code)
    except schema.ConfigError as error:  # a setting the data contradicts (read only now)
        _fail(str(error), _USAGE_ERROR)
    except (checkpointing.CheckpointError, workdir_lock.WorkdirBusyError, data.DamagedDataError,
            weights.WeightsError) as error:  # fmt: skip
        _fail(str(error), 1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
