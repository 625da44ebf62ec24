"""What every process of a run agrees on: the step at which a stop signal stops it, and
whether it holds its workdir.

Why not Orbax's preemption helper: `CheckpointManager.reached_preemption` is the same
`multihost_utils.reached_preemption_sync_point` call used here, and only exists with
several processes; one process needs the Python handler anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from t2s_jax.training.control import RunError
from t2s_jax.workdir_lock import WorkdirBusyError, WorkdirLock


class StopSignals:
    """SIGTERM / SIGINT ask the run to checkpoint and stop at a step boundary, the SAME step
    on every process.

    One process: Python handlers set a flag. Several: JAX's preemption service (started by
    `jax.distributed.initialize`) catches SIGTERM on any process and the processes agree on
    a sync point, at which `reached()` is true on all of them; SIGINT is turned into a
    SIGTERM to this process so Ctrl-C takes the same path. `reached()` must be called once
    per step by every process (it counts calls, so a comparison's runs share one sequence).
    """

    def __init__(self):
        self.signum: int | None = None
        self._calls = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        handled = [signal.SIGINT] if jax.process_count() > 1 else [signal.SIGINT, signal.SIGTERM]
        for signum in handled:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        logging.warning("signal %d: checkpointing and stopping at the next step boundary", signum)
        self.signum = signum
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def reached(self) -> bool:
        self._calls += 1
        if jax.process_count() == 1:
            return self.signum is not None
        if multihost_utils.reached_preemption_sync_point(self._calls):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False


_active_stop_signals: StopSignals | None = None


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """The process's stop handlers, installed by the outermost caller (a comparison or one run)."""
    global _active_stop_signals
    if _active_stop_signals is not None:
        yield _active_stop_signals
        return
    _active_stop_signals = StopSignals()
    _active_stop_signals.install()
    try:
        yield _active_stop_signals
    finally:
        _active_stop_signals.restore()
        _active_stop_signals = None


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """One run per workdir: process 0 holds its `WorkdirLock`; every process learns whether
    it got it, so all of them stop when another run is using the workdir."""
    with contextlib.ExitStack() as stack:
        error: Exception | None = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(WorkdirLock(workdir))
            except WorkdirBusyError as busy:
                error = busy
            except OSError as failure:  # e.g. a read-only filesystem, even for root
                error = RunError(f"cannot write the lock file in --workdir={workdir}: {failure.strerror}")
        if jax.process_count() > 1:
            locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not locked and error is None:
                error = RunError(f"process 0 could not lock --workdir={workdir}; its log says why")
        if error is not None:
            raise error
        yield
