"""The term interface: a term the step has never heard of (defined here) brings its own random
stream and state and trains through the real step without moving the other terms' draws;
clashing pass or loss names are errors naming both terms; the terms' typed options
override from the command line."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from t2s_jax import losses, methods, parallel, steps
from t2s_jax.training import train_state
from t2s_jax.config import default_config
from t2s_jax.uda import mic
from t2s_jax.uda.term import Term, stream_key

sys.path.insert(0, os.path.dirname(__file__))
from test_reference_step import OPTIMIZER, reference_config  # noqa: E402
from test_steps import _batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ToyTerm(Term):
    """CE on noisy source images, the noise from its own stream; counts its steps in its state."""

    name = "toy"
    random_streams = ("noise",)
    student_passes = ("toy_noisy",)

    def __init__(self, loss_name="loss_toy"):
        self.loss_name = loss_name

    def init_state(self, params):
        return {"updates": jnp.zeros((), jnp.int32), "student_sum": jnp.zeros((), jnp.float32)}

    def update_state(self, state, params, step):
        return {"updates": state["updates"] + 1, "student_sum": sum(jnp.sum(x) for x in jax.tree.leaves(params))}

    def prepare(self, context):
        noise = jax.random.uniform(context.keys["noise"], context.source_image.shape, maxval=32.0)
        return {"toy_noisy": jnp.clip(context.source_image + noise, 0.0, 255.0)}, jnp.mean(noise)

    def losses(self, context, student, prepared):
        loss = losses.segmentation_loss(student["toy_noisy"].logits, context.source_label)
        return {self.loss_name: 0.1 * loss}, {"toy_noise_mean": prepared, "toy_updates": context.state["updates"]}


def _train(config, terms, batches):
    graphdef, params, batch_stats = train_state.create_model_state(config, parallel.make_mesh(1))
    state = steps.initial_train_state(params, batch_stats, OPTIMIZER, config.seed, terms=terms)
    imagenet = jax.tree.map(jnp.copy, (params, batch_stats))
    step = jax.jit(steps.make_train_step(config, graphdef, OPTIMIZER, 100, terms=terms))
    states, history = [state], []
    for batch in batches:
        state, metrics = step(state, batch, imagenet)
        states.append(state)
        history.append(jax.device_get(metrics))
    return states, history


def test_a_new_term_with_its_own_stream_and_state_trains_without_moving_the_others():
    config = reference_config("daformer")
    host = methods.build_terms(config)
    batches = [_batch(0), _batch(1)]
    states, history = _train(config, (*host, ToyTerm()), batches)
    _, host_history = _train(config, host, batches[:1])

    # Its state: initialised, carried in the train state, updated once per step from the
    # student before the step's update.
    toy_state = jax.device_get(states[-1].term_states["toy"])
    assert int(toy_state["updates"]) == 2 and [int(m["toy_updates"]) for m in history] == [1, 2]
    student_sum = sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree.leaves(states[1].params))
    np.testing.assert_allclose(toy_state["student_sum"], student_sum, rtol=1e-5)
    # Its stream: keyed by its name, as documented.
    step_key = jax.random.fold_in(states[0].rng, 0)
    expected_noise = jax.random.uniform(stream_key(step_key, "toy", "noise"), batches[0]["source_image"].shape, maxval=32.0)
    np.testing.assert_allclose(history[0]["toy_noise_mean"], float(jnp.mean(expected_noise)), rtol=1e-6)
    assert history[0]["loss_toy"] > 0 and history[0]["loss"] > host_history[0]["loss"]
    # The host terms' draws (ClassMix, augmentation) and passes are untouched by the new term.
    for name in ("loss_source", "loss_mixed", "loss_fd", "pseudo_quality", "pseudo_label_accuracy"):
        # loss_fd is ~1e-8 at step 1 (the student is the ImageNet encoder): float noise only.
        np.testing.assert_allclose(history[0][name], host_history[0][name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_clashing_names_are_errors_naming_both_terms():
    config = reference_config("daformer")
    host = methods.build_terms(config)
    graphdef, params, batch_stats = train_state.create_model_state(config, parallel.make_mesh(1))
    state = steps.initial_train_state(params, batch_stats, OPTIMIZER, config.seed, terms=(*host, ToyTerm()))
    same_loss = steps.make_train_step(config, graphdef, OPTIMIZER, 100, terms=(*host, ToyTerm("loss_mixed")))
    with pytest.raises(ValueError, match="'dacs' and 'toy' both log 'loss_mixed'"):
        jax.eval_shape(same_loss, state, _batch(0), (params, batch_stats))

    same_pass = ToyTerm()
    same_pass.student_passes = ("mixed",)
    with pytest.raises(ValueError, match="terms 'dacs' and 'toy' both produce the student pass 'mixed'"):
        steps.make_train_step(config, graphdef, OPTIMIZER, 100, terms=(*host, same_pass))
    with pytest.raises(ValueError, match="listed more than once"):
        steps.make_train_step(config, graphdef, OPTIMIZER, 100, terms=(*host, host[0]))
    # A declared reading of another term's pass is the only sharing: pull's source queries
    # read the source term's pass, which must then be there.
    config.pull.query_domain = "source"
    config.terms = ("dacs", "pull")
    with pytest.raises(ValueError, match="term 'pull' reads the student pass 'source', which no other term"):
        steps.make_train_step(config, graphdef, OPTIMIZER, 100)


def test_typed_term_options_override_from_the_command_line(monkeypatch):
    argv = [
        "main", f"--config={os.path.join(REPO, 'configs', 'gta_cs_daformer.py')}:mic", "--config.mic.teacher_alpha=0.99",
        "--config.mic.pseudo_weighting=threshold", "--config.mic.pseudo_threshold=0.5",
        "--config.masktwins.single_target_image=True",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides' types from argv
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
    flag_values(argv)
    config = flag_values.config
    assert config.mic.teacher_alpha == 0.99 and config.mic.pseudo_threshold == 0.5
    assert config.masktwins.single_target_image is True
    term = mic.MicTerm(config)
    assert term.teacher_alpha == 0.99 and term.threshold == 0.5 and term.rethreshold
    # Unset, the optional options are None: the host's teacher and weights.
    default = mic.MicTerm(methods.with_method(default_config(), "mic"))
    assert default.teacher_alpha is None and not default.rethreshold
    config.mic.pseudo_weighting = "host"
    with pytest.raises(ValueError, match="config.mic.pseudo_threshold=0.5 with mic.pseudo_weighting='host'"):
        mic.MicTerm(config)
