"""Run checkpoints: round trip, latest/best retention, data state, standalone trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2s_jax import checkpointing


def _state(value):
    return {"params": {"w": jnp.full((4, 3), value, jnp.float32)}, "step": jnp.asarray(int(value), jnp.int32)}


def test_round_trip_with_data_state_and_bytes(tmp_path):
    checkpointer = checkpointing.RunCheckpointer(str(tmp_path), keep=2)
    data_state = {"next_index": 7, "blob": b"\x00\xffgrain"}
    checkpointer.save(3, _state(3.0), data_state)
    checkpointer.wait()
    restored, restored_data, step = checkpointer.restore(checkpointing.abstract_like(_state(0.0)))
    assert step == 3
    np.testing.assert_array_equal(restored["params"]["w"], np.full((4, 3), 3.0))
    assert restored_data == data_state
    checkpointer.close()


def test_keeps_last_k_plus_best(tmp_path):
    checkpointer = checkpointing.RunCheckpointer(str(tmp_path), keep=2)
    metrics = {1: {"miou": 0.5}, 2: {"miou": 0.9}, 3: None, 4: {"miou": 0.1}, 5: None}
    for step, step_metrics in metrics.items():
        checkpointer.save(step, _state(float(step)), metrics=step_metrics)
        checkpointer.wait()
    assert sorted(checkpointer.all_steps()) == [2, 4, 5]
    assert checkpointer.best_step() == 2
    checkpointer.close()


def test_restore_errors_name_the_directory(tmp_path):
    checkpointer = checkpointing.RunCheckpointer(str(tmp_path), keep=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints"):
        checkpointer.restore(checkpointing.abstract_like(_state(0.0)))
    checkpointer.save(1, _state(1.0))
    checkpointer.wait()
    with pytest.raises(FileNotFoundError, match="available: \\[1\\]"):
        checkpointer.restore(checkpointing.abstract_like(_state(0.0)), step=9)
    checkpointer.close()


def test_restore_onto_another_sharding(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(jnp.arange(16.0), jax.sharding.NamedSharding(mesh, jax.P("data")))
    checkpointing.save_tree(str(tmp_path / "tree"), {"x": sharded})
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"x": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=single)}
    restored = checkpointing.restore_tree(str(tmp_path / "tree"), target)
    np.testing.assert_array_equal(restored["x"], np.arange(16.0))
    assert restored["x"].sharding == single
