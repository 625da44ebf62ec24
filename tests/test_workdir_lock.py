"""One run per workdir: refusal, stale take-over, release, heartbeat."""

import json
import logging
import os
import socket
import subprocess
import time

import pytest

from t2s_jax import workdir_lock
from t2s_jax.workdir_lock import WorkdirBusyError, WorkdirLock


def _write_lock(workdir, host, pid, age_s=0.0, **identity):
    path = os.path.join(str(workdir), workdir_lock.LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "started": "2024-05-01T10:00:00+00:00", **identity}, f)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_second_holder_refused_with_who_and_since(tmp_path):
    with WorkdirLock(str(tmp_path)) as lock:
        record = json.load(open(lock.path))
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["boot_id"] == workdir_lock._boot_id() and record["process_start"] > 0
        with pytest.raises(WorkdirBusyError) as error:
            WorkdirLock(str(tmp_path)).acquire()
        message = str(error.value)
        assert "\n" not in message
        expected = (str(tmp_path), f"pid {os.getpid()}", socket.gethostname(), record["started"], "another --workdir")
        for needle in expected:
            assert needle in message
    assert not os.path.exists(lock.path)


def test_released_on_exception(tmp_path):
    with pytest.raises(KeyError):
        with WorkdirLock(str(tmp_path)) as lock:
            raise KeyError("boom")
    assert not os.path.exists(lock.path)
    with WorkdirLock(str(tmp_path)):
        pass


def test_stale_lock_of_dead_pid_is_taken_over(tmp_path, caplog):
    pid = _dead_pid()
    _write_lock(tmp_path, socket.gethostname(), pid)
    with caplog.at_level(logging.WARNING), WorkdirLock(str(tmp_path)) as lock:
        assert json.load(open(lock.path))["pid"] == os.getpid()
    assert f"pid {pid} is no longer running" in caplog.text


def test_lock_of_a_reused_pid_is_taken_over(tmp_path, caplog):
    """A container restart reuses pids: the earlier run's lock may name this very run's pid,
    or another live process's; its start time or boot id tells them apart."""
    host, me = socket.gethostname(), os.getpid()
    boot_id, my_start = workdir_lock._boot_id(), workdir_lock._process_start(me)
    _write_lock(tmp_path, host, me, boot_id=boot_id, process_start=my_start)
    with pytest.raises(WorkdirBusyError, match=f"in use by pid {me}"):  # the same process: live
        WorkdirLock(str(tmp_path)).acquire()
    with caplog.at_level(logging.WARNING):
        _write_lock(tmp_path, host, me, boot_id=boot_id, process_start=my_start - 1)
        with WorkdirLock(str(tmp_path)):
            pass
        assert f"pid {me} is this run now" in caplog.text
        with subprocess.Popen(["sleep", "30"]) as other:
            start = workdir_lock._process_start(other.pid)
            _write_lock(tmp_path, host, other.pid, boot_id=boot_id, process_start=start)
            with pytest.raises(WorkdirBusyError, match=f"in use by pid {other.pid}"):
                WorkdirLock(str(tmp_path)).acquire()
            _write_lock(tmp_path, host, other.pid, boot_id="another-boot", process_start=start)
            with WorkdirLock(str(tmp_path)):
                pass
            other.kill()
        assert "before this machine restarted (boot id another-boot)" in caplog.text
    assert len([line for line in caplog.text.splitlines() if "taking over" in line]) == 2


def test_other_host_lock_live_until_not_refreshed(tmp_path, caplog):
    path = _write_lock(tmp_path, "other-host", 1234, age_s=30)
    with pytest.raises(WorkdirBusyError, match="pid 1234 on host other-host since 2024-05-01"):
        WorkdirLock(str(tmp_path)).acquire()
    with caplog.at_level(logging.WARNING), WorkdirLock(str(tmp_path), take_over=True):
        pass
    assert "take_over was requested" in caplog.text
    _write_lock(tmp_path, "other-host", 1234, age_s=workdir_lock.STALE_AFTER_S + 5)
    with WorkdirLock(str(tmp_path)):
        assert json.load(open(path))["host"] == socket.gethostname()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.02)
    with WorkdirLock(str(tmp_path)) as lock:
        os.utime(lock.path, (0, 0))
        deadline = time.time() + 10
        while os.stat(lock.path).st_mtime < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - os.stat(lock.path).st_mtime < 10


def test_unreadable_lock_is_busy_until_old(tmp_path):
    path = os.path.join(str(tmp_path), workdir_lock.LOCK_NAME)
    open(path, "w").close()
    with pytest.raises(WorkdirBusyError, match="unreadable.*delete that file"):
        WorkdirLock(str(tmp_path)).acquire()
    os.utime(path, (0, 0))
    with WorkdirLock(str(tmp_path)):
        pass
