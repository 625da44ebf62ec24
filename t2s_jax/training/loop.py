"""The training loop: one run of `config.method` in a workdir, resumed from its newest good
checkpoint, with logging, evaluation and checkpoints.

No model math lives here (that is `steps.py`, `uda/` and `models/`). What the loop guarantees
when things go wrong (non-finite values, kills, failed saves, signals, a busy workdir, a full
disk, damaged derived files) is listed in docs/reliability.md.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from t2s_jax import checkpointing, data, parallel, reporting
from t2s_jax.models import encoders
from t2s_jax.training import evaluation
from t2s_jax.training.control import NonFiniteError, RunError, RunStopped, prepare_workdir
from t2s_jax.training.coordination import StopSignals, stop_signals, workdir_lock
from t2s_jax.training.feeding import BatchFeeder, check_datasets
from t2s_jax.training.train_state import create_train_state, jit_train_step, make_run_mesh


class _TrainMetrics:
    """The step metrics, summed on the device; the host reads them (one transfer) only at
    logging and checkpoint steps, and logs their mean since the last log."""

    def __init__(self, writer: reporting.MetricWriter, workdir: str, num_steps: int, start_step: int):
        self._writer, self._workdir = writer, workdir
        self._num_steps, self._start_step = num_steps, start_step
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
        with evaluation.writing("the metrics in", self._workdir):
            self._writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
        logging.info(reporting.format_progress(step, self._num_steps, steps_per_sec, scalars))
        self._sums, self._count = None, 0
        self._timer_step, self._timer_start = step, time.perf_counter()


def _nonfinite_names(scalars: dict[str, float]) -> list[str]:
    return sorted(name for name, value in scalars.items() if not math.isfinite(value))


def _check_and_save(checkpointer, writer, workdir, step, state, data_state, *, metrics, force: bool) -> None:
    """Saves `step` after the last guards: a finite state, and the logs on disk first (a
    kill after the save then never loses the records of the steps it covers)."""
    if not checkpointing.all_finite(state):
        raise NonFiniteError(
            f"the model state became NaN/Inf at step {step} (the losses logged before it were finite); "
            f"not saved, the checkpoints in {checkpointer.directory} are kept. Lower "
            "config.optim.learning_rate and rerun with the same --workdir to resume from the last one"
        )
    with evaluation.writing("the metrics in", workdir):
        writer.flush()
    checkpointer.save(step, state, data_state, metrics=metrics, force=force)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.method` in `workdir`, resuming from its newest good checkpoint, and
    returns the final evaluation. A finished run returns its saved final evaluation
    without building anything.

    Raises RunError (NonFiniteError, RunStopped after a stop signal, a busy or unusable
    workdir, a bad layout, a full disk) or checkpointing.CheckpointError (a failed save)
    with a one-line message: `t2s_jax.main` prints it and exits non-zero.
    """
    mesh = make_run_mesh(config)
    class_list = check_datasets(config, eval_only=False)
    prepare_workdir(workdir)
    with stop_signals() as stop, workdir_lock(workdir):
        checkpointer = checkpointing.RunCheckpointer(workdir, keep=config.train.keep_checkpoints)
        try:
            return _train(config, workdir, mesh, class_list, checkpointer, stop)
        finally:
            checkpointer.close()


def _train(config, workdir, mesh, class_list, checkpointer, stop: StopSignals) -> dict:
    num_steps, train_config = config.train.num_steps, config.train
    latest = checkpointer.latest_step()
    if latest is not None and latest >= num_steps and (summary := evaluation.saved_evaluation(workdir, latest)):
        logging.info("%s is complete (step %d, mIoU %.2f); nothing to train", workdir, latest, 100 * summary["miou"])
        if jax.process_index() == 0 and not os.path.exists(os.path.join(workdir, reporting.REPORT_FILE)):
            _write_report(workdir, config, status="")  # the run's last attempt could not write it
        return summary

    graphdef, state, imagenet_variables, optimizer = create_train_state(config, mesh, num_steps)
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
    run_eval = evaluation.make_evaluator(config, graphdef, mesh, class_list)
    with evaluation.writing("the metrics in", workdir):
        writer = reporting.MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start_step)
    if start_step == 0 and jax.process_index() == 0:
        config_path = os.path.join(workdir, "config.json")
        with evaluation.writing("the run's config", config_path), open(config_path, "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    def is_eval_step(step: int) -> bool:
        return step % train_config.eval_every == 0 or step == num_steps

    def evaluate_step(step: int) -> dict:
        summary = run_eval(state.params, state.batch_stats)
        evaluation.record_evaluation(workdir, step, summary, writer, class_list.palette)
        return summary

    batches = BatchFeeder(train_iterator, mesh, config.data.prefetch)
    last_summary: dict = {}
    status, failed, done_step = "", False, start_step
    try:
        if start_step and is_eval_step(start_step) and evaluation.saved_evaluation(workdir, start_step) is None:
            logging.info("step %d was saved but its evaluation did not finish: evaluating it", start_step)
            last_summary = evaluate_step(start_step)
        train_metrics = _TrainMetrics(writer, workdir, num_steps, start_step)
        for step in range(start_step + 1, num_steps + 1):
            state, metrics = train_step(state, batches.next(), imagenet_variables)
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
                        checkpointer, writer, workdir, step, state, batches.consumed_state,
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
    except BaseException:
        failed = True
        raise
    finally:
        batches.close()
        _close_outputs(workdir, config, writer, status=status, finished=done_step >= num_steps and not failed,
                       failing=failed or bool(status))  # fmt: skip
    return last_summary


def _close_outputs(workdir, config, writer, *, status: str, finished: bool, failing: bool) -> None:
    """Closes the metrics and writes the report (of a finished or NaN-stopped run). When the
    run is already failing, a failed write here is one warning line, not a second error."""
    try:
        with evaluation.writing("the metrics in", workdir):
            writer.close()
        if jax.process_index() == 0 and (status or finished):
            _write_report(workdir, config, status=status)
    except RunError as error:
        if not failing:
            raise
        logging.warning("%s", error)


def _write_report(workdir: str, config: ml_collections.ConfigDict, *, status: str) -> None:
    with evaluation.writing("the report in", workdir):
        try:
            reporting.write_final_report(workdir, config_summary=_config_summary(config), status=status)
        except ValueError as error:  # a damaged metrics.jsonl: the report is derived, the run is not
            logging.warning("no report written: %s", error)


def _config_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {
        "method": config.method,
        "source -> target": f"{config.data.source} -> {config.data.target or '(none)'}",
        "encoder": encoders.describe(config.model.encoder),
        "head": config.model.head,
        "steps": config.train.num_steps,
        "batch (per domain)": config.data.batch_size,
        "crop": tuple(config.data.crop_hw),
    }
