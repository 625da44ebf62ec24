"""The learning-rate schedule and parameter groups of method.md section 4."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from t2s_jax.config import default_config, mit_config
from t2s_jax.models import build_segmentor
from t2s_jax.optim import (
    learning_rate_schedule,
    make_optimizer,
    parameter_groups,
    path_names,
    weight_decay_mask,
)


def mmcv_poly_with_warmup(step, base_lr, total=40_000, warmup=1500, ratio=1e-6, power=1.0):
    """mmcv PolyLrUpdaterHook + linear warmup, written out as mmcv computes it."""
    regular = base_lr * (1 - step / total) ** power
    if step >= warmup:
        return regular
    k = (1 - step / warmup) * (1 - ratio)
    return regular * (1 - k)


@pytest.mark.parametrize("step", [0, 1, 1499, 1500, 20000, 39999])
def test_schedule_matches_mmcv_for_both_groups(step):
    optim = default_config().optim
    for base_lr in (optim.learning_rate, optim.learning_rate * optim.head_lr_multiplier):
        schedule = learning_rate_schedule(base_lr, optim, 40_000)
        np.testing.assert_allclose(
            float(schedule(step)), mmcv_poly_with_warmup(step, base_lr), rtol=1e-5, atol=1e-14
        )


def test_schedule_endpoints():
    optim = default_config().optim
    schedule = learning_rate_schedule(6e-5, optim, 40_000)
    assert float(schedule(0)) == pytest.approx(6e-5 * 1e-6, rel=1e-4)
    assert float(schedule(1500)) == pytest.approx(6e-5 * (1 - 1500 / 40000), rel=1e-6)
    assert float(schedule(40_000)) == 0.0


def _tiny_segmentor(projector=True):
    config = default_config()
    config.model.encoder = mit_config("b0", embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8))
    config.model.head_channels = 16
    config.model.projector.enabled = projector
    config.model.projector.hidden_channels = 8
    config.model.projector.dim = 8
    return config, nnx.eval_shape(lambda: build_segmentor(config.model, rngs=nnx.Rngs(0)))


def _leaf_names(tree):
    return {"/".join(path_names(path)): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_groups_and_weight_decay_mask_on_the_real_segmentor():
    _, model = _tiny_segmentor()
    params = nnx.state(model, nnx.Param)
    groups = _leaf_names(parameter_groups(params))
    decayed = _leaf_names(weight_decay_mask(params))
    assert groups and set(groups.values()) == {"head", "encoder"}
    for name, group in groups.items():
        top = name.split("/")[0]
        assert group == ("head" if top in ("head", "projector") else "encoder"), name
    # Exactly the encoder LayerNorms are not decayed: every encoder norm, nothing else.
    layer_norm_paths = {
        "/".join(path_names(path))
        for path, module in nnx.iter_graph(model)
        if isinstance(module, nnx.LayerNorm)
    }
    assert layer_norm_paths, "the encoder has LayerNorms"
    for name, is_decayed in decayed.items():
        module_path = name.rsplit("/", 1)[0]  # strip '<scale|bias>'
        in_encoder_norm = name.startswith("encoder") and module_path in layer_norm_paths
        assert is_decayed == (not in_encoder_norm), name


def test_head_group_learns_ten_times_faster_and_norms_are_not_decayed():
    config, model = _tiny_segmentor(projector=False)
    params = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), nnx.state(model, nnx.Param))
    optimizer = make_optimizer(config.optim, 40_000)
    opt_state = optimizer.init(params)
    zero_grads = jax.tree.map(np.zeros_like, params)
    # With zero gradients AdamW's update is the decoupled weight decay alone: -lr * wd * param.
    for _ in range(2):
        updates, opt_state = optimizer.update(zero_grads, opt_state, params)
    groups = _leaf_names(parameter_groups(params))
    decayed = _leaf_names(weight_decay_mask(params))
    step1_lr = mmcv_poly_with_warmup(1, 6e-5)
    for name, update in _leaf_names(updates).items():
        multiplier = 10.0 if groups[name] == "head" else 1.0
        expected = -step1_lr * multiplier * 0.01 if decayed[name] else 0.0
        np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-4, atol=1e-16, err_msg=name)
    assert optax.tree.norm(updates) > 0
