"""The DINOv2 ViT host (VFM-UDA): its head against a PyTorch module built from tue-mps/vfm-uda's
`upscale` + `out`; layer-wise learning-rate decay and the decay of every parameter; the
flip-averaged teacher; the source CE over valid pixels; token masks; chunked attention; the
VFM-UDA and T2S-DA steps on a tiny ViT, compiled once, 4 devices equal to 1; VFM-UDA++'s
feature distillation (head and loss against PyTorch, the step)."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from t2s_jax import benchmarks, config as config_lib, hosts, methods, optim, steps
from t2s_jax.models import heads, layers
from t2s_jax.models.distillation import DistillationHead
from t2s_jax.training import train_state
from t2s_jax.uda.distillation import distillation_loss
from t2s_jax.uda.mic import MicTerm
from t2s_jax.uda.source import SourceTerm

sys.path.insert(0, os.path.dirname(__file__))
import test_masking  # noqa: E402
import test_steps  # noqa: E402
import test_vit  # noqa: E402


class TorchLayerNorm2d(torch.nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm over the channels of an NCHW map, eps 1e-6."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def torch_vfm_head(dim: int, num_classes: int) -> torch.nn.Module:
    """vfm-uda's `VITLightweightHead` upscale (indices as its state dict) and classifier."""
    upscale = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(dim, dim // 2, 2, stride=2, bias=False),
        TorchLayerNorm2d(dim // 2, eps=1e-6),
        torch.nn.GELU(),
        torch.nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2, bias=False),
        TorchLayerNorm2d(dim // 4, eps=1e-6),
        torch.nn.Conv2d(dim // 4, dim // 4, 3, padding=1, bias=False),
        TorchLayerNorm2d(dim // 4, eps=1e-6),
    )
    out = torch.nn.Conv2d(dim // 4, num_classes, 1, bias=False)
    torch.nn.init.normal_(out.weight, std=0.1)
    return torch.nn.ModuleDict({"upscale": upscale, "out": out})


def test_the_vfm_head_matches_the_pytorch_head():
    dim, num_classes = 32, 5
    torch.manual_seed(0)
    reference = torch_vfm_head(dim, num_classes)
    for index in (1, 4, 6):  # LayerNorms away from their 1 / 0 init
        torch.nn.init.normal_(reference["upscale"][index].weight, 1.0, 0.2)
        torch.nn.init.normal_(reference["upscale"][index].bias, 0.0, 0.2)
    head = heads.VFMHead((dim,), num_classes=num_classes, dtype=jnp.float32, rngs=nnx.Rngs(0))
    up = reference["upscale"]
    head.upscale_1.kernel.value = jnp.asarray(up[0].weight.detach().numpy().transpose(2, 3, 0, 1))
    head.upscale_2.kernel.value = jnp.asarray(up[3].weight.detach().numpy().transpose(2, 3, 0, 1))
    head.conv.kernel.value = jnp.asarray(up[5].weight.detach().numpy().transpose(2, 3, 1, 0))
    head.classifier.kernel.value = jnp.asarray(reference["out"].weight.detach().numpy().transpose(2, 3, 1, 0))
    for norm, index in ((head.norm_1, 1), (head.norm_2, 4), (head.norm_3, 6)):
        norm.scale.value = jnp.asarray(up[index].weight.detach().numpy())
        norm.bias.value = jnp.asarray(up[index].bias.detach().numpy())
    tokens = np.random.default_rng(0).normal(size=(2, 5, 6, dim)).astype(np.float32)
    logits, feature = head((jnp.asarray(tokens),), use_batch_stats=True)
    with torch.no_grad():
        expected_feature = up(torch.from_numpy(tokens).permute(0, 3, 1, 2))
        expected_logits = reference["out"](expected_feature)
    assert logits.shape == (2, 20, 24, num_classes) and feature.shape == (2, 20, 24, dim // 4)
    np.testing.assert_allclose(feature, expected_feature.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, expected_logits.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)
    # The classifier's init is VFM-UDA's N(0, 0.1^2), not mmseg's 0.01.
    wide = heads.VFMHead((64,), num_classes=19, dtype=jnp.float32, rngs=nnx.Rngs(1))
    assert 0.07 < float(jnp.std(wide.classifier.kernel.value)) < 0.13


def _vit_like_params(scanned: bool, depth: int = 3):
    blocks = {"w": jnp.ones((depth, 2))} if scanned else {str(i): {"w": jnp.ones((2,))} for i in range(depth)}
    return {
        "encoder": {"blocks": blocks, "pos_embed": jnp.ones((4,)), "norm": {"scale": jnp.ones((2,))}},
        "head": {"w": jnp.ones((2,))},
    }


@pytest.mark.parametrize("scanned", [True, False])
def test_layer_decay_scales_block_i_by_d_to_the_l_minus_1_minus_i_and_the_stems_by_d_to_the_l(scanned):
    options = config_lib.default_config().optim
    options.update(warmup_steps=0, learning_rate=1e-3, weight_decay=0.0)
    params = _vit_like_params(scanned)
    grads = jax.tree.map(jnp.ones_like, params)

    def first_update(layer_decay):
        options.layer_decay = layer_decay
        optimizer = optim.make_optimizer(options, 100)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return updates

    plain, decayed = first_update(1.0), first_update(0.5)
    ratio = jax.tree.map(lambda a, b: np.asarray(b / a), plain, decayed)
    blocks = ratio["encoder"]["blocks"]
    per_block = blocks["w"][:, 0] if scanned else np.array([blocks[str(i)]["w"][0] for i in range(3)])
    np.testing.assert_allclose(per_block, [0.25, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(ratio["encoder"]["pos_embed"], 0.125, rtol=1e-6)
    np.testing.assert_allclose(ratio["encoder"]["norm"]["scale"], 0.125, rtol=1e-6)
    np.testing.assert_allclose(ratio["head"]["w"], 1.0, rtol=1e-6)


def test_vfm_uda_decays_the_encoder_norms_that_daformer_exempts():
    options = config_lib.default_config().optim
    options.update(warmup_steps=0, learning_rate=1e-3, weight_decay=0.5)
    params = _vit_like_params(True)
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    def norm_update(exempt):
        options.exempt_encoder_norms = exempt
        optimizer = optim.make_optimizer(options, 100)
        updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
        return float(updates["encoder"]["norm"]["scale"][0])

    assert norm_update(True) == 0.0
    np.testing.assert_allclose(norm_update(False), -1e-3 * 0.5, rtol=1e-5)


def test_the_flip_averaged_teacher_is_the_mean_of_both_views_softmax():
    rng = np.random.default_rng(0)
    logits, mirrored = rng.normal(size=(2, 2, 4, 3, 5)).astype(np.float32)
    averaged = steps.flip_averaged_logits(jnp.asarray(logits), jnp.asarray(mirrored))

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    expected = 0.5 * (softmax(logits) + softmax(mirrored[:, :, ::-1]))
    np.testing.assert_allclose(jax.nn.softmax(averaged, -1), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mean_over", ["all", "valid"])
def test_the_source_loss_is_the_mean_over_all_or_over_valid_pixels(mean_over):
    config = config_lib.default_config()
    config.uda.source_loss_mean = mean_over
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, (2, 8, 8)))
    labels = labels.at[:, :3].set(255)
    context = dataclasses.replace(test_masking._context(config, hw=(8, 8)), source_label=labels)
    output = test_masking._output(logits)
    (loss,) = SourceTerm(config).losses(context, {"source": output}, None)[0].values()
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    per_pixel = -np.take_along_axis(log_probs, np.where(labels == 255, 0, labels)[..., None], -1)[..., 0]
    valid = np.asarray(labels) != 255
    expected = per_pixel[valid].sum() / (valid.sum() if mean_over == "valid" else valid.size)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="config.uda.source_loss_mean='mean'"):
        config.uda.source_loss_mean = "mean"
        SourceTerm(config)


# ------------------------------------------------------------------ token masks and the step


def vfm_config(method="t2s_vfm_uda", **overrides):
    """The tiny demo config with a 2-block ViT/14 (64^2 crops -> 70, 5x5 tokens) and VFM-UDA's recipe."""
    config = test_steps._config(method, **overrides)
    config.model.encoder = config_lib.vit_config("s", **test_vit.TINY_SETTINGS)
    benchmarks.apply_vfm_recipe(config)
    return config


def test_token_masks_cover_the_ratio_of_the_resized_crops_token_grid():
    config = vfm_config("vfm_uda", **{"mic.mode": "separatetrg"})
    config.model.encoder = config_lib.vit_config("b")
    context = test_masking._context(config, batch=2, hw=(1024, 1024))
    passes, targets = MicTerm(config).prepare(context)
    masked = passes["masked"]
    assert isinstance(masked, hosts.MaskedTokens) and masked.token_mask.shape == (2, 80 * 80)  # 1120 / 14
    np.testing.assert_array_equal(masked.images, context.target_image)  # the pixels stay whole
    share = float(np.mean(np.asarray(masked.token_mask)))
    assert abs(share - 0.7) < 4 * np.sqrt(0.7 * 0.3 / masked.token_mask.size)
    assert np.asarray(masked.token_mask[0] != masked.token_mask[1]).any()  # one draw per image
    with pytest.raises(ValueError, match="mask_type='token' masks the patch tokens of a ViT"):
        MicTerm(test_steps._config("mic", **{"mic.mask_type": "token"}))


def test_the_host_masks_only_the_masked_pass():
    config = vfm_config("vfm_uda")
    host = hosts.build_host(config)
    model = host.build_model(train_state.model_config_for_run(config), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    images = [jnp.asarray(rng.uniform(0, 255, (2, 64, 64, 3)), jnp.float32) for _ in range(2)]
    mask = jnp.asarray(rng.uniform(size=(2, 25)) < 0.7)
    masked = hosts.MaskedTokens(images[1], mask)
    both = host.teacher_forward(model, {"plain": images[0], "masked": masked}, with_projection=False)
    alone = host.teacher_forward(model, {"plain": images[0], "masked": images[1]}, with_projection=False)
    np.testing.assert_allclose(both["plain"].logits, alone["plain"].logits, rtol=1e-5, atol=1e-6)
    assert not np.allclose(both["masked"].logits, alone["masked"].logits, atol=1e-3)


def test_vfm_uda_and_t2s_steps_train_every_term_compile_once_and_4_devices_equal_1():
    """T2S-DA w/ VFM-UDA: source, ClassMix with the flip-averaged teacher, pulling, token masking."""
    config = vfm_config(**{"data.batch_size": 4, "pull.num_groups": 4, "uda.pseudo_threshold": 0.0})
    batches = [test_steps._batch(0, batch_size=4), test_steps._batch(1, batch_size=4)]
    history, _, cache_size = test_steps._run(config, batches)
    assert cache_size == 1
    assert history[0]["loss_mic"] > 0 and history[0]["loss_pull"] > 0 and "loss_fd" not in history[0]
    assert all(np.isfinite(value) for step in history for value in step.values())
    on_4, _, _ = test_steps._run(config, batches[:1], num_devices=4)
    for name, value in history[0].items():
        rtol = 1e-3 if name == "grad_norm" else 2e-4
        np.testing.assert_allclose(on_4[0][name], value, rtol=rtol, atol=1e-5, err_msg=name)
    config.uda.teacher_flip = False  # one teacher pass: other pseudo-labels, another mixed loss
    single_view, _, _ = test_steps._run(config, batches[:1])
    assert abs(single_view[0]["loss_mixed"] - history[0]["loss_mixed"]) > 1e-6


def test_chunked_attention_equals_attention_in_values_and_gradients():
    """1100 tokens: two full chunks and a padded one."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 1100, 2, 8)), jnp.float32) for _ in range(3))

    def loss(implementation):
        return lambda q, k, v: jnp.sum(jnp.sin(layers.dot_product_attention(q, k, v, implementation)))

    chunked, full = (layers.dot_product_attention(q, k, v, implementation) for implementation in ("chunked", None))
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6)
    for chunked, full in zip(jax.grad(loss("chunked"), (0, 1, 2))(q, k, v), jax.grad(loss(None), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(chunked, full, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ VFM-UDA++'s feature distillation


def test_the_distillation_head_and_loss_match_pytorch():
    torch.manual_seed(0)
    reference = torch.nn.Sequential(
        torch.nn.Conv2d(8, 32, 1), TorchLayerNorm2d(32, eps=1e-6), torch.nn.GELU(), torch.nn.Conv2d(32, 8, 1)
    )
    head = DistillationHead(8, 8, expansion=4, dtype=jnp.float32, rngs=nnx.Rngs(0))
    head.expand.kernel.value = jnp.asarray(reference[0].weight.detach().numpy().transpose(2, 3, 1, 0))
    head.expand.bias.value = jnp.asarray(reference[0].bias.detach().numpy())
    head.project.kernel.value = jnp.asarray(reference[3].weight.detach().numpy().transpose(2, 3, 1, 0))
    head.project.bias.value = jnp.asarray(reference[3].bias.detach().numpy())
    features = np.random.default_rng(0).normal(size=(2, 6, 6, 8)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(features).permute(0, 3, 1, 2))
    student = head(jnp.asarray(features))
    np.testing.assert_allclose(student, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)
    # The loss on a 3x3 reference grid: the student's 6x6 map resized to it, as VFM-UDA++ does.
    target = np.random.default_rng(1).normal(size=(2, 3, 3, 8)).astype(np.float32)
    resized = torch.nn.functional.interpolate(expected, size=(3, 3), mode="bilinear", align_corners=False)
    torch_target = torch.from_numpy(target).permute(0, 3, 1, 2)
    smooth_l1 = torch.nn.functional.smooth_l1_loss(resized, torch_target, reduction="none", beta=1.0).mean(1)
    cosine = torch.nn.functional.cosine_similarity(resized, torch_target, dim=1)
    expected_loss = float((0.1 * smooth_l1 + 0.9 * (1 - cosine)).mean())
    loss = distillation_loss(student, jnp.asarray(target), smooth_l1_weight=0.1, cosine_weight=0.9)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)


def test_vfm_uda_fd_distils_source_and_target_through_a_head_at_the_decoder_rate():
    config = vfm_config("vfm_uda_fd", **{"distill.weight_target": 0.3})
    terms = dict(zip(methods.term_names(config), methods.build_terms(config)))
    assert terms["distillation"].student_passes == ("distill_target",)
    history, _, _ = test_steps._run(config, [test_steps._batch(0)])
    assert history[0]["loss_distill_source"] > 0 and history[0]["loss_distill_target"] > 0
    model = hosts.build_host(config).build_model(train_state.model_config_for_run(config), rngs=nnx.Rngs(0))
    assert model.distill_head is not None and model.projector is None
    groups = optim.parameter_groups(nnx.state(model, nnx.Param))
    assert {group for group in jax.tree.leaves(groups["distill_head"])} == {optim.HEAD_GROUP}
    config.distill.weight_target = 0.0  # the source alone: no target pass
    assert methods.build_terms(config)[-1].student_passes == ()
