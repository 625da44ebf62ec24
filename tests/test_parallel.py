"""Mesh, shardings and global batches on 8 fake CPU devices, and on two local processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2s_jax import parallel


def test_mesh_spans_all_devices_with_auto_axis():
    mesh = parallel.make_mesh()
    assert jax.device_count() == 8
    assert dict(mesh.shape) == {"data": 8}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert parallel.replicated(mesh).is_fully_replicated
    assert parallel.data_sharded(mesh).spec == jax.sharding.PartitionSpec("data")


def test_global_batch_shards_the_leading_axis_and_skips_strings():
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    host = {
        "image": rng.integers(0, 256, (16, 4, 6, 3), dtype=np.uint8),
        "valid": np.arange(16) % 3 > 0,
        "name": np.array([f"file{i}.png" for i in range(16)]),
        "source": "gta5",
    }
    batch = parallel.global_batch(host, mesh)
    assert set(batch) == {"image", "valid"}
    image = batch["image"]
    assert image.shape == (16, 4, 6, 3) and image.dtype == np.uint8
    assert image.sharding.is_equivalent_to(parallel.data_sharded(mesh), image.ndim)
    assert {shard.data.shape for shard in image.addressable_shards} == {(2, 4, 6, 3)}
    np.testing.assert_array_equal(parallel.to_host(image), host["image"])
    np.testing.assert_array_equal(parallel.to_host(batch)["valid"], host["valid"])

    total = jax.jit(lambda x: jnp.sum(x.astype(jnp.int32)), out_shardings=parallel.replicated(mesh))(image)
    assert int(total) == int(host["image"].astype(np.int64).sum())


def test_global_batch_rejects_a_batch_not_divisible_by_the_local_devices():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="'label'.*divisible by the 8 devices of the mesh"):
        parallel.global_batch({"label": np.zeros((6, 4, 4), np.uint8)}, mesh)


@pytest.fixture
def fake_distributed(monkeypatch):
    """Records jax.distributed.initialize calls instead of starting a cluster."""
    calls = []
    for name in ("SLURM_NTASKS", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


def test_initialize_distributed_is_a_no_op_on_one_host(fake_distributed, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    parallel.initialize_distributed()
    assert fake_distributed == []


@pytest.mark.parametrize(
    "variable, value",
    [("SLURM_NTASKS", "4"), ("TPU_WORKER_HOSTNAMES", "w0,w1"), ("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")],
)
def test_initialize_distributed_auto_detects_several_processes(fake_distributed, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    parallel.initialize_distributed()
    assert fake_distributed == [((), dict(initialization_timeout=parallel.DEFAULT_PEER_TIMEOUT_S))]


def test_initialize_distributed_passes_explicit_flags(fake_distributed):
    parallel.initialize_distributed("10.0.0.1:1234", 4, 2, timeout_s=60)
    assert fake_distributed == [
        ((), dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2, initialization_timeout=60))
    ]


def test_a_lost_peer_is_one_line_naming_it():
    # What a survivor's collective raised after `kill -9` of its peer (jax 0.10, gloo).
    reset = jax.errors.JaxRuntimeError(
        "UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] "
        "Read error [127.0.0.1]:41197: Connection reset by peer"
    )
    with pytest.raises(parallel.PeerError) as error:
        with parallel.peer_errors(), parallel.peer_errors():  # said once, however deep
            raise reset
    message = str(error.value)
    assert "\n" not in message and "pair.cc" not in message
    assert message.startswith("process 0 of 1 lost contact with another process at 127.0.0.1 (")
    assert "Read error [127.0.0.1]:41197: Connection reset by peer" in message and "Rerun" in message
    coordination = RuntimeError("DEADLINE_EXCEEDED: Barrier timed out. Some timed out task names:\n"
                                "/job:jax_worker/replica:0/task:3 is unhealthy (heartbeat timeout)")  # fmt: skip
    assert "lost contact with process 3 (" in parallel.peer_failure(coordination)
    other = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
    assert parallel.peer_failure(other) is None
    with pytest.raises(jax.errors.JaxRuntimeError, match="out of memory"):
        with parallel.peer_errors():
            raise other


_WORKER = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from t2s_jax import parallel

    port, process_id = sys.argv[1], int(sys.argv[2])
    parallel.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    mesh = parallel.make_mesh()
    # Process i holds rows 100*i + (0..3): a per-process batch of 4 on its 2 devices.
    host = {"x": (np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * process_id)}
    batch = parallel.global_batch(host, mesh)
    total = jax.jit(lambda x: jnp.sum(x), out_shardings=parallel.replicated(mesh))(batch["x"])
    gathered = parallel.to_host(batch["x"])
    print("RESULT " + json.dumps(dict(
        process_count=jax.process_count(), device_count=jax.device_count(), shape=list(batch["x"].shape),
        total=float(parallel.to_host(total)), rows=sorted(gathered[:, 0].tolist()),
    )))
    jax.distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_assemble_one_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    port = _free_port()
    workers = [
        subprocess.Popen([sys.executable, str(script), str(port), str(i)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
        for i in range(2)
    ]
    results = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=90)
            assert worker.returncode == 0, stderr[-3000:]
            results.append(json.loads(stdout.split("RESULT ", 1)[1]))
    finally:
        for worker in workers:
            worker.kill()
    expected_rows = sorted((np.arange(0, 12, 3)[None] + 100 * np.arange(2)[:, None]).ravel().tolist())
    expected_total = float(sum((np.arange(12) + 100 * i).sum() for i in range(2)))
    for result in results:
        assert result["process_count"] == 2 and result["device_count"] == 4
        assert result["shape"] == [8, 3]
        assert result["total"] == expected_total
        assert result["rows"] == expected_rows


def test_a_process_that_never_connects_stops_the_run_after_distributed_timeout(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
    command = [sys.executable, "-m", "t2s_jax.main", f"--config={repo}/configs/synthetic_demo.py",
               f"--workdir={tmp_path / 'run'}", f"--coordinator_address=127.0.0.1:{_free_port()}",
               "--num_processes=2", "--process_id=0", "--distributed_timeout=3"]  # fmt: skip
    started = time.monotonic()
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    # Process 1 never starts: process 0 says how long it waits, then JAX stops it.
    assert finished.returncode != 0
    assert "waiting up to 3 s for every process of the run to connect" in finished.stderr
    assert "DEADLINE_EXCEEDED" in finished.stderr
    assert time.monotonic() - started < 60
