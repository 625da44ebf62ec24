"""The training system end to end: device-count invariance, one compile, SIGTERM resume, eval mode."""

import collections
import json
import math
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from t2s_jax import checkpointing, data, parallel, train

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402


def _random_batch(batch_size, crop_hw, seed, classes=tuple(range(19))):
    rng = np.random.default_rng(seed)
    shape = (batch_size, *crop_hw)
    # Blocky labels so ClassMix, prototypes and FD cells see several classes per image.
    blocks = rng.choice(np.asarray(classes), size=(batch_size, crop_hw[0] // 8, crop_hw[1] // 8))
    labels = np.kron(blocks, np.ones((8, 8), np.int64)).astype(np.uint8)
    return {
        "source_image": rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
        "source_label": labels,
        "target_image": rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
        "target_label": labels[::-1].copy(),
    }


_COLLECTIVE = re.compile(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[su]8|[su]16|[su]32|[su]64|bf16|f16|f32|f64)\[([0-9,]*)\]")


def _collective_bytes(hlo_text):
    """Bytes of every collective's result(s) in a compiled HLO module, summed per kind."""
    totals = collections.Counter()
    for result, kind in _COLLECTIVE.findall(hlo_text):
        for dtype, dims in _ARRAY.findall(result):
            width = 1 if dtype in ("pred", "s8", "u8") else int(re.sub(r"\D", "", dtype)) // 8
            totals[kind] += width * math.prod(int(d) for d in dims.split(",") if d)
    return totals


def _jitted_step(config, mesh):
    graphdef, state, imagenet_params, optimizer = train.create_train_state(config, mesh, 100)
    return train.jit_train_step(config, graphdef, optimizer, mesh, 100), state, imagenet_params


def test_t2s_step_on_8_devices_equals_1_device_and_compiles_once(tmp_path):
    config = tiny.tiny_config(str(tmp_path), "t2s")
    config.data.batch_size = 8
    config.model.encoder.drop_path_rate = 0.0  # keep the comparison about sharding, not dropout masks
    config.pull.num_groups = 8  # the pulling loss's sampling groups: one per device of the 8-device run
    batch = _random_batch(8, config.data.crop_hw, seed=0)
    results = {}
    for num_devices in (1, 8):
        mesh = parallel.make_mesh(num_devices)
        step, state, imagenet_params = _jitted_step(config, mesh)
        global_batch = parallel.global_batch(batch, mesh)
        state, metrics = step(state, global_batch, imagenet_params)
        results[num_devices] = (jax.device_get(state.params), jax.device_get(metrics))
        if num_devices == 8:
            # Data parallel: the gradient is the one large all-reduce (the executable is cached).
            collectives = _collective_bytes(step.lower(state, global_batch, imagenet_params).compile().as_text())
            gradient_bytes = sum(leaf.size * 4 for leaf in jax.tree.leaves(state.params))
            assert gradient_bytes <= collectives["all-reduce"] <= 1.1 * gradient_bytes, (collectives, gradient_bytes)
            assert collectives["all-gather"] + collectives["all-to-all"] <= 0.01 * gradient_bytes, collectives
        if num_devices == 1:
            # Batches holding other class sets (two classes; all ignore) reuse the same executable.
            for seed, classes in ((1, (0, 13)), (2, (255,))):
                other = _random_batch(8, config.data.crop_hw, seed, classes)
                state, _ = step(state, parallel.global_batch(other, mesh), imagenet_params)
            assert step._cache_size() == 1
    params_1, metrics_1 = results[1]
    params_8, metrics_8 = results[8]
    assert set(metrics_1) == set(metrics_8)
    for name in metrics_1:
        np.testing.assert_allclose(metrics_8[name], metrics_1[name], rtol=2e-4, atol=1e-5, err_msg=name)
    assert metrics_1["loss_pull"] > 0 and metrics_1["loss_mixed"] > 0
    for leaf_1, leaf_8 in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
        np.testing.assert_allclose(leaf_8, leaf_1, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- subprocess runs


def _main(workdir, data_dir, *extra, popen=False):
    command = [sys.executable, "-m", "t2s_jax.main", f"--workdir={workdir}",
               *tiny.as_flags(data_dir, "t2s", **{"train.num_steps": 6, "train.eval_every": 3,
                                                    "train.checkpoint_every": 3}), *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=tiny.xla_flags(1))
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(data_dir, "..", "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    kwargs = dict(cwd=tiny.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if popen:
        return subprocess.Popen(command, **kwargs)
    result = subprocess.run(command, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


def _final_params(workdir, config):
    mesh = parallel.make_mesh(1)
    _, state, _, _ = train.create_train_state(config, mesh, config.train.num_steps)
    checkpointer = checkpointing.RunCheckpointer(str(workdir))
    restored, data_state, step = checkpointer.restore(checkpointing.abstract_like(state))
    checkpointer.close()
    return jax.device_get(restored), data_state, step


def test_sigterm_resume_matches_uninterrupted_run_and_eval_mode_reproduces(tmp_path):
    data_dir = str(tmp_path / "data")
    data.ensure_prepared("synthetic_city/source", data_dir)
    data.ensure_prepared("synthetic_city/target", data_dir)

    uninterrupted = tmp_path / "uninterrupted"
    _main(uninterrupted, data_dir)

    interrupted = tmp_path / "interrupted"
    process = _main(interrupted, data_dir, popen=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if "step 2/6" in line:
            process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=600) == 0, "".join(output)[-5000:]
    log = "".join(output)
    assert "rerun with the same --workdir to resume" in log, log[-3000:]
    stopped_at = checkpointing.RunCheckpointer(str(interrupted)).latest_step()
    assert stopped_at is not None and stopped_at < 6
    resumed_log = _main(interrupted, data_dir)
    assert f"resumed at step {stopped_at}" in resumed_log

    config = tiny.tiny_config(data_dir, "t2s", **{"train.num_steps": 6})
    state_a, data_a, step_a = _final_params(uninterrupted, config)
    state_b, data_b, step_b = _final_params(interrupted, config)
    assert step_a == step_b == 6 and data_a == data_b
    for leaf_a, leaf_b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_allclose(leaf_b, leaf_a, rtol=1e-5, atol=1e-6)
    eval_a = json.loads((uninterrupted / "eval" / "step_6.json").read_text())
    eval_b = json.loads((interrupted / "eval" / "step_6.json").read_text())
    assert eval_b["miou"] == pytest.approx(eval_a["miou"], abs=1e-6)

    # --mode=eval on the saved checkpoint reproduces the mIoU logged at that step.
    _main(uninterrupted, data_dir, "--mode=eval", "--step=3")
    logged = json.loads((uninterrupted / "eval" / "step_3.json").read_text())
    reproduced = json.loads((uninterrupted / "eval" / "step_3_eval_mode.json").read_text())
    assert reproduced["miou"] == pytest.approx(logged["miou"], abs=1e-6)
    assert reproduced["per_class_iou"] == pytest.approx(logged["per_class_iou"], abs=1e-6, nan_ok=True)
    assert (uninterrupted / "report.md").exists() and (uninterrupted / "report.png").exists()
    metrics = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert any("train/pseudo_quality" in m and "train/learning_rate" in m for m in metrics)


def test_misspelt_override_lists_valid_keys(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "t2s_jax.main", f"--workdir={tmp_path}",
         f"--config={tiny.DEMO_CONFIG}", "--config.pull.temprature=0.1"],
        cwd=tiny.REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode != 0
    assert "temprature" in result.stderr and "temperature" in result.stderr
