"""The training loop: mesh, data, state create/restore, jitted steps, logging, evaluation, checkpoints.

No model math lives here (that is `steps.py`, `uda/` and `models/`). What the loop guarantees
when things go wrong (non-finite values, kills, failed saves, signals, a busy workdir) is
listed in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from t2s_jax import checkpointing, data, evaluate, methods, parallel, reporting, steps
from t2s_jax.models import build_segmentor, maybe_load_pretrained
from t2s_jax.workdir_lock import WorkdirBusyError, WorkdirLock
from t2s_jax.optim import make_optimizer


# ---------------------------------------------------------------------------- errors


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


# ---------------------------------------------------------------------------- model state


def model_config_for_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model settings of this run: the projector exists only where a term reads it."""
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.projector.enabled = methods.needs_projector(config)
    return model_config


# Compiler options for executables that run once (state initialisation): the backend's
# optimisation passes cost more compile time than the single run they speed up.
_RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def create_model_state(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Student parameters and BN statistics, initialised on the devices straight into their
    shardings (one jitted init, compiled without backend optimisation).

    With `config.model.pretrained` the encoder is then overwritten by the ImageNet weights.
    """
    model_config = model_config_for_run(config)
    abstract_model = nnx.eval_shape(lambda: build_segmentor(model_config, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract_model)

    def init():
        model = build_segmentor(model_config, rngs=nnx.Rngs(config.seed))
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        return params, batch_stats

    init = jax.jit(init, out_shardings=parallel.replicated(mesh)).lower()
    params, batch_stats = init.compile(compiler_options=_RUN_ONCE_COMPILER_OPTIONS)()
    if model_config.pretrained:
        model = nnx.merge(graphdef, params, batch_stats)
        maybe_load_pretrained(model, model_config)
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params = jax.device_put(params, parallel.replicated(mesh))
    return graphdef, params, batch_stats


def create_train_state(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_steps: int
) -> tuple[nnx.GraphDef, steps.TrainState, nnx.State, Any]:
    """(graphdef, fresh train state, frozen ImageNet parameters, optimizer)."""
    graphdef, params, batch_stats = create_model_state(config, mesh)
    optimizer = make_optimizer(config.optim, num_steps)
    terms = methods.build_terms(config)

    def initial_state(params, batch_stats):
        state = steps.initial_train_state(params, batch_stats, optimizer, config.seed, terms=terms)
        # The ImageNet reference of the feature distance is the initial encoder, kept frozen
        # (its own buffers: the step donates the state).
        return state, jax.tree.map(jnp.copy, params)

    initial_state = jax.jit(initial_state, out_shardings=parallel.replicated(mesh)).lower(params, batch_stats)
    state, imagenet_params = initial_state.compile(compiler_options=_RUN_ONCE_COMPILER_OPTIONS)(params, batch_stats)
    return graphdef, state, imagenet_params, optimizer


def jit_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    optimizer: Any,
    mesh: jax.sharding.Mesh,
    num_steps: int,
):
    """The step of `config.method` jitted for `mesh`: state and ImageNet parameters replicated,
    the batch sharded on 'data', the incoming state donated (updated in place). The loop and
    `t2s_jax.bench` share it, so the benchmark times exactly the step that trains."""
    return jax.jit(
        steps.make_train_step(config, graphdef, optimizer, num_steps, mesh),
        in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh), parallel.replicated(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


# ---------------------------------------------------------------------------- data feeding


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


# ---------------------------------------------------------------------------- stop signals


class _StopSignals:
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


_active_stop_signals: _StopSignals | None = None


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopSignals]:
    """The process's stop handlers, installed by the outermost caller (a comparison or one run)."""
    global _active_stop_signals
    if _active_stop_signals is not None:
        yield _active_stop_signals
        return
    _active_stop_signals = _StopSignals()
    _active_stop_signals.install()
    try:
        yield _active_stop_signals
    finally:
        _active_stop_signals.restore()
        _active_stop_signals = None


# ---------------------------------------------------------------------------- workdir


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` or raises RunError saying in one line why it cannot be used."""
    if not workdir:
        raise RunError("--workdir is empty; pass the run directory, e.g. --workdir=runs/my_run")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunError(f"--workdir={workdir} is a file, not a directory; choose another --workdir")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise RunError(
            f"cannot create --workdir={workdir}: {error.strerror} ({error.filename}); "
            "choose a directory you can write"
        ) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise RunError(f"--workdir={workdir} is not writable; choose a directory you can write")


@contextlib.contextmanager
def _workdir_lock(workdir: str) -> Iterator[None]:
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


# ---------------------------------------------------------------------------- evaluation in the loop


def _eval_setup(config, graphdef, mesh, class_list: data.ClassList):
    """`run(params, batch_stats) -> summary` over the eval split. The global eval batch is
    `data.eval_batch_size` rounded up to a multiple of the mesh's devices; the padding
    examples (valid=False) are scored nowhere, so any eval_batch_size works on any mesh."""
    eval_step = evaluate.make_eval_step(graphdef, mesh, config.eval, config.model.num_classes)
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.eval_batch_size = parallel.padded_batch_size(config.data.eval_batch_size, mesh)

    def run(params, batch_stats) -> dict:
        iterator = data.make_eval_iterator(
            data_config, process_index=jax.process_index(), process_count=jax.process_count()
        )
        return evaluate.evaluate(
            eval_step, (params, batch_stats), iterator, mesh, class_list.names,
            num_pictures=config.train.num_pictures,
        )

    return run


def _eval_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "eval", f"step_{step}.json")


def _log_evaluation(workdir, step, summary, writer, palette):
    logging.info("step %d evaluation:\n%s", step, evaluate.format_iou_table(summary))
    writer.write_scalars(step, _scalar_items(summary))
    writer.flush()
    if jax.process_index() == 0:
        pictures = summary.get("pictures")
        if pictures:
            evaluate.save_prediction_pictures(os.path.join(workdir, "pictures"), step, *pictures, palette=palette)
        # Written last: its presence says the evaluation of `step` is complete and logged.
        evaluate.write_eval_json(_eval_path(workdir, step), summary)


def _scalar_items(summary: dict) -> dict[str, float]:
    scalars = {f"eval/{k}": float(v) for k, v in summary.items() if k.startswith("miou")}
    for name, iou in zip(summary["class_names"], summary["per_class_iou"]):
        scalars[f"eval_iou/{name.replace(' ', '_')}"] = float(iou)
    return scalars


def _saved_evaluation(workdir: str, step: int) -> dict | None:
    """The summary `_log_evaluation` wrote for `step` (null -> nan), or None."""
    path = _eval_path(workdir, step)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    summary["per_class_iou"] = [math.nan if v is None else v for v in summary["per_class_iou"]]
    for key in [k for k in summary if k.startswith("miou")]:
        summary[key] = math.nan if summary[key] is None else summary[key]
    return summary


# ---------------------------------------------------------------------------- the loop


class _TrainMetrics:
    """The step metrics, summed on the device; the host reads them (one transfer) only at
    logging and checkpoint steps, and logs their mean since the last log."""

    def __init__(self, writer: reporting.MetricWriter, num_steps: int, start_step: int):
        self._writer, self._num_steps, self._start_step = writer, num_steps, start_step
        self._sums, self._count = None, 0
        self._timer_step, self._timer_start = start_step, time.perf_counter()

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._sums = metrics if self._sums is None else jax.tree.map(jnp.add, self._sums, metrics)
        self._count += 1
        if step == self._start_step + 1:
            logging.info("first step done (compile + run) in %.1f s", time.perf_counter() - self._timer_start)
            self._timer_step, self._timer_start = step, time.perf_counter()

    def read(self) -> dict[str, float]:
        return {k: float(v) / self._count for k, v in parallel.to_host(self._sums).items()}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self._timer_start
        steps_per_sec = (step - self._timer_step) / elapsed if step > self._timer_step else 0.0
        self._writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
        logging.info(reporting.format_progress(step, self._num_steps, steps_per_sec, scalars))
        self._sums, self._count = None, 0
        self._timer_step, self._timer_start = step, time.perf_counter()


def _nonfinite_names(scalars: dict[str, float]) -> list[str]:
    return sorted(name for name, value in scalars.items() if not math.isfinite(value))


def _check_and_save(checkpointer, writer, step, state, data_state, *, metrics, force: bool) -> None:
    """Saves `step` after the last guards: a finite state, and the logs on disk first (a
    kill after the save then never loses the records of the steps it covers)."""
    if not checkpointing.all_finite(state):
        raise NonFiniteError(
            f"the model state became NaN/Inf at step {step} (the losses logged before it were finite); "
            f"not saved, the checkpoints in {checkpointer.directory} are kept. Lower "
            "config.optim.learning_rate and rerun with the same --workdir to resume from the last one"
        )
    writer.flush()
    checkpointer.save(step, state, data_state, metrics=metrics, force=force)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.method` in `workdir`, resuming from its newest good checkpoint, and
    returns the final evaluation. A finished run returns its saved final evaluation
    without building anything.

    Raises RunError (NonFiniteError, RunStopped after a stop signal, a busy or unusable
    workdir, a bad layout) or checkpointing.CheckpointError (a failed save) with a one-line
    message: `t2s_jax.main` prints it and exits non-zero.
    """
    mesh = make_run_mesh(config)
    class_list = _check_datasets(config, eval_only=False)
    prepare_workdir(workdir)
    with _stop_signals() as stop, _workdir_lock(workdir):
        checkpointer = checkpointing.RunCheckpointer(workdir, keep=config.train.keep_checkpoints)
        try:
            return _train(config, workdir, mesh, class_list, checkpointer, stop)
        finally:
            checkpointer.close()


def _train(config, workdir, mesh, class_list, checkpointer, stop: _StopSignals) -> dict:
    num_steps, train_config = config.train.num_steps, config.train
    latest = checkpointer.latest_step()
    if latest is not None and latest >= num_steps and (summary := _saved_evaluation(workdir, latest)):
        logging.info("%s is complete (step %d, mIoU %.2f); nothing to train", workdir, latest, 100 * summary["miou"])
        return summary

    graphdef, state, imagenet_params, optimizer = create_train_state(config, mesh, num_steps)
    train_iterator = data.make_train_iterator(
        config.data, seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    start_step = 0
    if latest is not None:  # the newest good step (damaged newer ones are reported and skipped)
        state, data_state, start_step = checkpointer.restore(checkpointing.abstract_like(state))
        train_iterator.set_state(data_state)
        logging.info("resumed at step %d", start_step)

    train_step = jit_train_step(config, graphdef, optimizer, mesh, num_steps)
    run_eval = _eval_setup(config, graphdef, mesh, class_list)
    writer = reporting.MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start_step)
    if start_step == 0 and jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    def is_eval_step(step: int) -> bool:
        return step % train_config.eval_every == 0 or step == num_steps

    def evaluate_step(step: int) -> dict:
        summary = run_eval(state.params, state.batch_stats)
        _log_evaluation(workdir, step, summary, writer, class_list.palette)
        return summary

    batches = BatchFeeder(train_iterator, mesh, config.data.prefetch)
    last_summary: dict = {}
    status, done_step = "", start_step
    try:
        if start_step and is_eval_step(start_step) and _saved_evaluation(workdir, start_step) is None:
            logging.info("step %d was saved but its evaluation did not finish: evaluating it", start_step)
            last_summary = evaluate_step(start_step)
        train_metrics = _TrainMetrics(writer, num_steps, start_step)
        for step in range(start_step + 1, num_steps + 1):
            state, metrics = train_step(state, batches.next(), imagenet_params)
            done_step = step
            if step < num_steps:
                batches.place_next()  # overlaps the step just dispatched
            train_metrics.add(step, metrics)
            stopping = stop.reached()
            log_now = step % train_config.log_every == 0 or step == num_steps or stopping
            save_now = step % train_config.checkpoint_every == 0 or is_eval_step(step) or stopping
            if log_now or save_now:
                scalars = train_metrics.read()
                bad = _nonfinite_names(scalars)
                if log_now or bad:  # a NaN is always logged, so the report shows it
                    train_metrics.log(step, scalars)
                if bad:
                    last_good = checkpointer.latest_step()
                    kept = f"the last good checkpoint is step {last_good}" if last_good else "no checkpoint was saved"
                    raise NonFiniteError(
                        f"non-finite {', '.join(bad)} at step {step} (mean over the steps since the last log); "
                        f"stopped without saving: {kept}. Lower config.optim.learning_rate (or check the data) "
                        "and rerun with the same --workdir to resume from it"
                    )
            eval_metrics = None
            try:
                if is_eval_step(step):
                    last_summary = evaluate_step(step)
                    if math.isfinite(last_summary["miou"]):
                        eval_metrics = {"miou": float(last_summary["miou"])}
            finally:
                # Saved even when the evaluation raised (then unranked): the metric that
                # ranks the best checkpoint can only be given to the save itself.
                if save_now:
                    _check_and_save(
                        checkpointer, writer, step, state, batches.consumed_state,
                        metrics=eval_metrics, force=stopping,
                    )  # fmt: skip
            if stopping:
                raise RunStopped(
                    f"stopped at step {step} by signal {stop.signum} after saving it; "
                    "rerun with the same --workdir to resume",
                    stop.signum,
                )
    except NonFiniteError as error:
        status = f"stopped: {error}"
        raise
    finally:
        batches.close()
        writer.close()
        if jax.process_index() == 0 and (status or done_step >= num_steps):
            reporting.write_final_report(workdir, config_summary=_config_summary(config), status=status)
    return last_summary


def make_run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The data mesh of `config.num_devices`, with every batch size checked against it."""
    try:
        mesh = parallel.make_mesh(config.num_devices)
        parallel.check_batch_size("data.batch_size", config.data.batch_size, mesh)
    except ValueError as error:
        raise RunError(str(error)) from None
    eval_batch = parallel.padded_batch_size(config.data.eval_batch_size, mesh)
    logging.info(
        "mesh of %d devices (processes x devices: %d x %d); global batch %d per domain, eval batch %d%s",
        mesh.size, jax.process_count(), len(parallel.local_mesh_devices(mesh)), config.data.batch_size,
        eval_batch, "" if eval_batch == config.data.eval_batch_size else
        f" (config.data.eval_batch_size={config.data.eval_batch_size} padded to the mesh)",
    )  # fmt: skip
    return mesh


def _check_datasets(config: ml_collections.ConfigDict, *, eval_only: bool) -> data.ClassList:
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


def _config_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    encoder = config.model.encoder
    return {
        "method": config.method,
        "source -> target": f"{config.data.source} -> {config.data.target or '(none)'}",
        "encoder": f"MiT dims {tuple(encoder.embed_dims)} depths {tuple(encoder.depths)}",
        "head": config.model.head,
        "steps": config.train.num_steps,
        "batch (per domain)": config.data.batch_size,
        "crop": tuple(config.data.crop_hw),
    }


# ---------------------------------------------------------------------------- evaluation mode


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None) -> dict[str, dict]:
    """`--mode=eval`: evaluates the run in `workdir`, or each run below it (a comparison's
    `<method>[/seed_<k>]` folders), each with its own method. Returns {run folder: summary}.

    Reads only: the one file written is each run's `eval/step_<N>_eval_mode.json`, and
    only where the run already has an `eval/` folder; otherwise the table is just printed.
    """
    runs = find_runs(workdir)
    results = {}
    for run_dir in runs:
        results[os.path.relpath(run_dir, workdir)] = evaluate_checkpoint(config, run_dir, step=step)
    if len(runs) > 1:
        table = comparison_table({name: [summary] for name, summary in results.items()})
        print(f"evaluation of the runs in {workdir}:\n{table}", flush=True)
    return results


_CHECKPOINTS = "checkpoints"  # RunCheckpointer's folder in a run directory


def find_runs(workdir: str) -> list[str]:
    """`workdir` if it holds checkpoints/, else its run folders up to two levels down."""
    if not os.path.isdir(workdir):
        raise RunError(f"--workdir={workdir} does not exist; pass the folder of a training run")
    if os.path.isdir(os.path.join(workdir, _CHECKPOINTS)):
        return [workdir]
    runs = []
    for child in sorted(os.listdir(workdir)):
        folder = os.path.join(workdir, child)
        if not os.path.isdir(folder):
            continue
        if os.path.isdir(os.path.join(folder, _CHECKPOINTS)):
            runs.append(folder)
        else:
            runs += [os.path.join(folder, grandchild) for grandchild in sorted(os.listdir(folder))
                     if os.path.isdir(os.path.join(folder, grandchild, _CHECKPOINTS))]  # fmt: skip
    if not runs:
        raise RunError(f"no checkpoint in --workdir={workdir} (nor in its subfolders); train first, or pass a run's folder")
    return runs


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None, pretrained: str = ""
) -> dict:
    """Evaluates a run checkpoint of `workdir` (latest good or `step`; only the student's
    parameters and BN statistics are read) or an imported pretrained model."""
    mesh = make_run_mesh(config)
    class_list = _check_datasets(config, eval_only=True)
    if pretrained:
        from t2s_jax.models import load_segmentor

        model = load_segmentor(pretrained)
        graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params, batch_stats = jax.device_put((params, batch_stats), parallel.replicated(mesh))
        label = pretrained
    else:
        config = _with_saved_method(config, workdir)
        graphdef, abstract_params, abstract_batch_stats = _abstract_model_state(config, mesh)
        checkpointer = checkpointing.RunCheckpointer(workdir, read_only=True)
        (params, batch_stats), step = checkpointer.restore_model(abstract_params, abstract_batch_stats, step)
        checkpointer.close()
        label = f"{workdir} step {step}"
    summary = _eval_setup(config, graphdef, mesh, class_list)(params, batch_stats)
    logging.info("evaluation of %s:\n%s", label, evaluate.format_iou_table(summary))
    if pretrained:
        output = os.path.join(workdir, "eval", "pretrained_eval_mode.json")
    else:
        output = os.path.join(workdir, "eval", f"step_{step}_eval_mode.json")
    if jax.process_index() == 0 and (pretrained or os.path.isdir(os.path.dirname(output))):
        evaluate.write_eval_json(output, summary)
        logging.info("wrote %s", output)
    return summary


def _abstract_model_state(config, mesh) -> tuple[nnx.GraphDef, Any, Any]:
    """The student's graph and the shapes/shardings of its parameters and BN statistics
    (the restore target; nothing is initialised or compiled)."""
    model_config = model_config_for_run(config)
    model = nnx.eval_shape(lambda: build_segmentor(model_config, rngs=nnx.Rngs(0)))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    sharding = parallel.replicated(mesh)
    params, batch_stats = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), (params, batch_stats)
    )
    return graphdef, params, batch_stats


def _with_saved_method(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The method decides the model's shape (projector or not): a copy of `config` with the run's own."""
    saved_path = os.path.join(workdir, "config.json")
    if not os.path.exists(saved_path):
        return config
    with open(saved_path) as f:
        saved_method = json.load(f).get("method", config.method)
    if saved_method == config.method:
        return config
    logging.info("%s was trained with method=%s; evaluating it as such", workdir, saved_method)
    return methods.with_method(config, saved_method)


# ---------------------------------------------------------------------------- several methods


def train_methods(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[dict]]:
    """Trains each of `config.compare_methods` for each seed of `config.compare_seeds` (default:
    `config.seed`) in `<workdir>/<method>[/seed_<k>]` and prints their mIoU side by side.

    A stop signal stops the whole comparison (RunStopped) after the current run's
    checkpoint; a rerun skips the finished runs (their saved final evaluations fill the
    table) and resumes the one that stopped.
    """
    seeds = tuple(config.get("compare_seeds") or (config.seed,))
    prepare_workdir(workdir)
    results: dict[str, list[dict]] = {}
    with _stop_signals(), _workdir_lock(workdir):
        for method in config.compare_methods:
            for seed in seeds:
                run_config = methods.with_method(config, method)
                run_config.seed = seed
                run_dir = os.path.join(workdir, method) if len(seeds) == 1 else os.path.join(workdir, method, f"seed_{seed}")
                results.setdefault(method, []).append(train_and_evaluate(run_config, run_dir))
    table = comparison_table(results)
    print(table, flush=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "comparison.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(workdir, "comparison.json"), "w") as f:
            json.dump(
                {
                    method: [{"seed": seed, "miou": _json_float(s["miou"]),
                              "per_class_iou": [_json_float(x) for x in s["per_class_iou"]]}
                             for seed, s in zip(seeds, summaries)]
                    for method, summaries in results.items()
                },
                f,
                indent=2,
            )
    return results


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def comparison_table(results: dict[str, list[dict]]) -> str:
    """Per-class IoU and mIoU (%) of several methods, one column each; mean +- std over seeds."""
    methods = list(results)
    class_names = results[methods[0]][0]["class_names"]  # the runs share the eval dataset
    lines = ["| class | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for index, name in enumerate(class_names):
        cells = [_mean_std([s["per_class_iou"][index] for s in results[m]]) for m in methods]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [f"**{_mean_std([s['miou'] for s in results[m]])}**" for m in methods]
    lines.append("| **mIoU** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return "n/a"
    mean = 100 * float(np.mean(values))
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * float(np.std(values)):.1f}"
