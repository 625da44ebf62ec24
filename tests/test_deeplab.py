"""DeepLab-V2 on ResNet as a host: every term trains on it, the step compiles once and 4 devices
equal 1; the optimizer decays its BatchNorm parameters (DAFormer exempts only MiT's norms) and
gives the head 10x; the feature distance compares stage 4 on 8-px cells with the frozen
ImageNet model in eval mode; the projector reads the CNN's features; HRDA wraps it at output
stride 8. Tiny ResNet (one bottleneck per stage, narrow) and 64^2 crops."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t2s_jax import config as config_lib, hosts, optim, parallel
from t2s_jax.training import train_state

sys.path.insert(0, os.path.dirname(__file__))
import test_steps  # noqa: E402

TINY_RESNET = dict(depths=(1, 1, 1, 1), base_widths=(8, 16, 32, 64), stem_channels=16)


def deeplab_config(method="t2s_mic", **overrides):
    config = test_steps._config(method, **{"model.head": "deeplabv2", "model.aspp_dilations": (6, 12), **overrides})
    config.model.encoder = config_lib.resnet_config(50, **TINY_RESNET)
    return config


def _model(config):
    host = hosts.build_host(config)
    return host, host.build_model(train_state.model_config_for_run(config), rngs=nnx.Rngs(0))


def test_the_deeplab_step_trains_every_term_compiles_once_and_4_devices_equal_1():
    """T2S-DA w/ MIC on DeepLab-V2: source, FD, ClassMix, pulling and MIC in one step."""
    config = deeplab_config(**{"data.batch_size": 4, "pull.num_groups": 4, "uda.pseudo_threshold": 0.0})
    batches = [test_steps._batch(0, batch_size=4), test_steps._batch(1, batch_size=4)]
    history, state, cache_size = test_steps._run(config, batches)
    assert cache_size == 1
    assert history[0]["loss_mic"] > 0 and history[0]["loss_pull"] > 0 and history[0]["loss_fd"] > 0
    assert all(np.isfinite(value) for step in history for value in step.values())
    on_4, _, _ = test_steps._run(config, batches[:1], num_devices=4)
    for name, value in history[0].items():
        rtol = 1e-3 if name == "grad_norm" else 2e-4
        np.testing.assert_allclose(on_4[0][name], value, rtol=rtol, atol=1e-5, err_msg=name)


def test_the_optimizer_decays_resnet_batchnorm_and_gives_the_head_10x():
    _, model = _model(deeplab_config())
    params = nnx.state(model, nnx.Param)
    def by_path(tree):
        return {optim.path_names(path): value for path, value in jax.tree_util.tree_leaves_with_path(tree)}

    groups, decayed = by_path(optim.parameter_groups(params)), by_path(optim.weight_decay_mask(params))
    bn_paths = [path for path in groups if path[0] == "encoder" and path[-1] in ("scale", "bias")]
    assert bn_paths and all(decayed[path] for path in bn_paths)  # ResNet BN: decayed, as in DAFormer
    assert all(groups[path] == optim.ENCODER_GROUP for path in bn_paths)
    head_paths = [path for path in groups if path[0] == "head"]
    assert head_paths and all(groups[path] == optim.HEAD_GROUP and decayed[path] for path in head_paths)


def test_feature_distance_is_stage_4_on_8_px_cells_against_the_imagenet_model_in_eval_mode():
    config = deeplab_config("daformer")
    host, model = _model(config)
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)), jnp.float32)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    # Running statistics away from their init, so eval mode and batch statistics differ.
    batch_stats = jax.tree.map(lambda x: x + 0.3, batch_stats)
    imagenet = nnx.merge(graphdef, params, batch_stats)
    features = host.imagenet_features(imagenet, images)
    assert features.shape == (2, 8, 8, 256)  # stage 4 at stride 8: 64 / 8 = 8-px cells
    from t2s_jax.uda import normalize

    eval_mode = imagenet.encoder(normalize.normalize(images), use_batch_stats=False)[-1]
    batch_mode = imagenet.encoder(normalize.normalize(images), use_batch_stats=True)[-1]
    np.testing.assert_allclose(features, eval_mode, rtol=1e-6)
    assert not np.allclose(features, batch_mode, atol=1e-3)
    # The run keeps the initial model's BatchNorm statistics for it, not the student's.
    mesh = parallel.make_mesh(1)
    _, state, (imagenet_params, imagenet_stats), _ = train_state.create_train_state(config, mesh, 10)
    for kept, initial in zip(jax.tree.leaves(imagenet_stats), jax.tree.leaves(state.batch_stats), strict=True):
        np.testing.assert_array_equal(kept, initial)


@pytest.mark.parametrize("projector_input", ["decoder", "encoder"])
def test_the_projector_reads_the_cnn_features(projector_input):
    config = deeplab_config("t2s", **{"model.projector.input": projector_input})
    config.model.head = "daformer" if projector_input == "encoder" else "deeplabv2"
    host, model = _model(config)
    images = jnp.asarray(np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)), jnp.float32)
    outputs = host.student_forward(
        model, {"source": images}, dropout_key=jax.random.key(0), crop_key=jax.random.key(1), with_projection=True
    )
    projection = outputs["source"].projection
    # DeepLab-V2's classifier reads stage 4 (stride 8); the encoder input is stage 4 under any head.
    assert projection.shape == (2, 8, 8, config.model.projector.dim)
    assert model.projector.conv1.conv.in_features == 256


HRDA_TINY = {"model.hrda.enabled": True, "model.hrda.detail_crop_hw": (32, 32), "model.hrda.detail_slide_stride_hw": (16, 16)}


def test_hrda_wraps_deeplab_at_output_stride_8():
    config = deeplab_config("mic", **HRDA_TINY, **{"model.hrda.crop_divisible": 16})
    host, model = _model(config)
    assert isinstance(host, hosts.HRDAHost) and host.output_stride == 8
    images = jnp.asarray(np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)), jnp.float32)
    labels = jnp.asarray(np.random.default_rng(3).integers(0, 19, (2, 64, 64)), jnp.int32)
    outputs = host.student_forward(
        model, {"source": images}, dropout_key=jax.random.key(0), crop_key=jax.random.key(1), with_projection=False
    )
    output = outputs["source"]
    # Context at 0.5: 32^2 input, stride 8 -> 4^2 logits, fused on the 8^2 grid; detail 32^2 -> 4^2.
    assert output.context_logits.shape == (2, 4, 4, 19) and output.logits.shape == (2, 8, 8, 19)
    assert output.detail_logits.shape == (2, 4, 4, 19) and int(output.detail_box.max()) % 16 == 0
    assert np.isfinite(float(host.segmentation_loss(output, labels)))
    teacher = host.teacher_forward(model, {"target": images}, with_projection=False)["target"]
    assert teacher.logits.shape == (2, 8, 8, 19)
    assert host.eval_logits(model, images).shape == (2, 8, 8, 19)
    with pytest.raises(ValueError, match="crop_divisible=4"):
        hosts.build_host(deeplab_config(**HRDA_TINY, **{"model.hrda.crop_divisible": 4}))
