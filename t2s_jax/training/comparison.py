"""Several runs side by side: each of `config.compare_methods` for each seed of
`config.compare_seeds`, and the per-class IoU table of their results."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from t2s_jax import jsonio, methods
from t2s_jax.training.control import prepare_workdir
from t2s_jax.training.coordination import stop_signals, workdir_lock
from t2s_jax.training.evaluation import writing
from t2s_jax.training.loop import train_and_evaluate


def train_methods(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[dict]]:
    """Trains each of `config.compare_methods` for each seed of `config.compare_seeds` (default:
    `config.seed`) in `<workdir>/<method>[/seed_<k>]` and prints their mIoU side by side.

    A stop signal stops the whole comparison (RunStopped) after the current run's
    checkpoint; a rerun skips the finished runs (their saved final evaluations fill the
    table) and resumes the one that stopped.
    """
    seeds = tuple(config.compare_seeds or (config.seed,))
    prepare_workdir(workdir)
    results: dict[str, list[dict]] = {}
    with stop_signals(), workdir_lock(workdir):
        for method in config.compare_methods:
            for seed in seeds:
                run_config = methods.with_method(config, method)
                run_config.seed = seed
                run_dir = os.path.join(workdir, method) if len(seeds) == 1 else os.path.join(workdir, method, f"seed_{seed}")
                results.setdefault(method, []).append(train_and_evaluate(run_config, run_dir))
    table = comparison_table(results)
    print(table, flush=True)
    if jax.process_index() == 0:
        with writing("the comparison in", workdir):
            with open(os.path.join(workdir, "comparison.md"), "w") as f:
                f.write(table + "\n")
            summaries = {
                method: [{"seed": seed, "miou": s["miou"], "per_class_iou": s["per_class_iou"]}
                         for seed, s in zip(seeds, runs)]
                for method, runs in results.items()
            }  # fmt: skip
            jsonio.write(os.path.join(workdir, "comparison.json"), summaries)
    return results


def comparison_table(results: dict[str, list[dict]]) -> str:
    """Per-class IoU and mIoU (%) of several methods, one column each; mean +- std over seeds."""
    names = list(results)
    class_names = results[names[0]][0]["class_names"]  # the runs share the eval dataset
    lines = ["| class | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for index, name in enumerate(class_names):
        cells = [_mean_std([s["per_class_iou"][index] for s in results[m]]) for m in names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [f"**{_mean_std([s['miou'] for s in results[m]])}**" for m in names]
    lines.append("| **mIoU** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return "n/a"
    mean = 100 * float(np.mean(values))
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * float(np.std(values)):.1f}"
