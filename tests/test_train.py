"""The training system in process: device-count invariance, one compile, any mesh, stop signals.

The end-to-end runs (resume, faults, eval mode) are in tests/test_faults.py.
"""

import collections
import math
import os
import re
import signal
import sys

import jax
import numpy as np
import pytest

from t2s_jax import data, parallel
from t2s_jax.training import coordination, evaluation, train_state
from t2s_jax.training.control import RunError

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
    graphdef, state, imagenet_variables, optimizer = train_state.create_train_state(config, mesh, 100)
    return train_state.jit_train_step(config, graphdef, optimizer, mesh, 100), state, imagenet_variables


def test_t2s_mic_step_on_8_devices_equals_1_device_and_compiles_once(tmp_path):
    """T2S-DA w/ MIC (every term of the DAFormer host but MaskTwins'; tests/test_steps.py runs
    MaskTwins on 8 devices): metrics and updated parameters equal, one all-reduce of the gradient."""
    config = tiny.tiny_config(str(tmp_path), "t2s_mic")
    config.mic.block_size = 16
    config.uda.pseudo_threshold = 0.0  # every pseudo-label counts: the random teacher is barely confident
    config.data.batch_size = 8
    config.model.encoder.drop_path_rate = 0.0  # keep the comparison about sharding, not dropout masks
    config.pull.num_groups = 8  # the pulling loss's sampling groups: one per device of the 8-device run
    batch = _random_batch(8, config.data.crop_hw, seed=0)
    results = {}
    for num_devices in (1, 8):
        mesh = parallel.make_mesh(num_devices)
        step, state, imagenet_variables = _jitted_step(config, mesh)
        global_batch = parallel.global_batch(batch, mesh)
        state, metrics = step(state, global_batch, imagenet_variables)
        results[num_devices] = (jax.device_get(state.params), jax.device_get(metrics))
        if num_devices == 8:
            # Data parallel: the gradient is the one large all-reduce (the executable is cached).
            collectives = _collective_bytes(step.lower(state, global_batch, imagenet_variables).compile().as_text())
            gradient_bytes = sum(leaf.size * 4 for leaf in jax.tree.leaves(state.params))
            assert gradient_bytes <= collectives["all-reduce"] <= 1.1 * gradient_bytes, (collectives, gradient_bytes)
            assert collectives["all-gather"] + collectives["all-to-all"] <= 0.01 * gradient_bytes, collectives
        if num_devices == 1:
            # Batches holding other class sets (two classes; all ignore) reuse the same executable.
            for seed, classes in ((1, (0, 13)), (2, (255,))):
                other = _random_batch(8, config.data.crop_hw, seed, classes)
                state, _ = step(state, parallel.global_batch(other, mesh), imagenet_variables)
            assert step._cache_size() == 1
    params_1, metrics_1 = results[1]
    params_8, metrics_8 = results[8]
    assert set(metrics_1) == set(metrics_8)
    for name in metrics_1:
        # grad_norm is in the thousands at random init: the masked passes hold all-zero tokens, whose
        # LayerNorm gradient is scaled by 1/sqrt(eps) (as in PyTorch); float sums then differ more.
        rtol = 1e-3 if name == "grad_norm" else 2e-4
        np.testing.assert_allclose(metrics_8[name], metrics_1[name], rtol=rtol, atol=1e-5, err_msg=name)
    assert metrics_1["loss_pull"] > 0 and metrics_1["loss_mixed"] > 0 and metrics_1["loss_mic"] > 0
    for leaf_1, leaf_8 in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
        np.testing.assert_allclose(leaf_8, leaf_1, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- layouts


def test_eval_batch_of_one_works_on_any_mesh_and_scores_the_same(tmp_path):
    """The default eval_batch_size=1 on 8 devices, and num_devices=2 of 8: padded to the mesh."""
    config = tiny.tiny_config(str(tmp_path / "data"), "source_only", **{
        "data.eval_batch_size": 1, "data.eval_dataset": "synthetic_city/target_64x128"})
    data.ensure_prepared(config.data.eval_dataset, config.data.data_dir)
    graphdef, params, batch_stats = train_state.create_model_state(config, parallel.make_mesh(1))
    host_params, host_stats = jax.device_get((params, batch_stats))
    summaries = {}
    for num_devices in (1, 2, 8):
        mesh = parallel.make_mesh(num_devices)
        variables = jax.device_put((host_params, host_stats), parallel.replicated(mesh))
        classes = data.check_classes(config, training=False)
        summaries[num_devices] = evaluation.make_evaluator(config, graphdef, mesh, classes)(*variables)
    for num_devices in (2, 8):
        assert summaries[num_devices]["num_examples"] == config.data.max_eval_examples
        assert summaries[num_devices]["num_pixels"] == summaries[1]["num_pixels"] > 0
        np.testing.assert_allclose(summaries[num_devices]["miou"], summaries[1]["miou"], atol=1e-6)


def test_batch_sizes_and_device_counts_are_checked_against_the_mesh(tmp_path):
    config = tiny.tiny_config(str(tmp_path), "source_only", **{"num_devices": 4, "data.batch_size": 6})
    with pytest.raises(RunError, match=r"config.data.batch_size=6 is not divisible by the 4 devices "
                                             r"of the mesh \(1 process x 4 devices\); set it to a multiple of 4"):
        train_state.make_run_mesh(config)
    config.num_devices = 9
    with pytest.raises(RunError, match=r"config.num_devices=9 but only 8 devices exist"):
        train_state.make_run_mesh(config)
    config.num_devices, config.data.batch_size = 2, 2
    mesh = train_state.make_run_mesh(config)
    assert mesh.size == 2 and parallel.padded_batch_size(1, mesh) == 2 and parallel.padded_batch_size(5, mesh) == 6


def test_global_batch_feeds_the_mesh_devices_not_all_local_ones():
    mesh = parallel.make_mesh(2)
    batch = parallel.global_batch({"image": np.arange(2 * 3).reshape(2, 3)}, mesh)["image"]
    assert {shard.device for shard in batch.addressable_shards} == set(mesh.devices.flat)
    np.testing.assert_array_equal(parallel.to_host(batch), np.arange(6).reshape(2, 3))


# ---------------------------------------------------------------------------- signals


def test_sigterm_and_sigint_request_a_stop_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    for signum in (signal.SIGTERM, signal.SIGINT):
        with coordination.stop_signals() as stop:
            assert not stop.reached()
            with coordination.stop_signals() as inner:  # a comparison's runs share the outer handlers
                assert inner is stop
            os.kill(os.getpid(), signum)
            assert stop.reached() and stop.signum == signum
        assert signal.getsignal(signal.SIGTERM) is before
