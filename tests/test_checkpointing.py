"""Run checkpoints: round trip, retention, checksums, damage fall-back, failed saves, read-only.

The state is a real `steps.TrainState` (nnx.State trees, optax state) of a two-layer model,
not the segmentor: the checkpoint code sees the same tree types at a fraction of the cost.
"""

import gc
import glob
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from t2s_jax import checkpointing, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(64, 256, rngs=rngs)  # 64 KiB of random kernel: a real data file
        self.norm = nnx.BatchNorm(256, rngs=rngs)


def _train_state(shift: float = 0.0) -> steps.TrainState:
    _, params, batch_stats = nnx.split(_Model(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    params = jax.tree.map(lambda x: x + shift, params)
    state = steps.initial_train_state(params, batch_stats, optax.adamw(1e-3), seed=0)
    return state.replace(step=jnp.asarray(int(shift), jnp.int32))


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _assert_one_paragraph(message, *needles):
    assert "Traceback" not in message and "\n\n" not in message, message
    assert len(message) < 2000, message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A workdir with good steps 1 and 2 (params shifted by the step), data {'next': step}."""
    workdir = tmp_path_factory.mktemp("saved_run")
    checkpointer = checkpointing.RunCheckpointer(str(workdir))
    for step in (1, 2):
        assert checkpointer.save(step, _train_state(step), {"next": step, "blob": b"\x00\xff"})
    checkpointer.close()
    return workdir


@pytest.fixture
def run_copy(saved_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    return workdir


def _step_dir(workdir, step):
    return os.path.join(str(workdir), "checkpoints", str(step))


def _largest_array_file(workdir, step):
    files = glob.glob(os.path.join(_step_dir(workdir, step), "state", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


def _flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_round_trip_of_state_data_and_bytes(saved_run):
    checkpointer = checkpointing.RunCheckpointer(str(saved_run), read_only=True)
    assert checkpointer.all_steps() == [1, 2]
    state, data_state, step = checkpointer.restore(checkpointing.abstract_like(_train_state()))
    assert step == 2 and data_state == {"next": 2, "blob": b"\x00\xff"}
    _assert_trees_equal(state, _train_state(2))
    (params, batch_stats), step = checkpointer.restore_model(
        checkpointing.abstract_like(_train_state().params),
        checkpointing.abstract_like(_train_state().batch_stats),
        step=1,
    )
    assert step == 1
    _assert_trees_equal(params, _train_state(1).params)
    _assert_trees_equal(batch_stats, _train_state(1).batch_stats)


def _damage_flip(workdir):
    _flip_byte(_largest_array_file(workdir, 2))


def _damage_truncate(workdir):
    path = _largest_array_file(workdir, 2)
    os.truncate(path, os.path.getsize(path) // 2)


def _damage_garbage(workdir):
    path = _largest_array_file(workdir, 2)
    open(path, "wb").write(np.random.default_rng(0).bytes(os.path.getsize(path)))


def _damage_missing_file(workdir):
    os.remove(_largest_array_file(workdir, 2))


def _damage_missing_metadata(workdir):
    os.remove(os.path.join(_step_dir(workdir, 2), "state", "_METADATA"))


def _damage_missing_data(workdir):
    shutil.rmtree(os.path.join(_step_dir(workdir, 2), "data"))


def _damage_garbage_data_json(workdir):
    (path,) = glob.glob(os.path.join(_step_dir(workdir, 2), "data", "*metadata*"))
    open(path, "w").write('{"next": 2, "bl')


def _damage_missing_manifest(workdir):
    shutil.rmtree(os.path.join(_step_dir(workdir, 2), "checksums"))


DAMAGE = {
    "byte_flip": (_damage_flip, "does not match its checksum"),
    "truncated": (_damage_truncate, "unreadable"),
    "garbage": (_damage_garbage, "unreadable"),
    "missing_file": (_damage_missing_file, "unreadable"),
    "missing_metadata": (_damage_missing_metadata, "metadata is missing"),
    "missing_data_item": (_damage_missing_data, "data-iterator item is missing"),
    "garbage_data_json": (_damage_garbage_data_json, "data-iterator item is unreadable"),
    "missing_manifest": (_damage_missing_manifest, "checksum manifest is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_step_falls_back_with_one_paragraph(run_copy, damage, caplog, monkeypatch):
    damage_fn, cause = DAMAGE[damage]
    damage_fn(run_copy)
    unraisable = []  # e.g. Orbax's abandoned read coroutines, printed with their TensorStore specs
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    checkpointer = checkpointing.RunCheckpointer(str(run_copy), read_only=True)
    with caplog.at_level(logging.WARNING):
        state, data_state, step = checkpointer.restore(checkpointing.abstract_like(_train_state()))
    gc.collect()
    assert not unraisable, unraisable[0].exc_value
    assert step == 1 and data_state["next"] == 1
    _assert_trees_equal(state, _train_state(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    _assert_one_paragraph(warnings[0], "step 2", _step_dir(run_copy, 2), cause, "trying step 1")
    # An explicit step is not replaced by another one.
    with pytest.raises(checkpointing.CheckpointError) as error:
        checkpointer.restore(checkpointing.abstract_like(_train_state()), step=2)
    _assert_one_paragraph(str(error.value), "step 2", _step_dir(run_copy, 2), cause)


def _corrupt_manifest(workdir, step, prefix):
    """Flips the saved CRC of every array whose name starts with `prefix`."""
    (path,) = glob.glob(os.path.join(_step_dir(workdir, step), "checksums", "*metadata*"))
    manifest = json.load(open(path))
    for name, entry in manifest["arrays"].items():
        if name.startswith(prefix):
            entry[0] ^= 1
    json.dump(manifest, open(path, "w"))


def test_restore_model_verifies_only_the_student_and_falls_back(run_copy, caplog):
    # Step 2's student params and step 1's optimizer state do not match their checksums:
    # eval mode never reads the optimizer state, so step 1 serves it.
    _corrupt_manifest(run_copy, 2, "params/linear/kernel")
    _corrupt_manifest(run_copy, 1, "opt_state/")
    checkpointer = checkpointing.RunCheckpointer(str(run_copy), read_only=True)
    abstract = checkpointing.abstract_like(_train_state())
    with caplog.at_level(logging.WARNING):
        (params, batch_stats), step = checkpointer.restore_model(abstract.params, abstract.batch_stats)
    assert step == 1
    _assert_trees_equal(params, _train_state(1).params)
    _assert_trees_equal(batch_stats, _train_state(1).batch_stats)
    _assert_one_paragraph(caplog.text, "step 2", "params/linear/kernel", "trying step 1")
    # A full restore verifies the optimizer state too: no usable step, one paragraph.
    with pytest.raises(checkpointing.CheckpointError) as error:
        checkpointer.restore(abstract)
    _assert_one_paragraph(str(error.value), "no usable checkpoint", "step 2", "step 1", "opt_state/0/")


def test_damaged_steps_set_aside_when_resuming(run_copy):
    _damage_truncate(run_copy)
    checkpointer = checkpointing.RunCheckpointer(str(run_copy))
    _, _, step = checkpointer.restore(checkpointing.abstract_like(_train_state()))
    assert step == 1 and checkpointer.all_steps() == [1]
    assert os.path.isdir(os.path.join(str(run_copy), "damaged_checkpoints", "2"))
    # The resumed run saves step 2 again.
    assert checkpointer.save(2, _train_state(2), {"next": 2})
    assert checkpointer.restore(checkpointing.abstract_like(_train_state()))[2] == 2
    checkpointer.close()


def test_other_state_tree_is_an_error_not_damage(saved_run):
    checkpointer = checkpointing.RunCheckpointer(str(saved_run), read_only=True)
    abstract = checkpointing.abstract_like(_train_state())
    abstract = abstract.replace(rng=jax.ShapeDtypeStruct((3,), jnp.uint32, sharding=abstract.rng.sharding))
    with pytest.raises(checkpointing.CheckpointError) as error:
        checkpointer.restore(abstract)
    _assert_one_paragraph(str(error.value), "step 2", "another state tree", "rng")


def _tree_snapshot(root):
    return sorted(
        (os.path.relpath(os.path.join(d, name), root), os.stat(os.path.join(d, name)).st_mtime_ns)
        for d, dirs, files in os.walk(root) for name in dirs + files
    )


def test_read_only_creates_and_changes_nothing(saved_run, tmp_path):
    before = _tree_snapshot(saved_run)
    checkpointer = checkpointing.RunCheckpointer(str(saved_run), read_only=True)
    checkpointer.restore(checkpointing.abstract_like(_train_state()))
    abstract = checkpointing.abstract_like(_train_state())
    checkpointer.restore_model(abstract.params, abstract.batch_stats)
    with pytest.raises(checkpointing.CheckpointError, match="read-only"):
        checkpointer.save(3, _train_state(3), {"next": 3})
    checkpointer.close()
    assert _tree_snapshot(saved_run) == before
    nowhere = tmp_path / "nowhere"
    empty = checkpointing.RunCheckpointer(str(nowhere), read_only=True)
    assert empty.latest_step() is None
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in .*nowhere"):
        empty.restore(abstract)
    assert not nowhere.exists()


def test_keeps_last_k_plus_best_and_refuses_non_finite(tmp_path):
    checkpointer = checkpointing.RunCheckpointer(str(tmp_path), keep=2)
    state = _train_state()
    metrics = {1: {"miou": 0.5}, 2: {"miou": 0.9}, 3: None, 4: {"miou": 0.1}, 5: None}
    for step, step_metrics in metrics.items():
        assert checkpointer.save(step, state, {"next": step}, metrics=step_metrics)
    assert checkpointer.all_steps() == [2, 4, 5]  # the last 2, and 2: the best mIoU
    nan_moments = lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    bad = state.replace(opt_state=jax.tree.map(nan_moments, state.opt_state))
    assert checkpointing.all_finite(state) and not checkpointing.all_finite(bad)
    assert not checkpointing.all_finite({"a": jnp.ones(3), "b": jnp.ones(2, jnp.bfloat16).at[1].set(jnp.inf)})
    for step in (6, 7, 8):  # NaN steps never push the finite ones out
        with pytest.raises(checkpointing.CheckpointError) as error:
            checkpointer.save(step, bad, {"next": step})
        _assert_one_paragraph(
            str(error.value), f"step {step}", checkpointer.step_path(step), "non-finite", "opt_state/0/mu/"
        )
    assert checkpointer.all_steps() == [2, 4, 5]
    with pytest.raises(ValueError, match="data_state"):
        checkpointer.save(9, state, None)
    checkpointer.close()


def test_restore_errors_name_the_directory(tmp_path):
    checkpointer = checkpointing.RunCheckpointer(str(tmp_path), keep=2)
    abstract = checkpointing.abstract_like(_train_state())
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in .*checkpoints"):
        checkpointer.restore(abstract)
    checkpointer.save(1, _train_state(1), {"next": 1})
    with pytest.raises(checkpointing.CheckpointError, match="available: \\[1\\]"):
        checkpointer.restore(abstract, step=9)
    checkpointer.close()


def test_disk_full_during_save_fails_at_once_in_one_line(tmp_path, caplog):
    checkpointer = checkpointing.RunCheckpointer(str(tmp_path))
    assert checkpointer.save(1, _train_state(1), {"next": 1})
    # Writes past 16 KiB fail with EFBIG, as on a full disk (ENOSPC takes the same path).
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        with pytest.raises(checkpointing.CheckpointError) as error:
            checkpointer.save(2, _train_state(2), {"next": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(error.value)
    assert "\n" not in message
    _assert_one_paragraph(message, "step 2", checkpointer.step_path(2), "File too large")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # Orbax's tracebacks
    assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))
    assert checkpointer.all_steps() == [1]
    # The disk has room again: saving goes on.
    assert checkpointer.save(2, _train_state(2), {"next": 2})
    assert checkpointer.restore(checkpointing.abstract_like(_train_state()))[2] == 2
    checkpointer.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_fails_in_one_line(tmp_path):
    checkpointer = checkpointing.RunCheckpointer(str(tmp_path))
    os.chmod(checkpointer.directory, 0o555)
    try:
        with pytest.raises(checkpointing.CheckpointError) as error:
            checkpointer.save(1, _train_state(1), {"next": 1})
    finally:
        os.chmod(checkpointer.directory, 0o755)
    assert "\n" not in str(error.value)
    _assert_one_paragraph(str(error.value), "step 1", checkpointer.step_path(1), "ermission")


def _plain_state(step):
    return {"w": np.random.default_rng(step).random((64, 256), np.float32), "step": np.int32(step)}


# Saves step 1, then stalls step 2 at its first commit rename (all files written, nothing
# committed) for the test to kill. Imports only what a checkpoint needs (a fast start).
_KILLED_SAVER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from t2s_jax import checkpointing

    def state(step):
        return {{"w": np.random.default_rng(step).random((64, 256), np.float32), "step": np.int32(step)}}

    checkpointer = checkpointing.RunCheckpointer({workdir!r})
    checkpointer.save(1, state(1), {{"next": 1}})

    async def stall(source, target):
        print("SAVING", flush=True)
        time.sleep(600)

    atomicity.async_path.rename = stall
    checkpointer.save(2, state(2), {{"next": 2}})
    """
)


def test_kill_9_during_save_leaves_the_previous_step(tmp_path, caplog):
    script = _KILLED_SAVER.format(repo=REPO, workdir=str(tmp_path))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("SAVING"):
            process.kill()
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(output)[-3000:]
    assert glob.glob(str(tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp*"))
    with caplog.at_level(logging.WARNING):
        checkpointer = checkpointing.RunCheckpointer(str(tmp_path))
    _assert_one_paragraph(caplog.text, "unfinished checkpoint save", "2.orbax-checkpoint-tmp")
    assert checkpointer.all_steps() == [1]
    state, data_state, step = checkpointer.restore(
        checkpointing.abstract_like(jax.tree.map(jnp.asarray, _plain_state(0)))
    )
    assert step == 1 and data_state == {"next": 1}
    _assert_trees_equal(state, _plain_state(1))
    assert checkpointer.save(2, _plain_state(2), {"next": 2})
    checkpointer.close()
    assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))


def test_restore_onto_another_sharding(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(jnp.arange(16.0), jax.sharding.NamedSharding(mesh, jax.P("data")))
    checkpointing.save_tree(str(tmp_path / "tree"), {"x": sharded})
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"x": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=single)}
    restored = checkpointing.restore_tree(str(tmp_path / "tree"), target)
    np.testing.assert_array_equal(restored["x"], np.arange(16.0))
    assert restored["x"].sharding == single
