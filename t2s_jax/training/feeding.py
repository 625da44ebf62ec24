"""The run's data: its datasets found (or prepared) and checked, training batches fed to the mesh.

Why not grain's own iterator checkpoint handler: it writes one file per process outside the
run's checksum manifest; the iterator's state (a position, the same on every process) is
saved instead as a JSON item of the same Orbax save as the train state, checksummed with
it (`t2s_jax.checkpointing`), with `get_state` / `set_state` of grain's iterator.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import jax
import ml_collections

from t2s_jax import data, parallel
from t2s_jax.training.control import RunError


def check_datasets(config: ml_collections.ConfigDict, *, eval_only: bool) -> data.ClassList:
    """Prepares (synthetic) or finds the run's datasets; their class lists must match the
    model. Returns the eval dataset's classes."""
    names = [config.data.eval_dataset]
    if not eval_only:
        names = [config.data.source, *([config.data.target] if config.data.target else []), *names]
    try:
        for name in names:
            data.ensure_prepared(name, config.data.data_dir)
        return data.check_classes(config, training=not eval_only)
    except (FileNotFoundError, ValueError) as error:
        raise RunError(str(error)) from None


class BatchFeeder:
    """Training batches on the mesh, one step ahead.

    A background thread runs the host pipeline (grain: decoding, crops) into a queue; the
    calling thread places each batch on the mesh. Every JAX call, including the
    multi-process assembly of global arrays, stays on the thread that runs the steps
    (device transfers from a second thread racing the main thread's collectives are a
    source of crashes). Each batch travels with the data iterator state after it, so a
    checkpoint records exactly the batches consumed by the steps, not the ones read ahead.
    """

    def __init__(self, iterator, mesh: jax.sharding.Mesh, depth: int):
        self._iterator = iterator
        self._mesh = mesh
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._ahead: tuple[dict, Any] | None = None
        self.consumed_state = iterator.get_state()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _fill(self):
        try:
            while not self._stop.is_set():
                item = (next(self._iterator), self._iterator.get_state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # surfaced in the training thread
            self._queue.put(error)

    def _place(self) -> tuple[dict, Any]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        host_batch, state_after = item
        return parallel.global_batch(host_batch, self._mesh), state_after

    def next(self) -> dict[str, jax.Array]:
        """The batch of the next step; `consumed_state` then includes it."""
        batch, self.consumed_state = self._ahead or self._place()
        self._ahead = None
        return batch

    def place_next(self) -> None:
        """Transfers the following batch now (call it after dispatching a step: it overlaps)."""
        self._ahead = self._place()

    def close(self):
        self._stop.set()
