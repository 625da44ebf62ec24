"""`--mode=eval`: evaluates the saved checkpoints of a run, or of each run of a comparison,
or an imported pretrained segmentor. Reads only (see `evaluate_workdir`)."""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
from flax import nnx

from t2s_jax import checkpointing, evaluate, methods, parallel
from t2s_jax.training.comparison import comparison_table
from t2s_jax.training.control import RunError
from t2s_jax.training.evaluation import make_evaluator
from t2s_jax.training.feeding import check_datasets
from t2s_jax.training.train_state import abstract_model_state, make_run_mesh

_CHECKPOINTS = "checkpoints"  # RunCheckpointer's folder in a run directory


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None) -> dict[str, dict]:
    """Evaluates the run in `workdir`, or each run below it (a comparison's
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
    class_list = check_datasets(config, eval_only=True)
    if pretrained:
        from t2s_jax.models import load_segmentor

        model = load_segmentor(pretrained)
        graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params, batch_stats = jax.device_put((params, batch_stats), parallel.replicated(mesh))
        label = pretrained
    else:
        config = _with_saved_method(config, workdir)
        graphdef, abstract_params, abstract_batch_stats = abstract_model_state(config, mesh)
        checkpointer = checkpointing.RunCheckpointer(workdir, read_only=True)
        (params, batch_stats), step = checkpointer.restore_model(abstract_params, abstract_batch_stats, step)
        checkpointer.close()
        label = f"{workdir} step {step}"
    summary = make_evaluator(config, graphdef, mesh, class_list)(params, batch_stats)
    logging.info("evaluation of %s:\n%s", label, evaluate.format_iou_table(summary))
    if pretrained:
        output = os.path.join(workdir, "eval", "pretrained_eval_mode.json")
    else:
        output = os.path.join(workdir, "eval", f"step_{step}_eval_mode.json")
    if jax.process_index() == 0 and (pretrained or os.path.isdir(os.path.dirname(output))):
        evaluate.write_eval_json(output, summary)
        logging.info("wrote %s", output)
    return summary


def _with_saved_method(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The method decides the model's shape (projector or not): a copy of `config` with the run's own."""
    saved_path = os.path.join(workdir, "config.json")
    if not os.path.exists(saved_path):
        return config
    try:
        with open(saved_path) as f:
            saved_method = json.load(f).get("method", config.method)
    except (OSError, ValueError, AttributeError) as error:
        logging.warning("%s is unreadable (%s): evaluating with method=%s of --config", saved_path, error, config.method)
        return config
    if saved_method == config.method:
        return config
    logging.info("%s was trained with method=%s; evaluating it as such", workdir, saved_method)
    return methods.with_method(config, saved_method)
