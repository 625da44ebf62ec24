"""The prepared GPU benchmark script, end to end on the CPU with tiny shapes (`--smoke`)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from t2s_jax import gpu_benchmark

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

# The reference lives in shared/ beside the checkout (CI), or the workplace's /work/shared.
_REFERENCE_CANDIDATES = (
    Path(tiny.REPO).parent / "shared" / "bench" / "torch_segformer_step.py",
    Path("/work/shared/bench/torch_segformer_step.py"),
)


def _script(tmp_path, *flags, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=tiny.REPO, XLA_FLAGS=tiny.xla_flags(1))
    return subprocess.run(
        [sys.executable, "-m", "t2s_jax.gpu_benchmark", f"--out={tmp_path / 'out'}", *flags],
        env=env, cwd=tiny.REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_smoke_run_writes_one_table_and_json_with_every_row(tmp_path):
    reference = next((p for p in _REFERENCE_CANDIDATES if p.is_file()), None)
    if reference is None:
        pytest.skip("shared/bench/torch_segformer_step.py is not beside the checkout")
    copied = tmp_path / "bench" / reference.name  # as the docs say: a copy inside the repo
    copied.parent.mkdir()
    shutil.copy(reference, copied)
    completed = _script(tmp_path, "--smoke", f"--reference={copied}", "--jax_methods=source_only", "--jax_attention=xla",
                        "--torch_rows=train_fp32,teacher_fp32", "--row_timeout=240")  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_benchmark.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["jax_source_only_xla", "torch_train_fp32", "torch_teacher_fp32"]
    assert all(row["status"] == "ok" for row in rows.values()), {k: r["status"] for k, r in rows.items()}
    jax_row = rows["jax_source_only_xla"]["result"]
    assert jax_row["method"] == "source_only" and jax_row["crop_hw"] == [64, 64] and jax_row["dtype"] == "bfloat16"
    assert math.isfinite(jax_row["step_ms"]) and jax_row["first_step_s"] > 0
    assert rows["torch_teacher_fp32"]["result"]["mode"] == "teacher_fwd"
    assert all(rows[name]["result"]["median_ms"] > 0 for name in ("torch_train_fp32", "torch_teacher_fp32"))
    table = (tmp_path / "out" / "gpu_benchmark.md").read_text()
    assert sum(line.startswith("| jax_") or line.startswith("| torch_") for line in table.splitlines()) == 3
    assert (tmp_path / "out" / "jax_source_only_xla.log").exists()


def test_a_hung_row_is_stopped_and_the_table_still_written(tmp_path):
    hung = tmp_path / "hung_reference.py"
    hung.write_text("import time\ntime.sleep(120)\n")
    completed = _script(tmp_path, f"--reference={hung}", "--jax_methods=", "--torch_rows=train_fp32", "--row_timeout=2",
                        timeout=60)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    (row,) = json.loads((tmp_path / "out" / "gpu_benchmark.json").read_text())["rows"]
    assert row["status"] == "timeout" and row["wall_s"] < 30
    assert "| torch_train_fp32 | timeout |" in (tmp_path / "out" / "gpu_benchmark.md").read_text()
    missing = _script(tmp_path, f"--reference={tmp_path / 'absent.py'}", "--jax_methods=", timeout=60)
    assert missing.returncode != 0 and "copy /work/shared/bench/torch_segformer_step.py" in missing.stderr


def test_ratio_is_the_t2s_step_against_the_sum_of_the_pytorch_passes():
    def row(name, result):
        return gpu_benchmark.Row(name, [], Path("unused"), status="ok", result=result)

    rows = [
        row("jax_t2s_cudnn", {"step_ms": 70.0}),
        row("jax_daformer_cudnn", {"step_ms": 50.0}),
        row("torch_train_fp32", {"median_ms": 148.0}),
        row("torch_teacher_fp32", {"median_ms": 34.9}),
    ]
    (fp32, bf16) = gpu_benchmark.ratios(rows)
    assert fp32["ours"] == "jax_t2s_cudnn" and fp32["reference"] == "fp32"
    assert fp32["reference_ms"] == pytest.approx(3 * 148.0 + 3 * 34.9)  # 548.7 ms
    assert fp32["speedup"] == pytest.approx(548.7 / 70.0)
    assert math.isnan(bf16["speedup"])  # no bf16 reference rows
    report = gpu_benchmark.format_report(rows, [fp32, bf16], "setup")
    assert "| jax_t2s_cudnn | fp32 | 70.0 | 548.7 | 7.84x |" in report
