"""The training loop: mesh, data, state create/restore, jitted steps, logging, evaluation, checkpoints.

No model math lives here (that is `steps.py`, `uda/` and `models/`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t2s_jax import checkpointing, data, evaluate, methods, parallel, reporting, steps
from t2s_jax.models import build_segmentor, maybe_load_pretrained
from t2s_jax.optim import make_optimizer


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
    with_mask_teacher = steps.mask_teacher_alpha(methods.build_terms(config)) is not None

    def initial_state(params, batch_stats):
        state = steps.initial_train_state(
            params, batch_stats, optimizer, config.seed, with_mask_teacher=with_mask_teacher
        )
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


class DevicePrefetcher:
    """Fetches host batches and places them on the mesh in a background thread.

    Each queued batch travels with the data iterator state *after* it, so a checkpoint
    records exactly the batches consumed by the steps, not the ones prefetched.
    """

    def __init__(self, iterator, mesh: jax.sharding.Mesh, depth: int):
        self._iterator = iterator
        self._mesh = mesh
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self.consumed_state = iterator.get_state()
        self._thread.start()

    def _fill(self):
        try:
            while not self._stop.is_set():
                host_batch = next(self._iterator)
                item = (parallel.global_batch(host_batch, self._mesh), self._iterator.get_state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # surfaced in the training thread
            self._queue.put(error)

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self.consumed_state = item
        return batch

    def close(self):
        self._stop.set()


# ---------------------------------------------------------------------------- the loop


class _TerminationFlag:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        logging.warning("signal %d: checkpointing and stopping after this step", signum)
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _eval_setup(config, graphdef, mesh, class_list):
    eval_step = evaluate.make_eval_step(graphdef, mesh, config.eval, config.model.num_classes)

    def run(params, batch_stats) -> dict:
        iterator = data.make_eval_iterator(
            config.data, process_index=jax.process_index(), process_count=jax.process_count()
        )
        return evaluate.evaluate(
            eval_step, (params, batch_stats), iterator, mesh, class_list.names,
            num_pictures=config.train.num_pictures,
        )

    return run


def _log_evaluation(workdir, step, summary, writer, palette):
    logging.info("step %d evaluation:\n%s", step, evaluate.format_iou_table(summary))
    if jax.process_index() == 0:
        evaluate.write_eval_json(os.path.join(workdir, "eval", f"step_{step}.json"), summary)
        pictures = summary.get("pictures")
        if pictures:
            evaluate.save_prediction_pictures(
                os.path.join(workdir, "pictures"), step, *pictures, palette=palette
            )
    writer.write_scalars(step, _scalar_items(summary))


def _scalar_items(summary: dict) -> dict[str, float]:
    scalars = {f"eval/{k}": float(v) for k, v in summary.items() if k.startswith("miou")}
    for name, iou in zip(summary["class_names"], summary["per_class_iou"]):
        scalars[f"eval_iou/{name.replace(' ', '_')}"] = float(iou)
    return scalars


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.method`, resuming from `workdir` when it holds a checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    num_steps = config.train.num_steps
    mesh = parallel.make_mesh(config.num_devices)
    logging.info("mesh %s over %d devices, %d processes", mesh.shape, jax.device_count(), jax.process_count())
    if config.data.batch_size % mesh.size:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} must be divisible by the "
            f"{mesh.size} devices (one global batch sharded on the data axis)"
        )
    data.ensure_prepared(config.data.source, config.data.data_dir)
    if config.data.target:
        data.ensure_prepared(config.data.target, config.data.data_dir)
    data.ensure_prepared(config.data.eval_dataset, config.data.data_dir)
    class_list = data.check_classes(config)

    graphdef, state, imagenet_params, optimizer = create_train_state(config, mesh, num_steps)
    checkpointer = checkpointing.RunCheckpointer(workdir, keep=config.train.keep_checkpoints)
    train_iterator = data.make_train_iterator(
        config.data, seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if checkpointer.latest_step() is not None:
        state, data_state, _ = checkpointer.restore(checkpointing.abstract_like(state))
        if data_state is not None:
            train_iterator.set_state(data_state)
        logging.info("resumed at step %d", int(state.step))
    start_step = int(state.step)

    train_step = jit_train_step(config, graphdef, optimizer, mesh, num_steps)
    run_eval = _eval_setup(config, graphdef, mesh, class_list)
    writer = reporting.MetricWriter(workdir, enabled=jax.process_index() == 0)
    if start_step == 0 and jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    batches = DevicePrefetcher(train_iterator, mesh, config.data.prefetch)
    termination = _TerminationFlag()
    last_summary: dict = {}
    metric_sums, metric_count = None, 0
    timer_step, timer_start = start_step, time.perf_counter()
    try:
        for step in range(start_step + 1, num_steps + 1):
            state, metrics = train_step(state, next(batches), imagenet_params)
            # Sum on device; the host reads metrics only at logging steps.
            metric_sums = metrics if metric_sums is None else jax.tree.map(jnp.add, metric_sums, metrics)
            metric_count += 1
            if step == start_step + 1:
                logging.info("first step done (compile + run) in %.1f s", time.perf_counter() - timer_start)
                timer_step, timer_start = step, time.perf_counter()
            if step % config.train.log_every == 0 or step == num_steps or termination.requested:
                scalars = {k: float(v) / metric_count for k, v in jax.device_get(metric_sums).items()}
                elapsed = time.perf_counter() - timer_start
                steps_per_sec = (step - timer_step) / elapsed if step > timer_step else 0.0
                writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                logging.info(reporting.format_progress(step, num_steps, steps_per_sec, scalars))
                metric_sums, metric_count = None, 0
                timer_step, timer_start = step, time.perf_counter()
            eval_metrics = None
            if step % config.train.eval_every == 0 or step == num_steps:
                last_summary = run_eval(state.params, state.batch_stats)
                _log_evaluation(workdir, step, last_summary, writer, class_list.palette)
                eval_metrics = {"miou": float(last_summary["miou"])}
            if (
                step % config.train.checkpoint_every == 0
                or step == num_steps
                or eval_metrics is not None
                or termination.requested
            ):
                checkpointer.save(
                    step, state, batches.consumed_state, metrics=eval_metrics,
                    force=termination.requested,
                )
            if termination.requested:
                logging.warning("stopped at step %d; rerun with the same --workdir to resume", step)
                break
    finally:
        batches.close()
        termination.restore()
        checkpointer.close()
        writer.close()
    if int(state.step) == num_steps and jax.process_index() == 0:
        reporting.write_final_report(workdir, config_summary=_config_summary(config))
    return last_summary


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


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None, pretrained: str = ""
) -> dict:
    """Evaluates a run checkpoint of `workdir` (latest or `step`) or an imported pretrained model."""
    mesh = parallel.make_mesh(config.num_devices)
    data.ensure_prepared(config.data.eval_dataset, config.data.data_dir)
    class_list = data.check_classes(config, training=False)
    if pretrained:
        from t2s_jax.models import load_segmentor

        model = load_segmentor(pretrained)
        graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params, batch_stats = jax.device_put((params, batch_stats), parallel.replicated(mesh))
        label = pretrained
    else:
        _adopt_saved_method(config, workdir)
        num_steps = config.train.num_steps
        graphdef, state, _, _ = create_train_state(config, mesh, num_steps)
        checkpointer = checkpointing.RunCheckpointer(workdir, keep=config.train.keep_checkpoints)
        state, _, step = checkpointer.restore(checkpointing.abstract_like(state), step)
        checkpointer.close()
        params, batch_stats = state.params, state.batch_stats
        label = f"{workdir} step {step}"
    summary = _eval_setup(config, graphdef, mesh, class_list)(params, batch_stats)
    logging.info("evaluation of %s:\n%s", label, evaluate.format_iou_table(summary))
    if jax.process_index() == 0:
        name = f"step_{step}" if not pretrained else "pretrained"
        evaluate.write_eval_json(os.path.join(workdir, "eval", f"{name}_eval_mode.json"), summary)
    return summary


def _adopt_saved_method(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The method decides the model's shape (projector or not): take the run's own."""
    saved_path = os.path.join(workdir, "config.json")
    if not os.path.exists(saved_path):
        return
    with open(saved_path) as f:
        saved_method = json.load(f).get("method", config.method)
    if saved_method != config.method:
        logging.info("%s was trained with method=%s; evaluating it as such", workdir, saved_method)
        config.method = saved_method


# ---------------------------------------------------------------------------- several methods


def train_methods(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[dict]]:
    """Trains each of `config.compare_methods` for each seed of `config.compare_seeds` (default:
    `config.seed`) in `<workdir>/<method>[/seed_<k>]` and prints their mIoU side by side."""
    seeds = tuple(config.get("compare_seeds") or (config.seed,))
    results: dict[str, list[dict]] = {}
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
                    method: [{"seed": seed, "miou": float(s["miou"]),
                              "per_class_iou": [float(x) for x in s["per_class_iou"]]}
                             for seed, s in zip(seeds, summaries)]
                    for method, summaries in results.items()
                },
                f,
                indent=2,
            )
    return results


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
