"""What stops a run, and the one check of a --workdir.

Imports nothing heavy itself: `t2s_jax.main` checks the command with it before anything is built.
"""

from __future__ import annotations

import os


class RunError(Exception):
    """A run cannot start or go on. The message says why and what to do, in one line or
    one short paragraph; `t2s_jax.main` prints it without a traceback and exits with
    `exit_code`."""

    exit_code = 1


class NonFiniteError(RunError):
    """A loss term, the gradient norm or the model state became NaN/Inf."""


class RunStopped(RunError):
    """A stop signal: the run saved a checkpoint and stopped; a rerun resumes it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by this signal"


class CommandError(RunError):
    """The command itself is wrong (a flag's value); nothing was created."""

    exit_code = 2


def workdir_problem(workdir: str, mode: str = "train", pretrained: str = "") -> str | None:
    """Why `workdir` cannot serve `mode` ('train' or 'eval'), without creating anything; or None."""
    if not workdir:
        return "--workdir is empty; pass the run directory, e.g. --workdir=runs/my_run"
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        return f"--workdir={workdir} is a file, not a directory; choose another --workdir"
    if mode == "eval":
        if not os.path.isdir(workdir) and not pretrained:
            return f"--workdir={workdir} does not exist; pass the folder of a training run"
        return None
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot create --workdir={workdir}: {existing} is a file; choose another --workdir"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create --workdir={workdir}: {existing} is not writable; choose another --workdir"
    return None


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` for training, or raises CommandError saying in one line why it cannot."""
    if problem := workdir_problem(workdir):
        raise CommandError(problem)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise CommandError(
            f"cannot create --workdir={workdir}: {error.strerror} ({error.filename}); "
            "choose a directory you can write"
        ) from None


def disk_error(what: str, path: str, error: OSError, rerun: str) -> RunError:
    """The one line for a file of the run that could not be written (a full disk, a file-size
    limit, a read-only folder): which file, the system's reason, what to do."""
    return RunError(f"cannot write {what} {path}: {error.strerror or error}; free space (or fix the folder) and {rerun}")
