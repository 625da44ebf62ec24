"""Device mesh, shardings, global batch assembly and multi-host start-up.

Data parallelism only: one mesh axis, 'data', over every device of every process.
Parameters are replicated; each process feeds its share of the global batch, which
`global_batch` stitches into one `jax.Array` sharded on its leading axis.

Several processes: CPU collectives (gloo) set up a connection among a group of devices the
first time a program runs a collective over them, and that set-up gives up when a peer
does not join within 30 s (fixed in XLA), e.g. one process loaded its compiled step from the
persistent cache while another still compiles it. `make_mesh` therefore opens the mesh's
connection while the processes are in step; a collective over an open connection waits
for a late peer without a time limit. A lost peer surfaces as an XLA runtime error, which
`peer_errors` turns into a one-line `PeerError`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# How long processes wait for each other to connect at start-up: a slow host, or a
# scheduler that starts the processes minutes apart.
DEFAULT_PEER_TIMEOUT_S = 600


class PeerError(RuntimeError):
    """Another process of the run died or cannot be reached; the message is one line."""


def _multihost_environment() -> str:
    """Names the launcher environment variable that announces several processes, or ''."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM_NTASKS"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):  # Cloud TPU / GKE pod slices
        if len([host for host in os.environ.get(name, "").split(",") if host]) > 1:
            return name
    for name in ("MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"):
        if os.environ.get(name):
            return name
    return ""


def initialize_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
    timeout_s: int = DEFAULT_PEER_TIMEOUT_S,
) -> None:  # fmt: skip
    """Starts `jax.distributed` when this run spans several processes; a no-op otherwise.

    Explicit arguments win (those left at their defaults are auto-detected by JAX).
    Without them, JAX's own cluster detection (SLURM, Cloud TPU, ...) is used, but only
    when the environment says there are several processes: on a single host there is
    nothing to initialise. The processes wait up to `timeout_s` for each other to connect
    (JAX stops them, naming no process, when one does not come). Must run before anything
    touches the devices.
    """
    if jax.distributed.is_initialized():
        logging.info("jax.distributed already initialised: process %d of %d.", jax.process_index(), jax.process_count())
        return
    if coordinator_address or num_processes > 0 or process_id >= 0:
        explicit = dict(
            coordinator_address=coordinator_address or None,
            num_processes=num_processes if num_processes > 0 else None,
            process_id=process_id if process_id >= 0 else None,
        )
        how = f"explicit flags (coordinator {coordinator_address or 'auto'})"
    elif variable := _multihost_environment():
        explicit = {}
        how = f"auto-detection ({variable} is set)"
    else:
        logging.info("Single process: jax.distributed not initialised.")
        return
    logging.info("waiting up to %d s for every process of the run to connect", timeout_s)
    jax.distributed.initialize(**explicit, initialization_timeout=timeout_s)
    logging.info(
        "jax.distributed initialised by %s: process %d of %d (pid %d), %d local / %d global devices.",
        how, jax.process_index(), jax.process_count(), os.getpid(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh, axis 'data', over `num_devices` devices (0: all devices of all processes).

    Fewer devices than exist are taken evenly from every process (the first
    `num_devices / process_count` local devices of each), so every process feeds an
    equal share of each batch.
    """
    num_devices = num_devices or jax.device_count()
    processes = jax.process_count()
    if num_devices > jax.device_count():
        raise ValueError(
            f"config.num_devices={num_devices} but only {jax.device_count()} devices exist; "
            f"set it to at most {jax.device_count()} (0 = all)"
        )
    if num_devices % processes:
        raise ValueError(
            f"config.num_devices={num_devices} is not divisible by the {processes} processes; "
            f"set it to a multiple of {processes} (0 = all devices)"
        )
    per_process = num_devices // processes
    by_process: dict[int, list] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    devices = [device for index in sorted(by_process) for device in by_process[index][:per_process]]
    # jax >= 0.10 defaults to explicit axis types; Auto keeps classic GSPMD propagation.
    mesh = jax.make_mesh(
        (num_devices,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
    if processes > 1:
        _open_collectives(mesh)
    return mesh


def _open_collectives(mesh: Mesh) -> None:
    """Runs one collective over the mesh's devices and one between the processes (those of
    `multihost_utils`), while the processes are in step: their connections are set up now,
    with a 30 s limit, so that the first collective of every later program (the first
    step, an evaluation) waits for a peer that compiles longer without a limit."""
    with peer_errors():
        multihost_utils.sync_global_devices("t2s_jax: open the collectives between processes")
        ones = jax.make_array_from_process_local_data(
            data_sharded(mesh), np.ones(len(local_mesh_devices(mesh)), np.int32)
        )
        total = jax.jit(jnp.sum, out_shardings=replicated(mesh))(ones)
        total.block_until_ready()
    logging.info(
        "collectives open among the %d processes: a process that reaches a collective first waits for the others",
        jax.process_count(),
    )


_LOST_PEER = re.compile(r"Connection reset by peer|Connection closed by peer|Broken pipe|Socket closed|"
                        r"Gloo context initialization failed|heartbeat|task.*(died|preempted|unhealthy)",
                        re.IGNORECASE)  # fmt: skip


def peer_failure(error: BaseException) -> str | None:
    """One line for an XLA runtime error that says another process died or cannot be
    reached (gloo's broken connections, the coordination service's errors), else None."""
    text = str(error)
    if not isinstance(error, RuntimeError) or not _LOST_PEER.search(text):
        return None
    processes, me = jax.process_count(), jax.process_index()
    tasks = sorted({int(n) for n in re.findall(r"task:(\d+)", text)} - {me})
    if tasks:
        peer = "process " + ", ".join(map(str, tasks))
    elif processes == 2:
        peer = f"process {1 - me}"
    else:
        peer = "another process"
    address = re.search(r"\[([\w.:-]+)\]:(\d+)", text)
    where = f" at {address.group(1)}" if address else ""
    cause = next(
        (line.strip() for line in text.splitlines() if _LOST_PEER.search(line)), text.splitlines()[0]
    )
    cause = re.sub(r"\[[^\]]*\.cc:\d+\] ", "", cause)  # the C++ source location
    return (
        f"process {me} of {processes} lost contact with {peer}{where} ({cause}); it died or its "
        "host is unreachable, so this process stops too. Rerun the same command to resume from "
        "the last checkpoint"
    )


@contextlib.contextmanager
def peer_errors() -> Iterator[None]:
    """Turns the errors of a lost peer (`peer_failure`) into `PeerError`; others pass."""
    try:
        yield
    except PeerError:
        raise
    except RuntimeError as error:
        if (message := peer_failure(error)) is None:
            raise
        raise PeerError(message) from None


def local_mesh_devices(mesh: Mesh) -> list:
    """The devices of `mesh` that belong to this process (it feeds their batch slices)."""
    return [device for device in mesh.devices.flat if device.process_index == jax.process_index()]


def check_batch_size(key: str, batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError naming `config.<key>` unless `batch_size` splits evenly over the mesh."""
    if batch_size <= 0 or batch_size % mesh.size:
        processes = jax.process_count()
        layout = f"{processes} process{'es' if processes > 1 else ''} x {len(local_mesh_devices(mesh))} devices"
        raise ValueError(
            f"config.{key}={batch_size} is not divisible by the {mesh.size} devices of the mesh "
            f"({layout}); set it to a multiple of {mesh.size}, or set config.num_devices"
        )


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of the mesh's devices (padding examples fill the rest)."""
    return -(-max(batch_size, 1) // mesh.size) * mesh.size


def per_device(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` applied to each device's slice of the batch axis of every argument.

    For per-example ops that GSPMD cannot partition: it runs an FFT on the gathered
    batch on every device, where each device needs only its own examples.
    """
    return jax.shard_map(fn, mesh=mesh, in_specs=PartitionSpec(DATA_AXIS), out_specs=PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over the 'data' axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _is_batch_array(value) -> bool:
    return isinstance(value, np.ndarray) and (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_)


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's examples and the other processes' into global arrays.

    Each process passes its own `host_batch` (leading axis = its examples); the result's
    leading axis is the global batch, sharded over 'data'. Entries that are not numeric
    NumPy arrays (file names, strings, metadata) stay on the host and are left out.
    """
    sharding = data_sharded(mesh)
    local_devices = len(local_mesh_devices(mesh))
    arrays = {}
    for key, value in host_batch.items():
        if not _is_batch_array(value):
            continue
        if value.ndim == 0 or value.shape[0] % local_devices:
            raise ValueError(
                f"batch entry {key!r} has shape {value.shape}: its leading (per-process batch) axis must be "
                f"divisible by the {local_devices} devices of the mesh in process {jax.process_index()}"
            )
        arrays[key] = jax.make_array_from_process_local_data(sharding, value)
    return arrays


def _gather(x) -> np.ndarray:
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    # A collective: every process must call it with the same arrays.
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree):
    """A global array (or a pytree of them) as NumPy on this host, whole.

    With several processes, arrays sharded across hosts are all-gathered, so every
    process must call this with the same arrays.
    """
    return jax.tree.map(_gather, tree)
