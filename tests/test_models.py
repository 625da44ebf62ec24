"""Models: ghost-batch BatchNorm, resize, scanned/unrolled/remat/bf16 equivalence, heads, projector,
parameter counts and optimizer parameter groups. Tiny configs; weights filled from NumPy
(compiling random init is slow on CPU)."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from t2s_jax import config as config_lib
from t2s_jax.models import (
    BatchNorm,
    Segmentor,
    build_segmentor,
    count_parameters,
    is_encoder_norm_param,
    is_head_param,
    stack_passes,
    unstack_passes,
)
from t2s_jax.models.layers import resize_bilinear
from t2s_jax.optim import parameter_groups, path_names, weight_decay_mask

TINY_DIMS = (16, 32, 48, 64)
# Tiny models: compiling dominates the run time, and XLA's CPU backend optimisations halve
# the compile time for nothing here.


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    model = config_lib.default_config().model
    model.encoder = config_lib.mit_config("b0", embed_dims=TINY_DIMS, depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4))
    model.encoder.drop_path_rate = 0.3
    model.head_channels = 16
    model.num_classes = 5
    model.projector.enabled = True  # a run builds it when a term reads projections (t2s_jax.training.train_state.model_config_for_run)
    model.projector.hidden_channels = 16
    model.projector.dim = 8
    for key, value in overrides.items():
        model[key] = value
    return model


def _is_stacked(path: tuple) -> bool:
    return "blocks" in path and not isinstance(path[path.index("blocks") + 1], int)


def numpy_filled(model_config, seed: int = 0) -> Segmentor:
    """The segmentor of `model_config`, every variable drawn from NumPy (no init compile)."""
    model = nnx.eval_shape(lambda: build_segmentor(model_config, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(seed)
    updates = []
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        shape = variable.get_value().shape
        base = shape[1:] if _is_stacked(path) else shape
        leaf = path[-1]
        if leaf == "kernel":
            value = rng.randn(*shape) / math.sqrt(np.prod(base[:-1]))
        elif leaf == "scale":
            value = 1.0 + 0.1 * rng.randn(*shape)
        elif leaf == "var":
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, running mean
            value = 0.1 * rng.randn(*shape)
        updates.append((path, variable.replace(jnp.asarray(value, jnp.float32))))
    nnx.update(model, nnx.from_flat_state(updates))
    return model


def stacked_copy(source_model: Segmentor, scanned_config) -> Segmentor:
    """The scanned-blocks model of `scanned_config` holding exactly `source_model`'s weights."""
    scanned = nnx.eval_shape(lambda: build_segmentor(scanned_config, rngs=nnx.Rngs(0)))
    source = dict(nnx.to_flat_state(nnx.state(source_model)))
    updates = []
    for path, variable in nnx.to_flat_state(nnx.state(scanned)):
        if _is_stacked(path) and path not in source:  # gather the unrolled blocks
            i = path.index("blocks") + 1
            depth = variable.get_value().shape[0]
            value = jnp.stack([source[path[:i] + (j,) + path[i:]].get_value() for j in range(depth)])
        else:
            value = source[path].get_value()
        updates.append((path, variable.replace(value)))
    nnx.update(scanned, nnx.from_flat_state(updates))
    return scanned


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward(graphdef, state, images, key, options):
    merged = nnx.merge(graphdef, state)
    return merged.forward(images, dropout_key=key, **dict(options)), nnx.state(merged)


def forward(model: Segmentor, images, key=None, **options):
    """Jitted `model.forward` (compiled once per model structure and options); returns (output, new state)."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, images, key, tuple(sorted(options.items())))


def images(batch=2, height=45, width=61, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(batch, height, width, 3), jnp.float32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------- layers


def test_ghost_batchnorm_matches_per_group_numpy():
    rng = np.random.RandomState(0)
    x = rng.randn(6, 3, 4, 5).astype(np.float32) * 3 + 2
    bn = BatchNorm(5, momentum=0.9, epsilon=1e-5)
    bn.scale[...] = jnp.asarray(rng.rand(5) + 0.5, jnp.float32)
    bn.bias[...] = jnp.asarray(rng.randn(5), jnp.float32)
    y = np.asarray(bn(jnp.asarray(x), use_batch_stats=True, num_batch_groups=3))

    # Pass g holds rows g, g + 3, ... (interleaved example-major, `stack_passes`).
    passes = [x[g::3].astype(np.float64) for g in range(3)]
    means = np.stack([p.mean(axis=(0, 1, 2)) for p in passes])  # (3, 5)
    variances = np.stack([p.var(axis=(0, 1, 2)) for p in passes])  # biased
    expected = np.empty_like(x, dtype=np.float64)
    for g, p in enumerate(passes):
        expected[g::3] = (p - means[g]) / np.sqrt(variances[g] + 1e-5)
    expected = expected * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # Running statistics: one PyTorch-style update per pass, in pass order, unbiased variance.
    running_mean, running_var, n = np.zeros(5), np.ones(5), 2 * 3 * 4
    for g in range(3):
        running_mean = 0.9 * running_mean + 0.1 * means[g]
        running_var = 0.9 * running_var + 0.1 * variances[g] * n / (n - 1)
    np.testing.assert_allclose(bn.mean[...], running_mean, rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], running_var, rtol=1e-5)

    # Running statistics in evaluation, and no update.
    before = np.asarray(bn.mean[...])
    y_eval = np.asarray(bn(jnp.asarray(x), use_batch_stats=False))
    expected_eval = (x - before) / np.sqrt(np.asarray(bn.var[...]) + 1e-5) * np.asarray(bn.scale[...])
    np.testing.assert_allclose(y_eval, expected_eval + np.asarray(bn.bias[...]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.mean[...], before)
    with pytest.raises(ValueError, match="6 cannot be split into 4"):
        bn(jnp.asarray(x), use_batch_stats=True, num_batch_groups=4)


@pytest.mark.parametrize("size_in,size_out", [((3, 4), (19, 26)), ((19, 26), (7, 9)), ((10, 13), (19, 26))])
def test_resize_bilinear_matches_torch(size_in, size_out):
    x = np.random.RandomState(1).randn(2, *size_in, 3).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size_out, mode="bilinear", align_corners=False
    )
    got = resize_bilinear(jnp.asarray(x), size_out)
    np.testing.assert_allclose(got, expected.numpy().transpose(0, 2, 3, 1), atol=1e-5)


# ----------------------------------------------------------------------------- segmentor


def test_forward_shapes_dtypes_and_state_kinds():
    model = numpy_filled(tiny_config())
    out, _ = forward(model, images(), with_projection=True)
    assert out.logits.shape == (2, 12, 16, 5) and out.logits.dtype == jnp.float32  # stride 4: 45x61 -> 12x16
    assert [f.shape for f in out.encoder_features] == [(2, 12, 16, 16), (2, 6, 8, 32), (2, 3, 4, 48), (2, 2, 2, 64)]
    assert out.decoder_features.shape == (2, 12, 16, 16)
    assert out.projection.shape == (2, 12, 16, 8) and out.projection.dtype == jnp.float32
    kinds = {type(v).__name__ for _, v in nnx.to_flat_state(nnx.state(model))}
    assert kinds == {"Param", "BatchStat"}  # no RNG state: randomness only through dropout_key


def test_projector_on_encoder_input_and_disabled_projector():
    config = tiny_config()
    config.projector.input = "encoder"
    out, _ = forward(numpy_filled(config), images(), with_projection=True)
    assert out.projection.shape == (2, 2, 2, 8)  # last encoder stage, stride 32
    config.projector.enabled = False
    model = numpy_filled(config)
    assert model.projector is None
    with pytest.raises(ValueError, match="without the projector"):
        model.forward(images(), with_projection=True)


def test_train_needs_dropout_key_and_randomness_only_when_training():
    model = numpy_filled(tiny_config())
    with pytest.raises(ValueError, match="dropout_key"):
        model.forward(images(), train=True)
    train_a, _ = forward(model, images(), jax.random.key(0), train=True, use_batch_stats=False)
    train_b, _ = forward(model, images(), jax.random.key(1), train=True, use_batch_stats=False)
    eval_a, _ = forward(model, images(), jax.random.key(0), train=False)
    eval_b, _ = forward(model, images(), jax.random.key(1), train=False)
    assert rel_err(train_a.logits, train_b.logits) > 1e-3  # stochastic depth and channel dropout
    np.testing.assert_array_equal(eval_a.logits, eval_b.logits)


def test_scanned_blocks_equal_unrolled_blocks():
    unrolled = numpy_filled(tiny_config(scan_blocks=False))
    scanned = stacked_copy(unrolled, tiny_config(scan_blocks=True))
    stacked_kernel = nnx.state(scanned, nnx.Param)["encoder"]["stages"][1]["blocks"]["attn"]["q"]["kernel"]
    assert stacked_kernel.get_value().shape == (2, 32, 32)
    assert count_parameters(scanned) == count_parameters(unrolled)
    # train: the same per-block drop-path keys. Options as in the dropout test (compiled once).
    for options in (dict(train=False), dict(train=True, use_batch_stats=False)):
        a, _ = forward(unrolled, images(), jax.random.key(3), **options)
        b, _ = forward(scanned, images(), jax.random.key(3), **options)
        for fa, fb in zip(a.encoder_features, b.encoder_features):
            assert rel_err(fb, fa) < 1e-5
        assert rel_err(b.logits, a.logits) < 1e-5


@pytest.mark.parametrize(
    ("remat", "head_remat", "head_per_pass"),
    [("full", "none", False), ("dots_no_batch", "none", False), ("none", "full", True)],
)
def test_remat_gives_same_gradients_in_the_training_step_pattern(remat, head_remat, head_per_pass):
    """Encoder blocks (`remat`) or the head and projector (`head_remat`, pass by pass with
    `head_per_pass`) recomputed: the same loss, gradients and BatchNorm statistics (no channel
    dropout: per pass, its masks are drawn apart). The step code's pattern: split, merge inside the
    differentiated function, return the new BatchNorm statistics as aux. (`copy=True`:
    Variables rebuilt from jax.grad's arguments belong to another trace and refuse the
    BatchNorm update otherwise.)"""
    # Two stages keep the gradient compile short; the second stage scans 2 blocks.
    encoder = config_lib.mit_config("b0", embed_dims=(16, 32), depths=(1, 2), num_heads=(1, 2), sr_ratios=(4, 2))
    x = images()

    def loss(out):
        return jnp.mean(out.logits**2) + jnp.mean(out.projection**2)

    def loss_grads_stats(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params):
            merged = nnx.merge(graphdef, params, rest, copy=True)
            out = merged.forward(x, train=True, dropout_key=jax.random.key(5), num_batch_groups=2, with_projection=True)
            return loss(out), nnx.state(merged, nnx.BatchStat)

        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

    def backward_flops(model):  # of the lowered program, recomputation included
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(p):
            return loss(nnx.merge(graphdef, p, rest, copy=True).forward(x, use_batch_stats=False, with_projection=True))

        return jax.jit(jax.grad(loss_fn)).lower(params).cost_analysis()["flops"]

    kept = numpy_filled(tiny_config(encoder=encoder, remat="none", dropout_rate=0.0))
    recomputed = numpy_filled(  # the same weights
        tiny_config(encoder=encoder, remat=remat, head_remat=head_remat, head_per_pass=head_per_pass, dropout_rate=0.0)
    )
    assert backward_flops(recomputed) > 1.01 * backward_flops(kept)
    (loss_a, stats_a), grads_a = loss_grads_stats(kept)
    (loss_b, stats_b), grads_b = loss_grads_stats(recomputed)
    assert abs(float(loss_a) - float(loss_b)) <= 1e-6 * abs(float(loss_a))
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-7)
    initial = nnx.state(numpy_filled(tiny_config(encoder=encoder)), nnx.BatchStat)
    for module in ("head", "projector"):
        for sa, sb, s0 in zip(*(jax.tree.leaves(s[module]) for s in (stats_a, stats_b, initial)), strict=True):
            np.testing.assert_allclose(sb, sa, rtol=1e-5, atol=1e-6)
            assert not np.allclose(sa, s0)  # the running statistics moved
    with pytest.raises(ValueError, match="'blocks'.*expected one of"):
        numpy_filled(tiny_config(encoder=encoder, remat="blocks"))


def test_bfloat16_forward_close_to_float32():
    f32 = numpy_filled(tiny_config())
    bf16 = numpy_filled(tiny_config(dtype="bfloat16"))  # same seed: same weights
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(bf16))} == {jnp.dtype(jnp.float32)}
    a, _ = forward(f32, images(), with_projection=True)
    b, _ = forward(bf16, images(), with_projection=True)
    assert b.encoder_features[0].dtype == jnp.bfloat16 and b.logits.dtype == jnp.float32
    for fa, fb in zip(a.encoder_features, b.encoder_features):
        assert rel_err(fb, fa) < 3e-2
    assert rel_err(b.logits, a.logits) < 3e-2
    assert rel_err(b.projection, a.projection) < 3e-2


def test_ghost_batches_equal_separate_passes():
    model = numpy_filled(tiny_config())
    x1, x2 = images(seed=1), images(seed=2) * 2 + 1  # different statistics per pass
    joint, joint_state = forward(model, stack_passes([x1, x2]), use_batch_stats=True, num_batch_groups=2,
                                 with_projection=True)
    first, first_state = forward(model, x1, use_batch_stats=True, with_projection=True)
    second, second_state = forward(model, x2, use_batch_stats=True, with_projection=True)
    joint_first, joint_second = unstack_passes(joint.logits, 2)
    assert rel_err(joint_first, first.logits) < 1e-5
    assert rel_err(joint_second, second.logits) < 1e-5
    assert rel_err(unstack_passes(joint.projection, 2)[1], second.projection) < 1e-5
    # Running statistics: the first pass's update, then the second's (as two separate forwards):
    # m * first + second - m * initial, since both separate passes start from the initial state.
    states = (joint_state, first_state, second_state, nnx.state(model))
    stats = [nnx.to_flat_state(nnx.filter_state(s, nnx.BatchStat)) for s in states]
    for (path, j), (_, f), (_, s), (_, r) in zip(*stats):
        expected = 0.9 * f.get_value() + s.get_value() - 0.9 * r.get_value()
        np.testing.assert_allclose(j.get_value(), expected, rtol=1e-5, atol=1e-6, err_msg=str(path))
    # And the pass without ghost groups differs (the check above can fail).
    mixed, _ = forward(model, stack_passes([x1, x2]), use_batch_stats=True)
    assert rel_err(unstack_passes(mixed.logits, 2)[0], first.logits) > 1e-3


# ----------------------------------------------------------------------------- counts and groups


def test_param_count_mit_b5_segformer_head_equals_transformers():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    b5 = config_lib.MIT_VARIANTS["b5"]
    hf_config = SegformerConfig(
        hidden_sizes=list(b5["embed_dims"]), depths=list(b5["depths"]), decoder_hidden_size=768, num_labels=19
    )
    with torch.device("meta"):
        reference = SegformerForSemanticSegmentation(hf_config)
    reference_count = sum(p.numel() for p in reference.parameters())
    reference_encoder = sum(p.numel() for p in reference.segformer.parameters())

    config = config_lib.default_config().model
    config.head, config.head_channels, config.projector.enabled, config.scan_blocks = "segformer", 768, False, True
    ours = nnx.eval_shape(lambda: build_segmentor(config, rngs=nnx.Rngs(0)))
    assert count_parameters(ours) == reference_count
    assert count_parameters(ours.encoder) == reference_encoder

    # DAFormer head (256 channels, separable ASPP 1/6/12/18): counted independently.
    config.head, config.head_channels = "daformer", 256
    daformer = nnx.eval_shape(lambda: build_segmentor(config, rngs=nnx.Rngs(0)))
    c, concat = 256, 4 * 256
    embed = sum(d * c + c for d in b5["embed_dims"])
    aspp = (concat * c + 2 * c) + 3 * ((9 * concat + 2 * concat) + (concat * c + 2 * c))
    fuse = 9 * 4 * c * c + 2 * c
    classifier = c * 19 + 19
    assert count_parameters(daformer.head) == embed + aspp + fuse + classifier
    total = count_parameters(daformer)
    print(f"MiT-B5 + DAFormer head: {total:,} parameters (encoder {reference_encoder:,})")
    assert 84e6 < total < 86e6  # DAFormer reports about 85 M


def test_optimizer_groups_on_scanned_blocks():
    model = numpy_filled(tiny_config(scan_blocks=True))
    params = nnx.state(model, nnx.Param)

    def by_path(tree):
        return {path_names(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    groups = by_path(parameter_groups(params))
    decayed = by_path(weight_decay_mask(params))
    norm_paths = [path for path, is_decayed in decayed.items() if not is_decayed]
    # Per stage: patch norm + stage norm + (stacked) norm1, norm2 + attn.norm where sr > 1; scale and bias each.
    assert len(norm_paths) == 2 * (4 * 4 + 3)
    assert all(p[-1] in ("scale", "bias") and p[0] == "encoder" for p in norm_paths)
    assert not decayed[("encoder", "stages", "0", "blocks", "attn", "norm", "scale")]
    assert decayed[("encoder", "stages", "0", "blocks", "attn", "kv", "kernel")]
    assert groups[("encoder", "stages", "0", "blocks", "attn", "kv", "kernel")] == "encoder"
    # Head BatchNorms keep weight decay and train at the head's rate, like the projector.
    assert groups[("head", "bottleneck", "bn", "scale")] == "head" and decayed[("head", "bottleneck", "bn", "scale")]
    assert groups[("projector", "out", "kernel")] == "head"
    assert is_head_param(("projector", "conv1", "conv", "kernel")) and not is_head_param(("encoder", "x"))
    assert is_encoder_norm_param(("encoder", "stages", 1, "blocks", 0, "norm2", "bias"))
    assert not is_encoder_norm_param(("head", "linear_fuse", "bn", "scale"))
