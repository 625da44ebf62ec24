"""The batched step equals the unbatched reference (`reference_step.py`) for the presets that
together hold every term (t2s_mic: source, feature_distance, dacs, pull, mic; masktwins; dg:
the pulling loss without target data; the other presets are subsets of these): losses and
metrics, gradients, BatchNorm statistics, the teacher and the terms' own states.

The compared step is the second one (from a state whose teacher and student differ, with
the EMA below its cap at step 1); the tiny model runs without dropout and stochastic depth
so both see the same draws. Non-default options where the preset has them: MIC's own
teacher and threshold in t2s_mic, MaskTwins' target cut, the host's EMA cap.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t2s_jax import methods, parallel, steps
from t2s_jax.training import train_state

sys.path.insert(0, os.path.dirname(__file__))
from reference_step import reference_step  # noqa: E402
from test_steps import _batch, _config  # noqa: E402

PRESET_OPTIONS = {
    "dg": {},
    "t2s_mic": {"mic.teacher_alpha": 0.2, "mic.pseudo_weighting": "threshold", "mic.pseudo_threshold": 0.05},
    "masktwins": {"masktwins.single_target_image": True},
}
# Updates = the gradients, kept in the optimizer state (`trace` with decay 0), so the
# batched step's gradients can be read back.
OPTIMIZER = optax.chain(optax.trace(decay=0.0), optax.scale(-1e-3))


def reference_config(method, **overrides):
    return _config(method, **{
        "model.dropout_rate": 0.0, "model.encoder.drop_path_rate": 0.0, "uda.ema_max_alpha": 0.3,
        **PRESET_OPTIONS.get(method, {}), **overrides,
    })  # fmt: skip


def _batches(config):
    batches = [_batch(0), _batch(1)]
    if not config.data.target:
        batches = [{k: v for k, v in b.items() if k.startswith("source")} for b in batches]
    return batches


def _assert_trees_close(actual, expected, name, rtol=1e-4):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.abs(b).max()), 1e-12)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=f"{name}{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("method", list(PRESET_OPTIONS))
def test_batched_step_equals_the_unbatched_reference(method):
    config = reference_config(method)
    terms = methods.build_terms(config)
    graphdef, params, batch_stats = train_state.create_model_state(config, parallel.make_mesh(1))
    state = steps.initial_train_state(params, batch_stats, OPTIMIZER, config.seed, terms=terms)
    imagenet = jax.tree.map(jnp.copy, (params, batch_stats))
    step = jax.jit(steps.make_train_step(config, graphdef, OPTIMIZER, 100, terms=terms))
    first, second = _batches(config)
    state, _ = step(state, first, imagenet)

    batched_state, batched = step(state, second, imagenet)
    reference = jax.jit(lambda s, b, i: reference_step(config, graphdef, terms, s, b, i))(state, second, imagenet)

    expected = jax.device_get(reference["metrics"])
    assert set(batched) - {"learning_rate", "grad_norm"} == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(batched[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(batched["grad_norm"], optax.tree.norm(reference["grads"]), rtol=1e-4)
    # Per leaf, the difference's norm within 5e-3 of the gradient's: batched and separate passes
    # sum in other orders (a key bias's gradient is 0 up to rounding, single elements differ ~5 %;
    # t2s's stage-4 norm scale, measured: 2.2e-3). A missing or mis-weighted loss moves whole leaves.
    for (path, a), b in zip(*(jax.tree_util.tree_leaves_with_path(batched_state.opt_state[0].trace),
                              jax.tree.leaves(reference["grads"])), strict=True):  # fmt: skip
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 5e-3 * max(np.linalg.norm(b), 1e-12), f"grads{jax.tree_util.keystr(path)}"
    _assert_trees_close(batched_state.batch_stats, reference["batch_stats"], "batch_stats")
    _assert_trees_close(batched_state.teacher_params, reference["teacher_params"], "teacher_params")
    _assert_trees_close(batched_state.teacher_batch_stats, reference["teacher_batch_stats"], "teacher_batch_stats")
    _assert_trees_close(batched_state.term_states, reference["term_states"], "term_states")
    if method == "t2s_mic":  # MIC's own teacher is the term's state and moved with the student
        assert set(batched_state.term_states) == {"mic"}
        assert not np.allclose(jax.tree.leaves(batched_state.term_states)[0], jax.tree.leaves(state.term_states)[0])
