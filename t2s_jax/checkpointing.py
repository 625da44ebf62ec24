"""Orbax checkpoints: the only module that imports orbax (its API still moves).

A run checkpoint holds everything needed to continue exactly: the train state
(student, teacher, optimizer, step, RNG), the data iterator's state and a checksum
manifest of both. We keep the last `keep` checkpoints plus the best one by mIoU.

Reliability rules (docs/reliability.md lists the faults and the tests that show them):
- Saves are synchronous: a failed save raises `CheckpointError` at once, in one line,
  and leaves no partial `*.orbax-checkpoint-tmp*` directory. The manifest (CRC32 of each
  array's host bytes and of the data state) is an item of the same Orbax save, so it is
  committed atomically with what it describes. Orbax has no checksum of its own: a byte
  flip in its zstd-compressed array data restores silently.
- A non-finite state is refused, so rotation never drops the last finite checkpoint.
- `restore` verifies every array it returns; a damaged step is reported in one paragraph
  and the next older one is tried. With several processes each verifies its copy and
  they agree on the verdict, so all restore the same step.
- Orbax speaks through this module: its own logging (INFO chatter, warnings and error
  tracebacks, also from its worker threads) is dropped; the full exception is logged at
  DEBUG. This is the one place that filters Orbax's logging.
"""

from __future__ import annotations

import gc
import glob
import json
import logging
import os
import shutil
import sys
import time
import zlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_STATE = "state"
_DATA = "data"
_CHECKSUMS = "checksums"
_MANIFEST_FORMAT = 1
_preservation = ocp.checkpoint_managers.preservation_policy


class CheckpointError(Exception):
    """A checkpoint could not be written or no usable one could be read; the message says
    which step, where and why, in one paragraph."""


class _Damaged(Exception):
    """One step cannot be restored or does not match its checksums (internal)."""


class RunCheckpointer:
    """Saves and restores run checkpoints under `<workdir>/checkpoints`.

    `read_only=True` (evaluation) never creates or changes a file or directory.
    Every process of a multi-process run constructs one and calls `save`/`restore`.
    """

    def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.read_only = read_only
        self._unfinished: list[str] = []  # glob patterns of failed saves' folders
        best_fn = lambda metrics: metrics["miou"]  # noqa: E731  (makes Orbax keep per-step metrics)
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0, best_fn=best_fn
            )
        else:
            _report_unfinished_saves(self.directory)
            policy = _preservation.AnyPreservationPolicy(
                [
                    _preservation.LatestN(n=keep),
                    _preservation.BestN(
                        get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False
                    ),
                ]
            )
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policy,
                best_fn=best_fn,
                create=True,
                cleanup_tmp_directories=True,  # what a killed save left behind
                # Synchronous: a failed save raises here, not a checkpoint interval later.
                enable_async_checkpointing=False,
            )
        handlers = {
            _STATE: ocp.PyTreeCheckpointHandler(),
            _DATA: ocp.JsonCheckpointHandler(),
            _CHECKSUMS: ocp.JsonCheckpointHandler(),
        }
        self._manager, cause = _call_orbax(
            ocp.CheckpointManager, self.directory, item_handlers=handlers, options=options
        )
        if cause is not None:
            raise CheckpointError(f"cannot open checkpoints in {self.directory}: {cause}")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # ------------------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        metrics: dict[str, float] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Writes `state` and the data iterator's `data_state` as `step`, with their checksums.

        Returns False when the step is not due (Orbax's save decision, as before);
        `metrics` (with 'miou') ranks the best checkpoint. Raises `CheckpointError` for a
        non-finite state or a failed write.
        """
        path = self.step_path(step)
        if self.read_only:
            raise CheckpointError(f"cannot save step {step}: {self.directory} was opened read-only")
        if data_state is None:
            raise ValueError("RunCheckpointer.save needs the data iterator's state (data_state)")
        if not force and not self._manager.should_save(step):
            return False
        # One pass over the host bytes that are checksummed also checks them for NaN/Inf.
        arrays, non_finite = {}, []
        for name, value in _host_leaves(state):
            arrays[name] = _array_entry(value)
            if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
                non_finite.append(name)
        if non_finite:
            raise CheckpointError(
                f"refusing to save step {step} to {path}: non-finite values in "
                f"{', '.join(non_finite[:5])}{' ...' if len(non_finite) > 5 else ''}"
            )
        data_json = _json_safe(data_state)
        checksums = {"format": _MANIFEST_FORMAT, "arrays": arrays, "data_crc32": _json_crc32(data_json)}
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.PyTreeSave(state),
                _DATA: ocp.args.JsonSave(data_json),
                _CHECKSUMS: ocp.args.JsonSave(checksums),
            }
        )
        saved, cause = _call_orbax(self._manager.save, step, args=args, metrics=metrics, force=force)
        if cause is not None:
            self._remove_unfinished(step)
            raise CheckpointError(f"could not save checkpoint step {step} to {path}: {cause}")
        return saved

    def _remove_unfinished(self, step: int) -> None:
        if jax.process_index() == 0:
            self._unfinished.append(glob.escape(self.step_path(step)) + ".orbax-checkpoint-tmp*")
            _remove_until_gone(self._unfinished[-1])
        _call_orbax(self._manager.reload)

    # --------------------------------------------------------------------------- restore

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, data_state, step) of `step`, or of the newest good step when None.

        Restores onto the shapes, dtypes and shardings of `abstract_state` and verifies
        every array and the data state against the step's checksums.
        """

        def load(step, checksums):
            state = self._restore_arrays(step, checksums, abstract_state, partial=False)
            return state, self._restore_data(step, checksums)

        (state, data_state), step = self._restore_verified(load, abstract_state, step, partial=False)
        return state, data_state, step

    def restore_model(
        self, abstract_params: Any, abstract_batch_stats: Any, step: int | None = None
    ) -> tuple[tuple[Any, Any], int]:
        """((params, batch_stats), step) of the student, for evaluation: an Orbax partial
        restore of those two subtrees (the optimizer state and teacher are never read),
        verified and with the same fall-back as `restore`."""
        abstract = {"params": abstract_params, "batch_stats": abstract_batch_stats}

        def load(step, checksums):
            restored = self._restore_arrays(step, checksums, abstract, partial=True)
            return restored["params"], restored["batch_stats"]

        return self._restore_verified(load, abstract, step, partial=True)

    def _restore_verified(self, load, abstract: Any, step: int | None, *, partial: bool):
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available: {steps}"
            )
        candidates = [step] if step is not None else steps[::-1]
        failures = []
        for candidate in candidates:
            path = self.step_path(candidate)
            try:
                checksums = self._checksums(candidate)
                self._check_fits(candidate, checksums, abstract, partial)
                result, cause = load(candidate, checksums), None
            except _Damaged as damage:
                result, cause = None, str(damage)
            if not _all_processes_agree(cause is None):
                cause = cause or "another process could not restore or verify it"
            if cause is None:
                self._set_aside(failures)
                logging.info("restored %s of checkpoint %s", "the student" if partial else "the run", path)
                return result, candidate
            failures.append((candidate, cause))
            if step is None and candidate != candidates[-1]:
                logging.warning(
                    "checkpoint step %d (%s) is damaged: %s; trying step %d",
                    candidate, path, cause, candidates[len(failures)],
                )
        if step is not None:
            raise CheckpointError(
                f"checkpoint step {step} ({self.step_path(step)}) is damaged: {failures[0][1]}"
            )
        listing = "\n".join(f"  step {s} ({self.step_path(s)}): {cause}" for s, cause in failures)
        raise CheckpointError(f"no usable checkpoint in {self.directory}; tried:\n{listing}")

    def _checksums(self, step: int) -> dict:
        if not os.path.isdir(os.path.join(self.step_path(step), _CHECKSUMS)):
            raise _Damaged("its checksum manifest is missing (written before manifests, or deleted)")
        checksums = self._restore_item(step, _CHECKSUMS, ocp.args.JsonRestore(), "checksum manifest")
        if not _well_formed(checksums):
            raise _Damaged(f"its checksum manifest is malformed (not format {_MANIFEST_FORMAT})")
        return checksums

    def _check_fits(self, step: int, checksums: dict, abstract: Any, partial: bool) -> None:
        """A state tree that differs from the run's (another method or model config) is not
        damage; every step would fail the same way, so it is an error at once."""
        arrays = checksums["arrays"]
        wanted = {name: leaf for name, leaf in _named_leaves(abstract)}
        missing = sorted(set(wanted) - set(arrays))
        different = sorted(
            name for name in set(wanted) & set(arrays)
            if [str(np.dtype(wanted[name].dtype)), list(wanted[name].shape)] != arrays[name][1:]
        )
        # A full restore must take everything: extra saved arrays also mean another tree.
        extra = [] if partial else sorted(set(arrays) - set(wanted))
        if missing or different or extra:
            details = "; ".join(
                f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for label, names in (
                    ("not in the checkpoint", missing),
                    ("other shape or dtype", different),
                    ("not in this run's state", extra),
                )
                if names
            )
            raise CheckpointError(
                f"checkpoint step {step} ({self.step_path(step)}) holds another state tree "
                f"than this run builds ({details}); was it written with another method or "
                "model config?"
            )

    def _restore_arrays(self, step: int, checksums: dict, abstract: Any, *, partial: bool) -> Any:
        metadata, cause = _call_orbax(self._manager.item_metadata, step)
        if cause is not None:
            raise _Damaged(f"its state metadata is unreadable: {cause}")
        if metadata[_STATE] is None:
            raise _Damaged(f"its state metadata is missing ({os.path.join(_STATE, '_METADATA')})")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        tree = self._restore_item(
            step, _STATE,
            ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=partial),
            "state",
        )
        arrays = checksums["arrays"]
        for name, value in _host_leaves(tree):
            read, saved = _crc32(value), arrays[name][0]
            if read != saved:
                raise _Damaged(
                    f"array {name} does not match its checksum (CRC32 {read:#010x} read, "
                    f"{saved:#010x} saved): its data file is corrupted"
                )
        return tree

    def _restore_data(self, step: int, checksums: dict) -> dict:
        if not os.path.isdir(os.path.join(self.step_path(step), _DATA)):
            raise _Damaged("its data-iterator item is missing (resuming would restart the data at batch 0)")
        data_json = self._restore_item(step, _DATA, ocp.args.JsonRestore(), "data-iterator item")
        if _json_crc32(data_json) != checksums["data_crc32"]:
            raise _Damaged("its data-iterator item does not match its checksum")
        return _from_json_safe(data_json)

    def _restore_item(self, step: int, item: str, args: Any, label: str) -> Any:
        restored, cause = _call_orbax(self._manager.restore, step, args=ocp.args.Composite(**{item: args}))
        if cause is not None:
            raise _Damaged(f"its {label} is unreadable: {cause}")
        return restored[item]

    def _set_aside(self, failures: list[tuple[int, str]]) -> None:
        """Moves damaged steps newer than the restored one out of the way: the resumed run
        saves those step numbers again (Orbax would skip or refuse them)."""
        if self.read_only or not failures:
            return
        if jax.process_index() == 0:
            aside_root = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
            os.makedirs(aside_root, exist_ok=True)
            for step, _ in failures:
                target = os.path.join(aside_root, str(step))
                suffix = 1
                while os.path.exists(target):
                    target, suffix = os.path.join(aside_root, f"{step}.{suffix}"), suffix + 1
                try:
                    os.rename(self.step_path(step), target)
                except OSError as error:
                    raise CheckpointError(
                        f"cannot move damaged checkpoint step {step} ({self.step_path(step)}) "
                        f"out of the way of the resumed run: {error}; move or delete it by hand"
                    ) from None
                logging.warning("moved damaged checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("t2s_jax checkpoints set aside")
        _call_orbax(self._manager.reload)

    def close(self) -> None:
        for pattern in self._unfinished:  # what the failed saves' abandoned writes made since
            _remove_until_gone(pattern)
        _, cause = _call_orbax(self._manager.close)
        if cause is not None:
            raise CheckpointError(f"closing checkpoints in {self.directory}: {cause}")


# -------------------------------------------------------------------------------- helpers


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    by_dtype: dict[Any, list[jax.Array]] = {}
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            by_dtype.setdefault(x.dtype, []).append(jnp.ravel(x))
    # One reduction per dtype over the concatenated leaves: a reduction per leaf takes
    # minutes to compile on CPU for the ~600 arrays of a train state.
    checks = [jnp.isfinite(jnp.concatenate(leaves)).all() for leaves in by_dtype.values()]
    return jnp.stack(checks).all() if checks else jnp.asarray(True)


def all_finite(tree: Any) -> bool:
    """True when no floating-point array of `tree` holds a NaN or Inf (one jitted reduction,
    for the loop to call before `save`; `save` checks the host bytes it writes itself)."""
    return bool(_to_host(_all_finite(tree)))


def _leaf_name(path) -> str:
    parts = (getattr(key, "name", getattr(key, "key", getattr(key, "idx", key))) for key in path)
    return "/".join(str(part) for part in parts)


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(_leaf_name(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _to_host(x: Any) -> np.ndarray:
    """Host bytes of one array: the local copy of a replicated one (the train state is
    replicated, so every process checksums the same bytes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise CheckpointError(
                "checkpoint checksums need arrays replicated or local to each process; "
                f"got one sharded across processes ({x.sharding})"
            )
        x = x.addressable_data(0)
    return np.asarray(x)


def _host_leaves(tree: Any) -> Iterator[tuple[str, np.ndarray]]:
    for name, leaf in _named_leaves(tree):
        yield name, _to_host(leaf)


def _crc32(value: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


def _array_entry(value: np.ndarray) -> list:
    return [_crc32(value), str(value.dtype), list(value.shape)]


def _well_formed(checksums: Any) -> bool:
    return (
        isinstance(checksums, dict)
        and checksums.get("format") == _MANIFEST_FORMAT
        and isinstance(checksums.get("data_crc32"), int)
        and isinstance(checksums.get("arrays"), dict)
        and all(
            isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)
            for entry in checksums["arrays"].values()
        )
    )


def _json_crc32(data_json: Any) -> int:
    return zlib.crc32(json.dumps(data_json, sort_keys=True).encode())


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _innermost_message(error: BaseException, handling: BaseException | None = None) -> str:
    """The deepest cause in `error`'s chain, on one line (TensorStore puts the root cause
    at the end of long messages, so a long one keeps its head and tail). The chain stops
    before `handling`, the error the caller was handling (a save in a `finally`): that one
    is not this failure's cause."""
    chain, seen = [error], {id(error)}
    if handling is not None:
        seen.add(id(handling))
    while True:
        current = chain[-1]
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            nxt = current.exceptions[0]
        else:
            nxt = current.__cause__ or current.__context__
        if nxt is None or id(nxt) in seen:
            break
        chain.append(nxt)
        seen.add(id(nxt))
    innermost = next((e for e in reversed(chain) if str(e).strip()), chain[-1])
    message = " ".join(str(innermost).split())
    if len(message) > 600:
        message = f"{message[:200]} ... {message[-380:]}"
    return f"{type(innermost).__name__}: {message}"


_ORBAX_DIR = f"{os.sep}orbax{os.sep}"


class _DropOrbaxLogs(logging.Filter):
    """Orbax logs its progress at INFO and each failure (with tracebacks, also from its
    worker threads after the call returned) before raising it; this module raises it as
    one CheckpointError. asyncio logs the abandoned Orbax tasks of a failed call when they
    are collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            tb = record.exc_info[2] if record.exc_info else None
            return not (_ORBAX_DIR in record.getMessage() or _through_orbax(tb))
        return _ORBAX_DIR not in record.pathname


_DROP_ORBAX_LOGS = _DropOrbaxLogs()


def _through_orbax(tb: Any) -> bool:
    while tb is not None:
        if _ORBAX_DIR in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _orbax_leftover(unraisable: Any) -> bool:
    """An exception of work Orbax abandoned when another part failed: raised in its
    coroutines, or by TensorStore completing a read or write onto Orbax's closed event loop."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return True
    return _through_orbax(unraisable.exc_traceback)


def _quiet_orbax() -> None:
    """Orbax speaks through this module: its warnings and errors are not logged, and the
    complaints of its abandoned work (dozens of multi-line TensorStore specs, whenever
    they finish or are collected) are dropped. Idempotent; re-installs a replaced hook."""
    for logger in (logging.getLogger("absl"), logging.getLogger("asyncio")):
        if _DROP_ORBAX_LOGS not in logger.filters:
            logger.addFilter(_DROP_ORBAX_LOGS)
    if getattr(sys.unraisablehook, "drops_orbax_leftovers", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _orbax_leftover(unraisable):
            previous(unraisable)

    hook.drops_orbax_leftovers = True
    sys.unraisablehook = hook


def _call_orbax(fn, *args, **kwargs) -> tuple[Any, str | None]:
    """(fn's result, None), or (None, the one-line cause) when it raised."""
    _quiet_orbax()
    handling = sys.exception()
    try:
        return fn(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001  (OSError, or Orbax/TensorStore/json wrapping it)
        logging.debug("orbax call failed", exc_info=True)
        cause = _innermost_message(error, handling)
    gc.collect()  # the abandoned coroutines go now, not in the middle of a later step
    return None, cause


def _remove_until_gone(pattern: str, quiet_s: float = 0.5, timeout_s: float = 10.0) -> None:
    """Removes the folders matching `pattern` until none comes back for `quiet_s`: TensorStore
    still completes writes that a failed save abandoned, recreating their folders."""
    deadline, quiet_since = time.monotonic() + timeout_s, time.monotonic()
    while time.monotonic() < deadline:
        found = glob.glob(pattern)
        for folder in found:
            shutil.rmtree(folder, ignore_errors=True)
        if found:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        time.sleep(0.05)


def _report_unfinished_saves(directory: str) -> None:
    if jax.process_index() != 0:
        return
    unfinished = sorted(glob.glob(os.path.join(glob.escape(directory), "*.orbax-checkpoint-tmp*")))
    if unfinished:
        logging.warning(
            "removing %d unfinished checkpoint save(s) of a stopped process: %s",
            len(unfinished), ", ".join(unfinished),
        )


# ----------------------------------------------------------------------- standalone trees


def save_tree(directory: str, tree: Any) -> None:
    """Writes one pytree (e.g. converted pretrained parameters) as a standalone checkpoint."""
    _quiet_orbax()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), tree, force=True)
    checkpointer.wait_until_finished()


def restore_tree(directory: str, abstract_tree: Any | None = None) -> Any:
    """Reads a tree written by `save_tree`, onto `abstract_tree`'s shapes and shardings if given."""
    _quiet_orbax()
    return ocp.StandardCheckpointer().restore(os.path.abspath(directory), abstract_tree)


def abstract_like(tree: Any) -> Any:
    """The shape/dtype/sharding skeleton of `tree`, the target of a restore."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _json_safe(data_state: dict) -> dict:
    # grain iterator states hold bytes on some versions; JSON needs text.
    return json.loads(json.dumps(data_state, default=lambda b: {"__bytes__": b.decode("latin-1")}))


def _from_json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__bytes__"}:
            return value["__bytes__"].encode("latin-1")
        return {key: _from_json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json_safe(item) for item in value]
    return value
