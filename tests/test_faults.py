"""Faults a user meets, injected into the tiny demo through `python -m t2s_jax.main` (docs/reliability.md).

One prepared dataset and one compilation cache serve every run of the session; the runs
that build on each other (a comparison stopped, resumed, rerun, evaluated) share a fixture.
"""

import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from t2s_jax import data, reporting

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

# One xdist worker runs the whole module: its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("faults")

TIMEOUT_S = 600
# The 64x128 synthetic pair: a quarter of the demo's pixels to generate and read.
SMALL_DATA = {
    "data.source": "synthetic_city/source_64x128",
    "data.target": "synthetic_city/target_64x128",
    "data.eval_dataset": "synthetic_city/target_64x128",
    "data.source_resize_hw": (64, 128),
    "data.target_resize_hw": (64, 128),
}


@pytest.fixture(scope="session")
def session_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data_dir = str(root / "data")
    for name in ("source_64x128", "target_64x128"):
        data.ensure_prepared(f"synthetic_city/{name}", data_dir)
    return {"root": root, "data": data_dir, "cache": str(root / "jax_cache")}


def _env(session_dirs, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=tiny.xla_flags(devices))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tiny.REPO, os.environ.get("PYTHONPATH")]))
    env["JAX_COMPILATION_CACHE_DIR"] = session_dirs["cache"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _flags(session_dirs, method="source_only", **overrides):
    return tiny.as_flags(session_dirs["data"], method, **{**SMALL_DATA, **overrides})


def _start(session_dirs, workdir, *extra, devices=1, method="source_only", overrides=None, env=None, preexec_fn=None):
    command = [sys.executable, "-m", "t2s_jax.main", f"--workdir={workdir}",
               *_flags(session_dirs, method, **(overrides or {})), *extra]  # fmt: skip
    return subprocess.Popen(
        command, cwd=tiny.REPO, env={**_env(session_dirs, devices), **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn,
    )  # fmt: skip


def _run(session_dirs, workdir, *extra, **kwargs):
    process = _start(session_dirs, workdir, *extra, **kwargs)
    output, _ = process.communicate(timeout=TIMEOUT_S)
    return process.returncode, output


def _read_until(process, needle, lines):
    """Reads `process` output into `lines` until a line contains `needle` (True) or it ends (False)."""
    for line in process.stdout:
        lines.append(line)
        if needle in line:
            return True
    return False


def _finish(process, lines):
    output, _ = process.communicate(timeout=TIMEOUT_S)
    return process.returncode, "".join(lines) + output


def _error_lines(output):
    return [line for line in output.splitlines() if line.startswith("error: ")]


def _records(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, reporting.METRICS_FILE))]


def _checkpoint_steps(run_dir):
    folder = os.path.join(run_dir, "checkpoints")
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) if os.path.isdir(folder) else []


def _files(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)  # fmt: skip


# ---------------------------------------------------------------------------- the command line


def test_command_mistakes_are_one_line_and_create_nothing(session_dirs, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = {  # name: (extra flags, workdir, expected in the error line)
        "misspelt key": (["--config.pull.temprature=0.1"], tmp_path / "w1",
                         "unknown key config.pull.temprature (did you mean config.pull.temperature?); "
                         "valid keys of config.pull: class_balanced_queries,"),
        "unrelated key": (["--config.zzz=1"], tmp_path / "w2", "unknown key config.zzz; valid keys of config: compare_methods,"),
        "missing config": ([f"--config={tmp_path}/nope.py"], tmp_path / "w3", f"config file {tmp_path}/nope.py (--config) does not exist"),
        "unknown method": (["--config.method=t2ss"], tmp_path / "w4", "config.method: unknown method 't2ss'; expected one of source_only,"),
        "workdir is a file": ([], a_file, f"--workdir={a_file} is a file, not a directory"),
        "workdir under a file": ([], a_file / "run", f"cannot create --workdir={a_file}/run: {a_file} is a file"),
        "unwritable workdir": ([], "/sys/t2s_faults_test/run", "cannot create --workdir=/sys/t2s_faults_test/run"),
        "eval of a missing workdir": (["--mode=eval"], tmp_path / "w5", f"--workdir={tmp_path}/w5 does not exist"),
    }  # fmt: skip
    started = {name: _start(session_dirs, workdir, *extra) for name, (extra, workdir, _) in cases.items()}
    for name, process in started.items():
        output, _ = process.communicate(timeout=TIMEOUT_S)
        extra, workdir, expected = cases[name]
        assert process.returncode == 2, (name, output[-3000:])
        assert "Traceback" not in output, (name, output[-3000:])
        (line,) = _error_lines(output)
        assert expected in line, (name, line)
        if name != "workdir is a file":
            assert not os.path.exists(workdir), name


# ---------------------------------------------------------------------------- one run's faults


def test_nan_stops_the_run_keeps_the_good_checkpoints_and_reports_the_nan(session_dirs):
    workdir = str(session_dirs["root"] / "nan")
    # lr(0) = 1e30 * 1e-36 = 1e-6: a good step 1; lr(1) = 1e30 / 1e8 wrecks the model at step 2,
    # and its forward pass at step 3 overflows.
    blow_up = {"optim.learning_rate": 1e30, "optim.warmup_steps": 100_000_000, "optim.warmup_ratio": 1e-36,
               "train.checkpoint_every": 1, "train.num_steps": 6}  # fmt: skip
    returncode, output = _run(session_dirs, workdir, overrides=blow_up)
    assert returncode == 1, output[-3000:]
    (line,) = _error_lines(output)
    assert "non-finite" in line and "loss" in line and "at step 3" in line, line
    assert "the last good checkpoint is step 2" in line, line
    assert _checkpoint_steps(workdir) == [1, 2]
    losses = [r for r in _records(workdir) if "train/loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3] and losses[-1]["train/loss"] is None
    report = open(os.path.join(workdir, reporting.REPORT_FILE)).read()
    assert "- status: stopped: non-finite" in report
    assert "| train/loss | 3 | nan |" in report, report


def _file_size_limit(limit_bytes):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return preexec


def test_a_failed_save_stops_the_run_at_once_in_one_line(session_dirs):
    workdir = str(session_dirs["root"] / "disk_full")
    # Files over 200 kB cannot be written: the first checkpoint's arrays, not the logs. The
    # compilation cache must not be written either: it would keep entries cut short.
    no_cache_writes = {"JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": str(10**12)}
    returncode, output = _run(session_dirs, workdir, env=no_cache_writes, preexec_fn=_file_size_limit(200_000))
    assert returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    (line,) = _error_lines(output)
    assert "step 2" in line and "checkpoints" in line, line
    assert "step 3/" not in output  # stopped at once, not after more training
    assert _checkpoint_steps(workdir) == []
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))


def _kill_when(process, ready, lines):
    """SIGKILLs `process` as soon as `ready(lines)` holds, reading its output meanwhile."""
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not ready(lines) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    process.kill()
    process.wait(timeout=TIMEOUT_S)
    reader.join(timeout=TIMEOUT_S)
    return "".join(lines)


def _failing_evaluations(session_dirs):
    """The environment of a command whose evaluations raise: a sitecustomize on its path
    (config values that would make them raise are refused before the run starts)."""
    folder = session_dirs["root"] / "failing_evaluations"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "from t2s_jax import evaluate\n"
        "def _raise(*args, **kwargs):\n"
        "    raise ValueError('injected evaluation failure')\n"
        "evaluate.predict_logits = _raise\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(folder), _env(session_dirs)["PYTHONPATH"]])}


def test_an_evaluation_error_and_kills_mid_step_and_mid_save_lose_nothing(session_dirs, comparison):
    """An evaluation that raises, then kill -9 after a step and during a save: every rerun
    resumes from the newest good checkpoint and the run ends with every step logged once,
    with the losses of the same run uninterrupted (the comparison's seed 1), bit for bit."""
    workdir = str(session_dirs["root"] / "killed")
    overrides = {"seed": 1}
    # The first evaluation (step 2) raises: its checkpoint is saved all the same.
    returncode, output = _run(session_dirs, workdir, overrides=overrides, env=_failing_evaluations(session_dirs))
    assert returncode == 1 and "injected evaluation failure" in output, output[-3000:]
    assert _checkpoint_steps(workdir) == [2] and not os.path.exists(os.path.join(workdir, "eval", "step_2.json"))
    # Resumed at step 2, which it evaluates first; killed right after step 3 is logged.
    output = _kill_when(_start(session_dirs, workdir, overrides=overrides), lambda lines: any("step 3/4" in l for l in lines), [])
    assert "resumed at step 2" in output and "its evaluation did not finish: evaluating it" in output, output[-3000:]
    # Killed while step 4 is being saved (after its records were flushed).
    saving = os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp")
    output = _kill_when(_start(session_dirs, workdir, overrides=overrides), lambda _: glob.glob(saving + "*"), [])
    assert "resumed at step 2" in output and _checkpoint_steps(workdir) == [2], output[-3000:]
    assert {r["step"] for r in _records(workdir)} >= {3, 4}  # flushed before the save began

    returncode, output = _run(session_dirs, workdir, overrides=overrides)
    assert returncode == 0, output[-3000:]
    assert "resumed at step 2" in output
    reference = comparison["dirs"]["seed_1"]
    assert tiny.logged_losses(workdir) == tiny.logged_losses(reference)  # each step once, the same values
    evaluations = [(r["step"], r["eval/miou"]) for r in _records(workdir) if "eval/miou" in r]
    assert evaluations == [(r["step"], r["eval/miou"]) for r in _records(reference) if "eval/miou" in r]


def _sizes(folder, pattern):
    return [os.path.getsize(path) for path in glob.glob(os.path.join(folder, pattern), recursive=True)]


def test_a_full_disk_at_the_pictures_then_truncated_evaluations_in_one_line_each(session_dirs, comparison):
    """The disk fills when an evaluation writes its pictures: the save of that step fails
    too, one line names the save's own cause, nothing partial is left and the previous
    checkpoint stays good. Then eval/step_N.json cut short, twice: mid-run (resumed at N)
    and on a finished run; each is set aside and recomputed from its checkpoint."""
    reference = comparison["dirs"]["seed_1"]  # 4 steps of seed 1, evaluated and saved at 2 and 4
    workdir = str(session_dirs["root"] / "disk_full_at_eval")
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("run.lock", "report.*", "*_eval_mode.json"))
    # Back to step 2: the rerun trains 3 and 4 again (the same compiled step), then evaluates 4.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    for name in ("eval/step_4.json", *(os.path.relpath(p, workdir) for p in glob.glob(f"{workdir}/pictures/step_000004_*"))):
        os.remove(os.path.join(workdir, name))
    picture = min(_sizes(reference, "pictures/step_000004_*.png"))
    logs = _sizes(reference, "metrics.jsonl") + _sizes(reference, "eval/step_*.json") + _sizes(reference, "tensorboard/*")
    assert max(logs) < picture < max(_sizes(reference, "checkpoints/4/**/*")), "the file-size limit must stop the pictures and the save"
    no_cache_writes = {"JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": str(10**12)}
    overrides = {"seed": 1}
    returncode, output = _run(session_dirs, workdir, overrides=overrides, env=no_cache_writes,
                              preexec_fn=_file_size_limit(picture - 1))  # fmt: skip
    assert returncode == 1 and "resumed at step 2" in output, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    (line,) = _error_lines(output)
    assert "could not save checkpoint step 4" in line and "File too large" in line, line
    assert "AttributeError" not in line and "_idat" not in line  # the save's own cause, not the pictures'
    assert _checkpoint_steps(workdir) == [2]
    assert not glob.glob(f"{workdir}/**/*tmp*", recursive=True)
    assert not glob.glob(f"{workdir}/pictures/step_000004_*") and not os.path.exists(f"{workdir}/eval/step_4.json")

    def truncate(name):
        path = os.path.join(workdir, "eval", name)
        text = open(path).read()
        open(path, "w").write(text[: len(text) // 2])

    truncate("step_2.json")  # the step the run resumes at, which it checks was evaluated
    returncode, output = _run(session_dirs, workdir, overrides=overrides)
    assert returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "step_2.json is damaged (JSONDecodeError" in output and "evaluating step 2 again" in output
    assert tiny.logged_losses(workdir) == tiny.logged_losses(reference)  # the previous checkpoint was good
    truncate("step_4.json")  # a finished run
    returncode, output = _run(session_dirs, workdir, overrides=overrides)
    assert returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "step_4.json is damaged" in output and "first step done" not in output, output[-3000:]
    for step in (2, 4):
        recomputed, logged = (json.load(open(f"{run}/eval/step_{step}.json")) for run in (workdir, reference))
        np.testing.assert_allclose(recomputed["miou"], logged["miou"], atol=1e-6)
        assert os.path.exists(f"{workdir}/eval/step_{step}.json.damaged")
    assert _error_lines(output) == [] and os.path.exists(f"{workdir}/{reporting.REPORT_FILE}")


# ---------------------------------------------------------------------------- a comparison


@pytest.fixture(scope="module")
def comparison(session_dirs):
    """A two-run comparison (source_only, seeds 0 and 1): a second command on the same
    workdir while it runs, SIGTERM in the first run, a rerun, a second rerun, eval mode."""
    workdir = session_dirs["root"] / "comparison"
    overrides = {"compare_methods": ("source_only",), "compare_seeds": (0, 1)}
    found = {"dirs": {f"seed_{k}": str(workdir / "source_only" / f"seed_{k}") for k in (0, 1)}}

    first, lines = _start(session_dirs, workdir, overrides=overrides), []
    assert _read_until(first, "mesh of", lines), "".join(lines)[-3000:]  # holds the workdir lock
    first.send_signal(signal.SIGSTOP)  # keeps it from finishing while the second one tries
    found["busy"] = _run(session_dirs, workdir, overrides=overrides)
    first.send_signal(signal.SIGCONT)
    assert _read_until(first, "step 1/4", lines), "".join(lines)[-3000:]
    first.send_signal(signal.SIGTERM)
    found["stopped"] = _finish(first, lines)
    found["stopped_files"] = _files(workdir)
    found["stopped_checkpoints"] = _checkpoint_steps(found["dirs"]["seed_0"])
    found["rerun"] = _run(session_dirs, workdir, overrides=overrides)
    start = time.monotonic()
    found["second_rerun"] = _run(session_dirs, workdir, overrides=overrides)
    found["second_rerun_s"] = time.monotonic() - start
    before = _files(workdir)
    found["eval"] = _run(session_dirs, workdir, "--mode=eval", overrides=overrides)
    found["eval_new_files"] = sorted(set(_files(workdir)) - set(before))
    empty = workdir.parent / "empty_workdir"
    empty.mkdir()
    found["eval_empty"] = _run(session_dirs, empty, "--mode=eval")
    found["empty_files"] = _files(empty)
    return found


def test_a_second_command_on_a_busy_workdir_is_refused(comparison):
    returncode, output = comparison["busy"]
    assert returncode == 1, output[-3000:]
    (line,) = _error_lines(output)
    assert "comparison" in line and "in use" in line, line


def test_sigterm_stops_the_whole_comparison_after_a_checkpoint(comparison):
    returncode, output = comparison["stopped"]
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    (line,) = _error_lines(output)
    assert "rerun with the same --workdir to resume" in line
    stopped_at = comparison["stopped_checkpoints"][-1]
    assert 1 <= stopped_at < 4 and f"stopped at step {stopped_at}" in line
    assert not any(path.startswith("source_only/seed_1") for path in comparison["stopped_files"])
    assert "comparison.md" not in comparison["stopped_files"]


def test_the_rerun_resumes_the_stopped_run_and_trains_the_rest(comparison):
    returncode, output = comparison["rerun"]
    assert returncode == 0, output[-3000:]
    assert "resumed at step" in output
    assert "| **mIoU** |" in output
    for run_dir in comparison["dirs"].values():
        assert sorted(tiny.logged_losses(run_dir)) == [1, 2, 3, 4]
        assert _checkpoint_steps(run_dir)[-1] == 4


def test_a_finished_comparison_reprints_its_table_without_training(comparison):
    rerun_table = comparison["rerun"][1].split("| class |", 1)[1]
    returncode, output = comparison["second_rerun"]
    assert returncode == 0, output[-3000:]
    assert output.count("is complete") == 2 and "first step done" not in output
    assert output.split("| class |", 1)[1].split("\n| **mIoU**")[0] == rerun_table.split("\n| **mIoU**")[0]


def test_eval_mode_on_a_comparison_evaluates_each_run_and_writes_only_its_json(comparison):
    returncode, output = comparison["eval"]
    assert returncode == 0, output[-3000:]
    assert comparison["eval_new_files"] == [
        "source_only/seed_0/eval/step_4_eval_mode.json", "source_only/seed_1/eval/step_4_eval_mode.json"
    ]
    for run_dir in comparison["dirs"].values():
        logged = json.load(open(os.path.join(run_dir, "eval", "step_4.json")))
        reproduced = json.load(open(os.path.join(run_dir, "eval", "step_4_eval_mode.json")))
        np.testing.assert_allclose(reproduced["miou"], logged["miou"], atol=1e-6)
    assert "evaluation of the runs in" in output and "source_only/seed_1" in output


def test_eval_mode_on_an_empty_workdir_says_so_in_one_line(comparison):
    returncode, output = comparison["eval_empty"]
    assert returncode == 1 and "Traceback" not in output, output[-3000:]
    (line,) = _error_lines(output)
    assert "no checkpoint in --workdir=" in line
    assert comparison["empty_files"] == []
