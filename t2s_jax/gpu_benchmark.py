r"""The GPU benchmark in one go: our steps and the PyTorch reference, side by side.

  mkdir -p .bench && cp /work/shared/bench/torch_segformer_step.py .bench/   # git-ignored
  python -m t2s_jax.gpu_benchmark --reference=.bench/torch_segformer_step.py --out=gpu_bench

Rows, each in its own process (device peak memory is process-wide) under `--row_timeout`:
`t2s_jax.bench` for source_only, daformer and t2s at the config's shapes (MiT-B5, 2 + 2 x
512^2) in bf16 with `model.attention_impl` cudnn and xla; then the PyTorch reference
(`torch_segformer_step.py`, SegFormer-B5, B = 2): a train step and a teacher forward, fp32
eager and bf16 `torch.compile`. Writes `<out>/gpu_benchmark.md` (one table of rows, one of
ratios) and `<out>/gpu_benchmark.json`, plus each row's log and JSON.

The ratio compares our T2S-DA step with the PyTorch passes of one T2S-DA step run one
after another: 3 student train steps + 2 teacher forwards + 1 frozen-encoder forward (timed
as a teacher forward, so an upper bound), B = 2 each. Goal: <= 70 ms, >= 7.8x the fp32 sum.

`--smoke` shrinks everything (tiny MiT, 64^2 crops, 2 steps, the reference on the CPU) to
test the script end to end without a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

_REFERENCE = flags.DEFINE_string("reference", None, "Path of torch_segformer_step.py (copied into the repo).")
_OUT = flags.DEFINE_string("out", "gpu_bench", "Folder for the table, the JSON and each row's log.")
_JAX_CONFIG = flags.DEFINE_string("jax_config", "configs/gta_cs_daformer.py", "Config of the t2s_jax rows.")
_JAX_METHODS = flags.DEFINE_list("jax_methods", ["source_only", "daformer", "t2s"], "t2s_jax rows: methods.")
_JAX_ATTENTION = flags.DEFINE_list("jax_attention", ["cudnn", "xla"], "t2s_jax rows: model.attention_impl values.")
_TORCH_ROWS = flags.DEFINE_list(
    "torch_rows", ["train_fp32", "teacher_fp32", "train_bf16_compile", "teacher_bf16_compile"],
    "Reference rows: {train,teacher}_{fp32,bf16_compile}.",
)  # fmt: skip
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 30, "Timed steps per row.")
_ROW_TIMEOUT = flags.DEFINE_integer("row_timeout", 420, "Seconds before a row is stopped (SIGTERM, then SIGKILL).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes, 2 steps, reference on the CPU: a test of the script.")

TARGET_STEP_MS = 70.0
TARGET_SPEEDUP = 7.8
# PyTorch passes of one T2S-DA step: student train steps, and forwards without gradients
# (2 teacher forwards + the frozen ImageNet encoder, timed as a teacher forward).
STUDENT_STEPS, FORWARDS = 3, 3
_SMOKE_OVERRIDES = (
    "--config.model.encoder.embed_dims=(16, 32, 64, 128)", "--config.model.encoder.depths=(1, 2, 1, 1)",
    "--config.model.encoder.num_heads=(1, 2, 4, 8)",
    "--config.model.head_channels=32", "--config.model.projector.hidden_channels=32",
    "--config.model.projector.dim=32", "--config.data.crop_hw=(64, 64)",
    "--config.pull.num_queries=16", "--config.pull.num_negatives=32",
    "--config.uda.pseudo_ignore_top=0", "--config.uda.pseudo_ignore_bottom=0",
)  # fmt: skip


@dataclasses.dataclass
class Row:
    name: str  # file stem and table label, e.g. jax_t2s_cudnn, torch_train_fp32
    command: list[str]
    json_path: Path
    status: str = "not run"  # ok | failed (rc N) | timeout
    wall_s: float = float("nan")
    result: dict = dataclasses.field(default_factory=dict)


def jax_rows(out: Path, *, config: str, methods, attention, steps: int, smoke: bool) -> list[Row]:
    rows = []
    for method in methods:
        for impl in attention:
            name = f"jax_{method}_{impl}"
            command = [
                sys.executable, "-m", "t2s_jax.bench", f"--config={config}", f"--methods={method}",
                "--dtypes=bfloat16", f"--steps={steps}", "--warmup=3" if not smoke else "--warmup=0",
                f"--config.model.attention_impl={impl}", f"--json={out / (name + '.json')}",
            ]  # fmt: skip
            if smoke:
                command += _SMOKE_OVERRIDES
            rows.append(Row(name, command, out / f"{name}.json"))
    return rows


def torch_rows(out: Path, reference: str, names, *, steps: int, smoke: bool) -> list[Row]:
    rows = []
    for name in names:
        mode, _, precision = name.partition("_")
        if mode not in ("train", "teacher") or precision not in ("fp32", "bf16_compile"):
            raise app.UsageError(f"--torch_rows: unknown row {name!r}; expected {{train,teacher}}_{{fp32,bf16_compile}}")
        json_path = out / f"torch_{name}.json"
        command = [sys.executable, reference, "--batch=2", f"--steps={steps}", f"--json-out={json_path}"]
        command += ["--dtype=fp32"] if precision == "fp32" else ["--dtype=bf16", "--compile"]
        if mode == "teacher":
            command.append("--teacher-forward")
        if smoke:
            command += ["--device=cpu", "--size=64", "--depths=1,1,1,1", "--warmup=1", "--no-flops"]
        rows.append(Row(f"torch_{name}", command, json_path))
    return rows


def run_row(row: Row, out: Path, timeout_s: float) -> Row:
    """Runs the row's command in its own process group; a hung row is stopped, not waited for."""
    row.json_path.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(out / f"{row.name}.log", "w") as log:
        process = subprocess.Popen(row.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
            row.status = "ok" if returncode == 0 else f"failed (rc {returncode})"
        except subprocess.TimeoutExpired:
            row.status = "timeout"
            os.killpg(process.pid, signal.SIGTERM)  # the reference still writes its JSON on SIGTERM
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    row.wall_s = time.perf_counter() - start
    if row.json_path.exists():
        text = row.json_path.read_text().strip()
        if text:
            # bench.py writes one JSON document; the reference appends one JSON line.
            record = json.loads(text) if row.name.startswith("jax_") else json.loads(text.splitlines()[-1])
            row.result = record["rows"][0] if row.name.startswith("jax_") else record
            if row.result.get("error"):
                row.status = f"{row.status}: {row.result['error'][:80]}"
    return row


def _figures(row: Row) -> dict[str, float]:
    """step (ms), first step (s), compile (s), peak memory (GiB) of a row; nan where absent."""
    nan = float("nan")
    r = row.result
    if row.name.startswith("jax_"):
        peak = r.get("memory_bytes", nan) / 2**30 if r else nan
        return dict(step_ms=r.get("step_ms", nan), first_step_s=r.get("first_step_s", nan),
                    compile_s=r.get("compile_s", nan), peak_gib=peak)  # fmt: skip
    peak = r.get("peak_mem_gb")
    return dict(step_ms=r.get("median_ms", nan), first_step_s=r.get("first_step_s", nan),
                compile_s=nan, peak_gib=nan if peak is None else peak)  # fmt: skip


def _cell(value: float, spec: str) -> str:
    return "–" if value != value else format(value, spec)  # nan -> dash


def ratios(rows: list[Row]) -> list[dict]:
    """Our T2S-DA step (each attention implementation) against each PyTorch precision's pass sum."""
    by_name = {row.name: _figures(row) for row in rows}
    out = []
    for precision in ("fp32", "bf16_compile"):
        train = by_name.get(f"torch_train_{precision}", {}).get("step_ms", float("nan"))
        forward = by_name.get(f"torch_teacher_{precision}", {}).get("step_ms", float("nan"))
        reference_ms = STUDENT_STEPS * train + FORWARDS * forward
        for row in rows:
            if row.name.startswith("jax_t2s_"):
                ours = by_name[row.name]["step_ms"]
                out.append(dict(ours=row.name, reference=precision, ours_ms=ours, reference_ms=reference_ms,
                                speedup=reference_ms / ours if ours == ours and ours > 0 else float("nan")))  # fmt: skip
    return out


def format_report(rows: list[Row], ratio_rows: list[dict], setup: str) -> str:
    lines = [f"# GPU benchmark\n\n{setup}\n",
             "| row | status | step (ms, median) | first step (s) | compile (s) | peak memory (GiB) | wall (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        f = _figures(row)
        lines.append(
            f"| {row.name} | {row.status} | {_cell(f['step_ms'], '.1f')} | {_cell(f['first_step_s'], '.1f')} "
            f"| {_cell(f['compile_s'], '.1f')} | {_cell(f['peak_gib'], '.2f')} | {_cell(row.wall_s, '.0f')} |"
        )
    lines += ["", f"PyTorch pass sum = {STUDENT_STEPS} x train step + {FORWARDS} x teacher forward (B = 2 each). "
              f"Goal: T2S-DA step <= {TARGET_STEP_MS:.0f} ms, >= {TARGET_SPEEDUP}x the fp32 sum.", "",
              "| our T2S-DA step | PyTorch reference | ours (ms) | PyTorch pass sum (ms) | speed-up |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in ratio_rows:
        lines.append(
            f"| {r['ours']} | {r['reference']} | {_cell(r['ours_ms'], '.1f')} | {_cell(r['reference_ms'], '.1f')} "
            f"| {_cell(r['speedup'], '.2f')}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    reference = _REFERENCE.value
    if _TORCH_ROWS.value and not (reference and Path(reference).is_file()):
        raise app.UsageError(
            f"--reference={reference!r} is not a file: copy /work/shared/bench/torch_segformer_step.py "
            "into the repository first (mkdir -p .bench && cp ... .bench/), or pass --torch_rows= for no reference rows"
        )
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    steps = 2 if _SMOKE.value else _TIMED_STEPS.value
    rows = jax_rows(out, config=_JAX_CONFIG.value, methods=_JAX_METHODS.value, attention=_JAX_ATTENTION.value,
                    steps=steps, smoke=_SMOKE.value)  # fmt: skip
    rows += torch_rows(out, reference, _TORCH_ROWS.value, steps=steps, smoke=_SMOKE.value)
    for row in rows:
        run_row(row, out, _ROW_TIMEOUT.value)
        print(f"{row.name}: {row.status} in {row.wall_s:.0f} s", flush=True)
    ratio_rows = ratios(rows)
    setup = f"config {_JAX_CONFIG.value}, bf16 t2s_jax rows, {steps} timed steps per row" + (" (smoke)" if _SMOKE.value else "")
    report = format_report(rows, ratio_rows, setup)
    (out / "gpu_benchmark.md").write_text(report)
    records = [dict(name=r.name, status=r.status, wall_s=r.wall_s, command=r.command, result=r.result) for r in rows]
    (out / "gpu_benchmark.json").write_text(json.dumps({"setup": setup, "rows": records, "ratios": ratio_rows}, indent=2))
    print(report, flush=True)


if __name__ == "__main__":
    app.run(main)
