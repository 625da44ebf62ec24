"""ResNet encoders and the DeepLab-V2 head against PyTorch: weight import from `.pth` files in the
torchvision and mmcv ResNetV1c layouts, eval and ghost-batch train mode, remat, bad checkpoints.

The PyTorch reference is torchvision's ResNet written out here (its `Bottleneck`, `_make_layer`
with `replace_stride_with_dilation`, and `forward`), with mmcv's deep stem as an alternative:
torchvision's PyPI wheels need a CUDA build of torch. Reference models are random-initialised.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn
from transformers import ResNetConfig, ResNetModel

from t2s_jax.models import (
    DeepLabV2Head,
    ResNet,
    WeightsError,
    build_resnet,
    count_parameters,
    load_pretrained_encoder,
    load_resnet_pretrained,
    stack_passes,
    unstack_passes,
)
from t2s_jax.models import encoders, resnet
from t2s_jax.models.weights import layouts

BN = dict(bn_momentum=0.9, bn_eps=1e-5)  # PyTorch's momentum 0.1
# torchvision resnet101: 44,549,160 parameters, of which fc holds 2048 * 1000 + 1000.
RESNET101_PARAMETERS_WITHOUT_FC = 44_549_160 - 2_049_000


class TorchBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    """torchvision.models.resnet.ResNet without the classifier; `deep_stem` swaps the 7x7 stem for
    mmcv's ResNetV1c stem (`stem.0/1/3/4/6/7` keys)."""

    def __init__(self, depths, widths=(64, 128, 256, 512), *, stem_channels=64, deep_stem=False,
                 replace_stride_with_dilation=(False, True, True)):
        super().__init__()
        self.inplanes, self.dilation, self.deep_stem = stem_channels, 1, deep_stem
        if deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                nn.Conv2d(half, stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU(),
            )
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(widths[0], depths[0])
        self.layer2 = self._make_layer(widths[1], depths[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(widths[2], depths[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(widths[3], depths[3], 2, replace_stride_with_dilation[2])

    def _make_layer(self, planes, blocks, stride=1, dilate=False):
        downsample, previous_dilation = None, self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        layers = [TorchBottleneck(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * 4
        layers += [TorchBottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return outputs


def randomise_batch_norms(module: nn.Module, seed: int = 0) -> None:
    """Random affine parameters and running statistics, so that eval mode depends on them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                bn.bias.copy_(0.1 * torch.randn(c, generator=generator))
                bn.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)


def save_state_dict(module: nn.Module, path, *, mmseg: bool = False):
    """The module's state dict as a `.pth`; `mmseg`: as a segmentor checkpoint (`state_dict`,
    `backbone.` prefixes, a decode head)."""
    state = module.state_dict()
    if mmseg:
        state = {f"backbone.{k}": v for k, v in state.items()}
        state["decode_head.aspp_modules.0.conv.weight"] = torch.zeros(19, 2048, 3, 3)
        state = {"state_dict": state, "meta": {"iter": 0}}
    torch.save(state, path)
    return path


def torch_stage_outputs(module: nn.Module, images_nhwc: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        outputs = module(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))
    return [o.permute(0, 2, 3, 1).numpy() for o in outputs]


def assert_close(actual, expected, rtol=1e-4):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, (np.abs(actual - expected).max(), scale)


def images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def tiny_resnet(remat="none", **overrides):
    kwargs = dict(depths=(2, 1, 2, 2), base_widths=(4, 8, 8, 16), stem="deep", stem_channels=8, **BN)
    return ResNet(**{**kwargs, **overrides}, remat=remat, rngs=nnx.Rngs(0))


def tiny_torch_resnet(seed=0):
    torch.manual_seed(seed)
    module = TorchResNet((2, 1, 2, 2), (4, 8, 8, 16), stem_channels=8, deep_stem=True)
    randomise_batch_norms(module, seed)
    return module


def test_resnet101_matches_torchvision_after_import(tmp_path):
    torch.manual_seed(0)
    reference = TorchResNet((3, 4, 23, 3)).eval()
    randomise_batch_norms(reference)
    path = save_state_dict(reference, tmp_path / "resnet101.pth")
    model = nnx.eval_shape(lambda: ResNet(depths=(3, 4, 23, 3), stem="7x7", **BN, rngs=nnx.Rngs(0)))
    summary = load_resnet_pretrained(model, path)
    torch_parameters = sum(p.numel() for p in reference.parameters())
    assert count_parameters(model) == torch_parameters == RESNET101_PARAMETERS_WITHOUT_FC
    assert summary.loaded_tensors == len([k for k in reference.state_dict() if "num_batches_tracked" not in k])
    assert model.embed_dims == (256, 512, 1024, 2048) and resnet.output_strides((1, 2, 1, 1)) == (4, 8, 8, 8)
    x = images((1, 64, 96, 3))
    outputs = model(jnp.asarray(x), use_batch_stats=False)
    expected = torch_stage_outputs(reference, x)
    assert [o.shape for o in outputs] == [(1, 16, 24, 256), (1, 8, 12, 512), (1, 8, 12, 1024), (1, 8, 12, 2048)]
    for actual, wanted in zip(outputs, expected, strict=True):
        assert actual.dtype == jnp.float32
        assert_close(actual, wanted)


def test_deep_stem_resnet50_from_mmseg_checkpoint(tmp_path):
    torch.manual_seed(1)
    reference = TorchResNet((3, 4, 6, 3), deep_stem=True).eval()
    randomise_batch_norms(reference, seed=1)
    path = save_state_dict(reference, tmp_path / "segmentor.pth", mmseg=True)
    model = nnx.eval_shape(lambda: ResNet(depths=(3, 4, 6, 3), stem="deep", **BN, rngs=nnx.Rngs(0)))
    summary = load_pretrained_encoder(model, path)  # what config.model.pretrained calls
    assert summary.ignored and all(k.endswith("num_batches_tracked") for k in summary.ignored)
    assert count_parameters(model) == sum(p.numel() for p in reference.parameters())
    x = images((1, 48, 40, 3), seed=1)
    outputs = model(jnp.asarray(x), use_batch_stats=False)
    for actual, wanted in zip(outputs, torch_stage_outputs(reference, x), strict=True):
        assert_close(actual, wanted)


def hf_resnet_to_torchvision_keys(state: dict) -> dict:
    """A `transformers` ResNetModel state dict under torchvision's keys."""
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^embedder\.embedder\.convolution\.", "conv1.", key)
        key = re.sub(r"^embedder\.embedder\.normalization\.", "bn1.", key)
        key = re.sub(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.",
                     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.", key)
        key = re.sub(r"\.shortcut\.convolution\.", ".downsample.0.", key)
        key = re.sub(r"\.shortcut\.normalization\.", ".downsample.1.", key)
        key = re.sub(r"\.layer\.(\d)\.convolution\.", lambda m: f".conv{int(m[1]) + 1}.", key)
        key = re.sub(r"\.layer\.(\d)\.normalization\.", lambda m: f".bn{int(m[1]) + 1}.", key)
        renamed[key] = value
    return renamed


def test_7x7_stem_matches_transformers_resnet(tmp_path):
    """An independent reference for the 7x7 stem and the bottleneck (no dilation there)."""
    torch.manual_seed(2)
    hf_config = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 32, 64], depths=[1, 2, 1, 1],
                             layer_type="bottleneck", downsample_in_first_stage=False)
    reference = ResNetModel(hf_config).eval()
    randomise_batch_norms(reference, seed=2)
    path = tmp_path / "hf_resnet.pth"
    torch.save(hf_resnet_to_torchvision_keys(reference.state_dict()), path)
    model = ResNet(depths=(1, 2, 1, 1), base_widths=(4, 8, 8, 16), stem="7x7", stem_channels=8,
                   strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), **BN, rngs=nnx.Rngs(0))
    load_resnet_pretrained(model, path)
    x = images((1, 40, 56, 3), seed=2)
    outputs = model(jnp.asarray(x), use_batch_stats=False)
    with torch.no_grad():
        hidden = reference(torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states
    for actual, wanted in zip(outputs, hidden[1:], strict=True):
        assert_close(actual, wanted.permute(0, 2, 3, 1).numpy())


def batch_stats_by_key(model: ResNet) -> dict[str, np.ndarray]:
    """The model's running statistics under their PyTorch keys."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
    return {layouts.resnet_keys(path, 0)[0]: np.asarray(v.get_value()) for path, v in flat}


def test_ghost_batch_groups_match_torch_train_forwards_per_group(tmp_path):
    reference = tiny_torch_resnet().train()
    model = tiny_resnet()
    load_resnet_pretrained(model, save_state_dict(reference, tmp_path / "tiny.pth"))
    passes = [images((2, 32, 48, 3), seed=s) for s in (2, 3)]
    outputs = model(stack_passes([jnp.asarray(p) for p in passes]), use_batch_stats=True, num_batch_groups=2)
    for g, x in enumerate(passes):  # torch: one train-mode forward per pass, in order
        for actual, wanted in zip(outputs, torch_stage_outputs(reference, x), strict=True):
            assert_close(unstack_passes(actual, 2)[g], wanted)
    torch_state = reference.state_dict()
    statistics = batch_stats_by_key(model)
    assert len(statistics) == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    for key, value in statistics.items():
        np.testing.assert_allclose(value, torch_state[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_remat_full_gives_the_same_outputs_statistics_and_gradients(tmp_path):
    path = save_state_dict(tiny_torch_resnet(seed=4), tmp_path / "tiny.pth")
    x = jnp.asarray(images((4, 32, 32, 3), seed=4))
    results = []
    for remat in ("none", "full"):
        model = tiny_resnet(remat)
        load_resnet_pretrained(model, path)
        graphdef, params, statistics = nnx.split(model, nnx.Param, nnx.BatchStat)

        def loss(params, statistics, graphdef=graphdef):
            model = nnx.merge(graphdef, params, statistics, copy=True)
            outputs = model(x, use_batch_stats=True, num_batch_groups=2)
            value = sum(jnp.mean(jnp.square(o)) * (k + 1) for k, o in enumerate(outputs))
            return value, (outputs, nnx.state(model, nnx.BatchStat))

        (_, (outputs, new_statistics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, statistics)
        results.append((outputs, new_statistics, grads))
    (outputs_none, stats_none, grads_none), (outputs_full, stats_full, grads_full) = results
    for a, b in zip(outputs_none, outputs_full, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(stats_none)[0], jax.tree.leaves(statistics)[0])  # stats did move
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats_none, stats_full)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_none, grads_full)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads_none))


def test_checkpoint_with_the_other_stem_is_one_clear_error(tmp_path):
    path = save_state_dict(tiny_torch_resnet(), tmp_path / "v1c.pth", mmseg=True)
    model = tiny_resnet(stem="7x7")
    with pytest.raises(WeightsError) as error:
        load_resnet_pretrained(model, path)
    message = str(error.value)
    assert str(path) in message and "'deep' stem" in message and "config.model.encoder.stem" in message
    assert "missing" not in message  # the stem error alone, not the key report


def test_mismatched_checkpoint_reports_missing_unexpected_and_misshaped_keys(tmp_path):
    state = tiny_torch_resnet().state_dict()
    state["layer2.0.conv_two.weight"] = state.pop("layer2.0.conv2.weight")
    state["layer3.1.bn1.weight"] = torch.ones(5)
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        load_resnet_pretrained(tiny_resnet(), path)
    message = str(error.value)
    assert str(path) in message and "the mmcv ResNetV1c / torchvision ResNet layout" in message
    assert "1 missing: layer2.0.conv2.weight" in message
    assert "1 unexpected: layer2.0.conv_two.weight" in message
    assert "layer3.1.bn1.weight (5,) does not fit" in message

    mit_path = tmp_path / "mit_b0.pth"
    torch.save({"patch_embed1.proj.weight": torch.zeros(32, 3, 7, 7), "block1.0.attn.q.weight": torch.zeros(32, 32)},
               mit_path)
    with pytest.raises(WeightsError, match=r"mit_b0\.pth does not fit the ResNet encoder(.|\n)*is this a ResNet"):
        load_pretrained_encoder(tiny_resnet(), mit_path)


def test_build_resnet_from_config_and_init():
    encoder_config = ml_collections.ConfigDict(dict(
        type="resnet", depths=(1, 1, 1, 1), base_widths=(4, 8, 8, 8), stem="7x7", stem_channels=8,
        strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), contract_dilation=False,
    ))
    model_config = ml_collections.ConfigDict(dict(bn_momentum=0.9, bn_eps=1e-5, remat="dots", dtype="bfloat16"))
    model = build_resnet(encoder_config, model_config, rngs=nnx.Rngs(0))
    assert model.embed_dims == (16, 32, 32, 32) and encoders.output_strides(encoder_config) == (4, 8, 16, 16)
    assert model.stages[3][0].conv2.kernel_dilation == 2  # no contraction
    outputs = model(jnp.ones((2, 32, 32, 3)), use_batch_stats=True, dropout_key=jax.random.key(0))
    assert [o.shape[1:3] for o in outputs] == [(8, 8), (4, 4), (2, 2), (2, 2)]
    assert all(o.dtype == jnp.bfloat16 for o in outputs)
    block = model.stages[0][0]  # mmseg's init: Kaiming fan-out convs, BN 1 / 0, the last BN of a block at 0
    assert float(block.bn1.scale[...].min()) == 1.0 and not np.any(block.bn3.scale[...])
    np.testing.assert_allclose(np.std(np.asarray(model.stages[0][0].conv3.kernel[...])), np.sqrt(2 / 16), rtol=0.3)
    with pytest.raises(ValueError, match="config.model.encoder.stem"):
        build_resnet(ml_collections.ConfigDict({**encoder_config.to_dict(), "stem": "3x3"}), model_config,
                     rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dilations", [(6, 12), (6, 12, 18, 24)])
def test_deeplabv2_head_is_the_sum_of_dilated_torch_convs(dilations):
    in_channels, num_classes = 16, 5
    head = DeepLabV2Head((4, 8, 8, in_channels), num_classes=num_classes, dilations=dilations,
                         dtype=jnp.float32, rngs=nnx.Rngs(0))
    kernel = np.asarray(head.aspp_convs[0].kernel[...])
    assert abs(kernel.std() - 0.01) < 0.002 and not np.any(head.aspp_convs[0].bias[...])  # mmseg's init
    torch.manual_seed(0)
    convs = [nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations]
    for conv, torch_conv in zip(head.aspp_convs, convs, strict=True):
        conv.kernel[...] = jnp.asarray(layouts.from_torch(torch_conv.weight.detach().numpy(), "kernel"))
        conv.bias[...] = jnp.asarray(torch_conv.bias.detach().numpy())
    feature = images((2, 9, 13, in_channels), seed=5)
    features = [jnp.zeros((2, 9, 13, c)) for c in (4, 8, 8)] + [jnp.asarray(feature)]
    logits, decoder_feature = head(features, use_batch_stats=True)
    with torch.no_grad():
        x = torch.from_numpy(feature).permute(0, 3, 1, 2)
        expected = sum(conv(x) for conv in convs).permute(0, 2, 3, 1).numpy()
    assert logits.dtype == jnp.float32 and decoder_feature is features[-1]
    assert_close(logits, expected, rtol=1e-5)
