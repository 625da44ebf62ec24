"""One run per --workdir: a lock file that refuses a second run on the same directory.

Process 0 of a run holds `WorkdirLock(workdir)` for the whole run. The lock file
`<workdir>/run.lock` records the holder's host, pid and start time, and, to tell a live
holder from a pid reused after a restart, the machine's boot id and the process's start
time in the kernel's clock (Linux). It is created atomically (O_CREAT | O_EXCL), and while
held its modification time is refreshed every `HEARTBEAT_S` seconds by a daemon thread. A
lock is stale, and is taken over with a warning, when
- its holder ran on this host and that pid is no longer alive, or is now another process
  (a different start time or boot id: the machine or container restarted and reused the
  pid, possibly for this very run), or
- its holder ran on another host (whose processes we cannot see) and the lock has not
  been refreshed for `STALE_AFTER_S` seconds: that run was killed or lost its machine.
`take_over=True` (the user's override, after checking that the other run is gone) takes
any lock, with a warning. Deleting the lock file by hand does the same.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time

LOCK_NAME = "run.lock"
HEARTBEAT_S = 60.0  # how often the holder refreshes the lock's modification time
STALE_AFTER_S = 600.0  # a lock from another host not refreshed for this long is abandoned


class WorkdirBusyError(RuntimeError):
    """Another live run holds the workdir."""


class WorkdirLock:
    """Context manager: `with WorkdirLock(workdir): ...train...`; released on exit and on
    exceptions. Raises `WorkdirBusyError` when another live run holds `workdir`."""

    def __init__(self, workdir: str, *, take_over: bool = False):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self.take_over = take_over
        self._record: bytes | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        record = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "boot_id": _boot_id(),
                "process_start": _process_start(os.getpid()),
            }
        ).encode()
        for _ in range(3):  # a take-over can race another process's; then look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale_or_raise()
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            self._record = record
            self._stop.clear()
            self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
            self._heartbeat.start()
            return
        raise WorkdirBusyError(
            f"{self.workdir}: another process keeps taking {self.path}; is a second run starting?"
        )

    def release(self) -> None:
        if self._record is None:
            return
        self._stop.set()
        self._heartbeat.join()
        try:
            with open(self.path, "rb") as f:
                still_ours = f.read() == self._record
            if still_ours:
                os.remove(self.path)
            else:
                logging.warning("%s was taken over by another run; leaving it in place", self.path)
        except FileNotFoundError:
            logging.warning("%s was removed while this run held it", self.path)
        self._record = None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as error:
                logging.warning("cannot refresh %s: %s", self.path, error)

    def _clear_stale_or_raise(self) -> None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
            age_s = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return  # released meanwhile
        holder = _parse(raw)
        stale = _stale_reason(holder, age_s)
        if stale is None and not self.take_over:
            raise WorkdirBusyError(_busy_message(self.workdir, self.path, holder, age_s))
        why = stale or "take_over was requested"
        logging.warning("taking over %s (%s; %s)", self.path, _describe(holder), why)
        try:
            with open(self.path, "rb") as f:
                if f.read() != raw:
                    return  # someone else took it over meanwhile: look again
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _parse(raw: bytes) -> dict | None:
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and {"host", "pid", "started"} <= set(holder) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _boot_id() -> str | None:
    """This boot of the machine (Linux); None where the kernel does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None
    where unknown. With the boot id it names one process: a reused pid starts at another time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields_after_name = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces
    except OSError:
        return None
    return int(fields_after_name[19])  # field 22; fields_after_name starts at field 3


def _same_host_stale_reason(holder: dict) -> str | None:
    pid = int(holder["pid"])
    if not _pid_alive(pid):
        return f"pid {pid} is no longer running"
    # Locks written before boot ids and start times were recorded fall back to the pid.
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return f"it was written before this machine restarted (boot id {holder['boot_id']}); pid {pid} is another process now"
    start = holder.get("process_start")
    if start is not None and (now := _process_start(pid)) is not None and now != start:
        who = "this run" if pid == os.getpid() else "another process"
        return f"pid {pid} is {who} now (started at tick {now}, the holder at tick {start}): a restart reused the pid"
    return None


def _stale_reason(holder: dict | None, age_s: float) -> str | None:
    """Why the lock is abandoned, or None while its holder may be alive."""
    if holder is None:  # being written this instant, or damaged
        return f"unreadable and not refreshed for {age_s:.0f} s" if age_s > STALE_AFTER_S else None
    if holder["host"] == socket.gethostname():
        return _same_host_stale_reason(holder)
    if age_s > STALE_AFTER_S:
        return f"not refreshed for {age_s:.0f} s (> {STALE_AFTER_S:.0f} s)"
    return None


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "holder unknown: the lock file is unreadable"
    return f"pid {holder['pid']} on host {holder['host']} since {holder['started']}"


def _busy_message(workdir: str, path: str, holder: dict | None, age_s: float) -> str:
    if holder is None:
        return (
            f"{workdir} is locked by {path}, which is unreadable (refreshed {age_s:.0f} s ago); "
            "if no run uses this workdir, delete that file"
        )
    message = f"{workdir} is in use by {_describe(holder)}; stop it or choose another --workdir"
    if holder["host"] != socket.gethostname():
        message += (
            f" (its lock was refreshed {age_s:.0f} s ago; it counts as abandoned after "
            f"{STALE_AFTER_S:.0f} s without refresh, or delete {path} if that run is gone)"
        )
    return message
