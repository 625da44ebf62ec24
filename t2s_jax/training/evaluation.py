"""The evaluation pass of a run and the files it leaves: `eval/step_<N>.json` (written last:
its presence says the evaluation of step N is complete and logged), the prediction
pictures and the `eval/*` scalars of `metrics.jsonl`.

These files are derived from the checkpoint: one that cannot be read is set aside
(`<name>.damaged`, with a warning) and the step is evaluated again.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections

from t2s_jax import data, evaluate, hosts, jsonio, parallel, reporting
from t2s_jax.training.control import RunError, disk_error

_RERUN = "rerun with the same --workdir to resume from the last checkpoint"


@contextlib.contextmanager
def writing(what: str, path: str) -> Iterator[None]:
    """Turns a failed write of a run's file (a full disk) into its one-line RunError."""
    try:
        yield
    except OSError as error:
        raise disk_error(what, path, error, _RERUN) from None


def make_evaluator(
    config: ml_collections.ConfigDict, graphdef, mesh: jax.sharding.Mesh, class_list: data.ClassList
) -> Callable[..., dict]:
    """`run(params, batch_stats) -> summary` over the eval split. The global eval batch is
    `data.eval_batch_size` rounded up to a multiple of the mesh's devices; the padding
    examples (valid=False) are scored nowhere, so any eval_batch_size works on any mesh."""
    eval_step = evaluate.make_eval_step(
        graphdef, mesh, config.eval, config.model.num_classes, hosts.build_host(config).eval_logits
    )
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


def eval_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "eval", f"step_{step}.json")


def record_evaluation(workdir: str, step: int, summary: dict, writer: reporting.MetricWriter, palette) -> None:
    """Logs `summary` of `step`: the table, the scalars, the pictures, then `eval_path`."""
    logging.info("step %d evaluation:\n%s", step, evaluate.format_iou_table(summary))
    with writing("the metrics in", workdir):
        writer.write_scalars(step, _scalar_items(summary))
        writer.flush()
    if jax.process_index() != 0:
        return
    if pictures := summary.get("pictures"):
        folder = os.path.join(workdir, "pictures")
        try:
            evaluate.save_prediction_pictures(folder, step, *pictures, palette=palette)
        except OSError as error:
            for partial in glob.glob(os.path.join(glob.escape(folder), f"step_{step:06d}_*.png")):
                os.remove(partial)
            raise disk_error(f"the prediction pictures of step {step} in", folder, error, _RERUN) from None
    path = eval_path(workdir, step)
    with writing(f"the evaluation of step {step},", path):
        evaluate.write_eval_json(path, summary)


def _scalar_items(summary: dict) -> dict[str, float]:
    scalars = {f"eval/{k}": float(v) for k, v in summary.items() if k.startswith("miou")}
    for name, iou in zip(summary["class_names"], summary["per_class_iou"]):
        scalars[f"eval_iou/{name.replace(' ', '_')}"] = float(iou)
    return scalars


def saved_evaluation(workdir: str, step: int) -> dict | None:
    """The summary `record_evaluation` wrote for `step`, or None when there is none or it
    cannot be read (then it is set aside as `<path>.damaged` and the caller evaluates again)."""
    path = eval_path(workdir, step)
    if not os.path.exists(path):
        return None
    try:
        summary = jsonio.read(path)
        if not (isinstance(summary, dict) and {"miou", "per_class_iou", "class_names"} <= set(summary)):
            raise ValueError("not an evaluation summary")
    except (OSError, ValueError) as error:
        set_aside(path, f"{type(error).__name__}: {error}", f"evaluating step {step} again from its checkpoint")
        return None
    return summary


def set_aside(path: str, why: str, then: str) -> None:
    """Renames the damaged derived file `path` to `<path>.damaged`, in one warning line."""
    aside = f"{path}.damaged"
    if jax.process_index() == 0:
        try:
            os.replace(path, aside)
        except OSError as error:
            raise RunError(f"{path} is damaged ({why}) and cannot be moved aside: {error.strerror}; delete it") from None
    logging.warning("%s is damaged (%s): moved to %s; %s", path, why, aside, then)
