"""The step benchmark: its command line, table and JSON, synthetic batches, FLOP counts and the
PyTorch reference beside it."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax import nnx

from data_pipelines import bench as data_bench
from t2s_jax import bench, bench_torch, parallel
from t2s_jax.training import train_state
from t2s_jax.config import default_config
from t2s_jax.models import build_segmentor, count_parameters

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402


def test_command_prints_its_table_and_the_pytorch_reference_and_writes_json(tmp_path):
    json_path = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=tiny.REPO)
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=1 "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    completed = subprocess.run(
        [sys.executable, "-m", "t2s_jax.bench", f"--config={tiny.DEMO_CONFIG}",
         '--config.data.crop_hw=(64, 64)', "--methods=source_only", "--dtypes=float32", "--attention=xla",
         "--steps=2", "--warmup=1", "--torch_reference", f"--json={json_path}"],
        env=env, cwd=tiny.REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    table = [line for line in completed.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 3 + 4  # header, rule, one row; then PyTorch's header, rule and two passes
    assert "compile (s)" in table[0] and "TFLOP/s (model)" in table[0] and "peak memory" in table[0]
    assert table[2].startswith("| source_only | float32 | xla |") and "(compiled est.)" in table[2]
    assert table[3].startswith("| PyTorch pass |")
    assert table[5].startswith("| train step | float32 | cpu | 2 |")
    assert table[6].startswith("| teacher forward | float32 | cpu | 2 |")
    (comparison,) = [line for line in completed.stdout.splitlines() if line.startswith("source-only step")]
    assert comparison.startswith("source-only step, float32, attention xla: t2s_jax")
    assert "PyTorch / t2s_jax = " in comparison

    report = json.loads(json_path.read_text())
    assert report["setup"]["backend"] == "cpu" and report["setup"]["crop_hw"] == [64, 64]
    (row,) = report["rows"]
    assert (row["method"], row["dtype"], row["devices"]) == ("source_only", "float32", 1)
    assert row["images_per_step"] == 2  # source-only trains on the B = 2 source crops
    assert 0 < row["compile_s"] < row["first_step_s"]
    assert row["step_ms_spread"][0] <= row["step_ms"] <= row["step_ms_spread"][1]
    assert row["images_per_s"] == pytest.approx(2 / (row["step_ms"] / 1000))
    assert row["model_tflops_per_s"] == pytest.approx(row["model_flops"] / (row["step_ms"] / 1000) / 1e12)
    assert row["model_flops"] > 1e8 and row["compiled_flops"] > 0
    memory = row["compiled_memory"]
    assert row["memory_source"].startswith("compiled memory_analysis")  # CPU has no device peak
    assert row["memory_bytes"] == memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    assert memory["alias"] > 0  # the donated state is updated in place
    assert math.isfinite(row["final_loss"])
    assert row["options"]["attention_impl"] == "xla"

    train_step, teacher_forward = report["torch_rows"]
    assert (train_step["pass_name"], train_step["batch"], train_step["crop_hw"]) == ("train step", 2, [64, 64])
    assert teacher_forward["pass_name"] == "teacher forward" and teacher_forward["peak_memory_bytes"] is None
    assert all(r["step_ms"] > 0 and r["first_step_s"] > 0 for r in report["torch_rows"])
    assert 0 < train_step["final_value"] < 2 * math.log(19)  # a finite cross-entropy, ln K at random init
    assert 1 / 19 < teacher_forward["final_value"] < 1  # mean top-1 softmax confidence


@pytest.mark.parametrize("head", ["daformer", "segformer"])
def test_pytorch_reference_model_has_the_segmentors_parameters(tmp_path, head):
    config = tiny.tiny_config(str(tmp_path), "source_only", **{"model.head": head})
    config.model.projector.enabled = False
    ours = nnx.eval_shape(lambda: build_segmentor(config.model, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        reference = bench_torch.Segmentor(config.model)
    assert sum(p.numel() for p in reference.parameters()) == count_parameters(ours)
    assert sum(p.numel() for p in reference.encoder.parameters()) == count_parameters(ours.encoder)


def test_pytorch_reference_optimizer_has_mmsegs_groups(tmp_path):
    config = tiny.tiny_config(str(tmp_path), "source_only")
    with torch.device("meta"):
        model = bench_torch.Segmentor(config.model)
    rest, norms, head = bench_torch.mmseg_adamw(model, config.optim).param_groups
    assert head["lr"] == pytest.approx(10 * rest["lr"]) and rest["lr"] == config.optim.learning_rate
    assert norms["weight_decay"] == 0.0 and rest["weight_decay"] == head["weight_decay"] == 0.01
    named = dict(model.named_parameters())
    assert {id(p) for p in head["params"]} == {id(p) for n, p in named.items() if n.startswith("decode_head.")}
    assert all(p.dim() == 1 for p in norms["params"])  # LayerNorm scales and biases
    assert len(rest["params"]) + len(norms["params"]) + len(head["params"]) == len(named)


def test_pytorch_reference_missing_torch_is_one_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.delitem(sys.modules, "t2s_jax.bench_torch")
    with pytest.raises(bench.app.UsageError, match="--torch_reference needs torch and transformers"):
        bench._import_torch_reference()


def test_synthetic_batch_has_the_pipelines_layout_and_splits_by_process(tmp_path):
    config = tiny.tiny_config(str(tmp_path), "t2s", **{"data.batch_size": 4, "data.crop_hw": (64, 96)})
    whole = bench.synthetic_host_batch(config.data, 19)
    assert sorted(whole) == ["source_image", "source_label", "target_image", "target_label"]
    for domain in ("source", "target"):
        image, label = whole[f"{domain}_image"], whole[f"{domain}_label"]
        assert image.shape == (4, 64, 96, 3) and image.dtype == np.uint8
        assert label.shape == (4, 64, 96) and label.dtype == np.uint8
        assert set(np.unique(label)) <= set(range(19)) | {255}
        # Constant on 32 x 32 blocks, several classes per crop.
        blocks = label.reshape(4, 2, 32, 3, 32)
        assert np.all(blocks == blocks[:, :, :1, :, :1])
        assert all(len(np.unique(crop)) >= 2 for crop in label)
    share = bench.synthetic_host_batch(config.data, 19, process_index=1, process_count=2)
    assert share["source_image"].shape == (2, 64, 96, 3)
    config.data.target = ""
    assert sorted(bench.synthetic_host_batch(config.data, 19)) == ["source_image", "source_label"]
    config.data.batch_size = 3
    with pytest.raises(ValueError, match="batch_size=3"):
        bench.synthetic_host_batch(config.data, 19, process_count=2)


def test_model_flops_count_every_scanned_block(tmp_path):
    """XLA counts a loop body once; the benchmark counts the step with unrolled blocks."""
    config = tiny.tiny_config(str(tmp_path), "source_only")
    config.model.encoder.depths = (2, 1, 1, 1)
    mesh = parallel.make_mesh(1)
    batch = bench._abstract_batch(bench.synthetic_host_batch(config.data, 19), mesh)

    def lowered(scan: bool):
        config.model.scan_blocks = scan
        graphdef, state, imagenet_variables, optimizer = train_state.abstract_train_state(config, 10)
        step = train_state.jit_train_step(config, graphdef, optimizer, mesh, 10)
        return step.lower(state, batch, imagenet_variables)

    unrolled = bench._cost_flops(lowered(False))
    scanned = lowered(True)
    assert bench._cost_flops(scanned) < unrolled  # the loop body once: fewer than the real count
    assert bench.model_flops(config, mesh, batch, scanned) == pytest.approx(unrolled, rel=1e-6)


def test_cost_flops_reads_xla_cost_analysis():
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    lowered = jax.jit(jnp.matmul).lower(a, b)
    assert bench._cost_flops(lowered) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)


def test_table_marks_compile_only_rows_and_scanned_counts():
    row = bench.BenchRow(
        method="t2s", dtype="bfloat16", devices=1, device_kind="cpu", batch_per_domain=2,
        crop_hw=(512, 512), images_per_step=4, compile_s=46.0, first_step_s=float("nan"),
        step_ms=float("nan"), step_ms_spread=(float("nan"),) * 2, images_per_s=float("nan"),
        model_flops=6.86e12, compiled_flops=9.1e12, model_tflops_per_s=float("nan"),
        compiled_tflops_per_s=float("nan"), memory_bytes=31 * 2**30,
        memory_source="compiled memory_analysis (args + outputs + temps - aliased)",
        compiled_memory={}, final_loss=float("nan"),
        options={"scan_blocks": True, "remat": "dots_no_batch", "attention_impl": "default"},
    )  # fmt: skip
    line = bench.format_table([row]).splitlines()[2]
    assert line == "| t2s | bfloat16 | default | 46.0 | – | – | – | 6860.0 | – | –* | 31.00 GiB (compiled est.) |"


def test_unknown_method_or_dtype_is_named(tmp_path):
    config = tiny.tiny_config(str(tmp_path))
    with pytest.raises(ValueError, match="'dacs'"):
        bench.row_config(config, "dacs", "float32")
    with pytest.raises(ValueError, match="'float16'"):
        bench.row_config(config, "t2s", "float16")
    with pytest.raises(ValueError, match="--attention: unknown attention_impl 'flash'"):
        bench.row_config(config, "t2s", "float32", "flash")
    row = bench.row_config(config, "daformer", "bfloat16")
    assert (row.method, row.model.dtype, row.model.pretrained) == ("daformer", "bfloat16", "")
    assert row.model.attention_impl == config.model.attention_impl
    assert bench.row_config(config, "daformer", "bfloat16", "cudnn").model.attention_impl == "cudnn"
    assert config.method == "t2s"  # the base config is left alone


def test_default_mit_b5_t2s_step_fits_20_gib():
    """The default config's T2S-DA step at MiT-B5, 2 + 2 x 512^2, bf16 compute: XLA's
    compiled-memory estimate on the CPU (compile only, shapes only, as `--steps=0` reads it)."""
    config = bench.row_config(default_config(), "t2s", "bfloat16")
    assert tuple(config.model.encoder.depths) == (3, 6, 40, 3) and tuple(config.data.crop_hw) == (512, 512)
    mesh = parallel.make_mesh(1)
    batch = bench._abstract_batch(bench.synthetic_host_batch(config.data, 19), mesh)
    num_steps = config.train.num_steps
    graphdef, state, imagenet_variables, optimizer = train_state.abstract_train_state(config, num_steps)
    step = train_state.jit_train_step(config, graphdef, optimizer, mesh, num_steps)
    compiled = step.lower(state, batch, imagenet_variables).compile()
    footprint, _, figures = bench._memory(compiled, mesh, ran=False)
    print({name: f"{value / 2**30:.2f} GiB" for name, value in figures.items()})
    assert figures["alias"] > 1.2 * 2**30  # the donated state (1.29 GiB) is updated in place
    assert footprint <= 20 * 2**30


def test_host_cores_needed():
    # 53 ms of CPU per GTA5 example, 2 + 2 examples per 70 ms step.
    assert data_bench.host_cores_needed(0.053, 4, 70.0) == pytest.approx(3.03, abs=0.01)
    assert data_bench.host_cores_needed(0.05, 2, 100.0) == pytest.approx(1.0)
