"""The DINOv2 ViT host (VFM-UDA): its head against a PyTorch module built from tue-mps/vfm-uda's
`upscale` + `out`; layer-wise learning-rate decay and the decay of every parameter; the
flip-averaged teacher; the source CE over valid pixels; token masks; and the VFM-UDA and
T2S-DA steps on a tiny ViT, compiled once, 4 devices equal to 1."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from t2s_jax import config as config_lib, losses, optim, steps
from t2s_jax.models import heads
from t2s_jax.uda.source import SourceTerm

sys.path.insert(0, os.path.dirname(__file__))
import test_masking  # noqa: E402
import test_steps  # noqa: E402


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
    assert 0.07 < float(jnp.std(heads.VFMHead((64,), num_classes=19, dtype=jnp.float32, rngs=nnx.Rngs(1)).classifier.kernel.value)) < 0.13


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
    per_pixel = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.where(labels == 255, 0, labels)[..., None], -1)[..., 0]
    valid = np.asarray(labels) != 255
    expected = per_pixel[valid].sum() / (valid.sum() if mean_over == "valid" else valid.size)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="config.uda.source_loss_mean='mean'"):
        config.uda.source_loss_mean = "mean"
        SourceTerm(config)
