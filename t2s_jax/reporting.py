"""Observability: scalars to TensorBoard and JSONL, the progress line, the final report.

Layout under a run's workdir:
  metrics.jsonl   one JSON object per `write_scalars` call: {"step": int, "wall_time": unix
                  seconds, name: value, ...}; non-finite values are written as null. A resumed
                  run first drops the records after its checkpoint's step (they are logged
                  again as the steps are recomputed), then appends.
  tensorboard/    TensorBoard event files (tensorboardX: no TensorFlow needed). A resumed run
                  starts a new event file whose first event tells TensorBoard to hide the
                  older files' events after the checkpoint's step (tensorboardX `purge_step`).
  report.md, report.png   written by `write_final_report` at the end of a run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from t2s_jax import jsonio  # noqa: E402


def _import_tensorboardx():
    # tensorboardX imports torch whenever it is installed, only to accept torch tensors:
    # 5-10 s of start-up for every run. Hide it during the import unless it is loaded anyway.
    if "torch" in sys.modules:
        import tensorboardX
    else:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
        try:
            import tensorboardX
        finally:
            del sys.modules["torch"]
    return tensorboardX


tensorboardX = _import_tensorboardx()

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORT_FILE = "report.md"
PLOT_FILE = "report.png"
_RESERVED = ("step", "wall_time")


class MetricWriter:
    """Writes every scalar to TensorBoard and to `metrics.jsonl`.

    Create it with `enabled=(jax.process_index() == 0)`: the other processes get a writer
    that does nothing, so the calling code needs no branches. `resume_step`: the step the
    run continues from (0 for a fresh start); records after it, left by an interrupted
    run, are dropped from `metrics.jsonl` and hidden in TensorBoard, so every step is
    logged once. None appends to whatever is there.
    """

    def __init__(self, workdir: str, enabled: bool = True, *, resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        if resume_step is not None and os.path.exists(path):
            _drop_records_after(path, resume_step)
        self._tensorboard = tensorboardX.SummaryWriter(
            logdir=os.path.join(workdir, TENSORBOARD_DIR),
            purge_step=None if resume_step is None else resume_step + 1,
        )
        self._jsonl = open(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Logs `scalars` (host numbers or 0-d arrays) at `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), "wall_time": time.time()}
        for name, value in scalars.items():
            if name in _RESERVED:
                raise ValueError(f"scalar name {name!r} is reserved in {METRICS_FILE}")
            record[name] = float(value)
            self._tensorboard.add_scalar(name, record[name], int(step))
        self._jsonl.write(jsonio.dumps(record) + "\n")

    def flush(self) -> None:
        """Puts everything written so far on disk (the loop calls it before each checkpoint)."""
        if self.enabled:
            self._tensorboard.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()
            self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites `path` without the records of steps after `step` (atomically: a crash keeps the old file)."""
    with open(path) as file:
        lines = file.readlines()
    kept = [line for line in lines if not line.strip() or _record_step(line) <= step]
    if len(kept) == len(lines) and (not lines or lines[-1].endswith("\n")):
        return
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        file.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
    os.replace(temporary, path)


def _record_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return math.inf  # a line cut short by a kill: dropped with the records after the step


def read_metrics(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`metrics.jsonl` as {name: (steps, values)} sorted by step (nan for null), including
    'wall_time'. For a step logged twice (a resumed run) the last value written wins."""
    path = os.path.join(workdir, METRICS_FILE)
    by_name: dict[str, dict[int, float]] = {}
    with open(path) as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{line_number}: not a metrics record ({error})") from error
            for name, value in jsonio.nan_for_null(record).items():
                by_name.setdefault(name, {})[step] = float(value)
    series = {}
    for name, values in by_name.items():
        steps = np.array(sorted(values), np.int64)
        series[name] = (steps, np.array([values[step] for step in steps], np.float64))
    return series


# ------------------------------------------------------------------ progress line


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_progress(step: int, num_steps: int, steps_per_sec: float, scalars: Mapping[str, float]) -> str:
    """'step 1200/40000 (3.0%) | 1.52 steps/s | ETA 7:05:12 | loss_src 0.4123 ...'."""
    rate_known = math.isfinite(steps_per_sec) and steps_per_sec > 0
    eta = (num_steps - step) / steps_per_sec if rate_known else math.nan
    parts = [
        f"step {step}/{num_steps} ({100 * step / max(num_steps, 1):.1f}%)",
        f"{steps_per_sec:.2f} steps/s" if rate_known else "? steps/s",
        f"ETA {_duration(eta)}",
    ]
    if scalars:
        parts.append(" ".join(f"{name} {float(value):.4g}" for name, value in scalars.items()))
    return " | ".join(parts)


# ------------------------------------------------------------------ final report


def _last_finite(steps: np.ndarray, values: np.ndarray) -> tuple[int, float] | None:
    finite = np.flatnonzero(np.isfinite(values))
    return (int(steps[finite[-1]]), float(values[finite[-1]])) if finite.size else None


def _plot(series: Mapping[str, tuple[np.ndarray, np.ndarray]], losses: list[str], mious: list[str], path: str) -> None:
    figure, (loss_axis, miou_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in losses:
        loss_axis.plot(*series[name], label=name, linewidth=1)
    loss_axis.set(title="losses", xlabel="step")
    for name in mious:
        miou_axis.plot(series[name][0], 100 * series[name][1], marker="o", label=name)
    miou_axis.set(title="mIoU (%)", xlabel="step")
    for axis, names in ((loss_axis, losses), (miou_axis, mious)):
        if names:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=axis.transAxes)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=100, format="png")
    finally:
        plt.close(figure)


def write_final_report(
    workdir: str,
    config_summary: str | Mapping[str, object] = "",
    miou_name: str = "eval/miou",
    status: str = "",
) -> tuple[str, str]:
    """Writes `report.md` (final and best mIoU, last losses, run time, the config) and
    `report.png` (losses and mIoU over steps) into `workdir` from its `metrics.jsonl`.

    Losses are the scalars whose name contains 'loss'; the mIoU curve is `miou_name`
    (the other `.../miou*` scalars beside it are listed too). Each loss shows its last
    logged value, nan included, and then the last finite one if that differs. `status`
    (e.g. why the run stopped) heads the report. Returns both paths.
    """
    series = read_metrics(workdir)
    metric_names = sorted(name for name in series if name != "wall_time")
    losses = [name for name in metric_names if "loss" in name.rsplit("/", 1)[-1]]
    miou_prefix = f"{miou_name.rsplit('/', 1)[0]}/miou" if "/" in miou_name else "miou"
    mious = [name for name in metric_names if name.startswith(miou_prefix)]

    lines = ["# Run report", "", f"- workdir: `{os.path.abspath(workdir)}`"]
    if status:
        lines.append(f"- status: {status}")
    last_step = max(int(steps[-1]) for steps, _ in series.values()) if series else 0
    lines.append(f"- last step logged: {last_step}")
    if "wall_time" in series:
        wall = series["wall_time"][1]
        lines.append(f"- run time (first to last log line): {_duration(float(np.nanmax(wall) - np.nanmin(wall)))}")

    lines += ["", "## mIoU", ""]
    if miou_name in series and (final := _last_finite(*series[miou_name])):
        steps, values = series[miou_name]
        best = int(np.nanargmax(values))
        lines += ["| | step | " + " | ".join(mious) + " |", "|---|---:|" + "---:|" * len(mious)]
        for label, step in (("final", final[0]), ("best", int(steps[best]))):
            cells = []
            for name in mious:
                at = np.flatnonzero(series[name][0] == step)
                cells.append(f"{100 * series[name][1][at[0]]:.2f}" if at.size else "")
            lines.append(f"| {label} | {step} | " + " | ".join(cells) + " |")
        lines += ["", f"mIoU in %; best by `{miou_name}`."]
    else:
        lines.append(f"No `{miou_name}` logged.")

    lines += ["", "## Last losses", ""]
    if losses:
        lines += ["| name | step | value | last finite (step) |", "|---|---:|---:|---:|"]
        for name in losses:
            steps, values = series[name]
            finite = _last_finite(steps, values)
            before = "" if finite is None or finite[0] == steps[-1] else f"{finite[1]:.4g} ({finite[0]})"
            lines.append(f"| {name} | {steps[-1]} | {values[-1]:.4g} | {before} |")
    else:
        lines.append("No losses logged.")

    if config_summary:
        if isinstance(config_summary, Mapping):
            config_summary = "\n".join(f"{key}: {value}" for key, value in config_summary.items())
        lines += ["", "## Config", "", "```", str(config_summary).rstrip(), "```"]
    lines += ["", f"![losses and mIoU]({PLOT_FILE})", ""]

    report_path, plot_path = os.path.join(workdir, REPORT_FILE), os.path.join(workdir, PLOT_FILE)
    _write_whole(plot_path, lambda temporary: _plot(series, losses, mious, temporary))
    _write_whole(report_path, lambda temporary: _write_text(temporary, "\n".join(lines)))
    return report_path, plot_path


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _write_whole(path: str, write: Callable[[str], object]) -> None:
    """`write(temporary)`, then renamed to `path`: a failed write (a full disk) leaves no part."""
    temporary = f"{path}.tmp"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
