"""The DINOv2 ViT encoder and its weight import, against transformers' Dinov2Model /
Dinov2WithRegistersModel (random weights, tiny shapes) and DINOv2's own position-embedding
interpolation re-expressed in PyTorch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from safetensors.numpy import load_file

from t2s_jax import config as config_lib
from t2s_jax.models import vit as vit_lib
from t2s_jax.models.weights import WeightsError, load_pretrained_encoder

DIM, DEPTH, HEADS, PATCH, PRETRAIN = 32, 2, 2, 14, 56  # a 4 x 4 position grid
TINY_SETTINGS = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, pretrain_size=PRETRAIN)  # config.model.encoder
LARGE = 126  # 9 x 9 tokens: the analogue of 1120 (80 x 80) against 518 (37 x 37)


def _encoder_config(**overrides):
    # input_scale 1: the parity tests feed the ViT its input size.
    return config_lib.vit_config("s", **{**TINY_SETTINGS, "input_scale": 1.0, **overrides})


def _vit(*, scan_blocks=True, seed=0, **overrides) -> vit_lib.ViT:
    model_config = config_lib.default_config().model
    model_config.dtype, model_config.scan_blocks, model_config.remat = "float32", scan_blocks, "none"
    return vit_lib.build_vit(_encoder_config(**overrides), model_config, rngs=nnx.Rngs(seed))


def _hf_model(*, registers=0, swiglu=False, seed=0):
    """A random transformers DINOv2 in eval mode; every parameter perturbed (LayerNorms, LayerScale,
    biases and the mask token are constants at init), unit-variance position embeddings (so their
    resampling shows in the tokens)."""
    torch.manual_seed(seed)
    settings = dict(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=PRETRAIN, patch_size=PATCH
    )
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **settings)
        )
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(use_swiglu_ffn=swiglu, **settings))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        model.embeddings.position_embeddings.normal_()
    return model.eval()


def _images(size_hw, batch=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *size_hw, 3)).astype(np.float32)


def _hf_tokens(model, images, registers=0, mask=None) -> np.ndarray:
    """transformers' final-norm patch tokens on their grid, (B, h, w, D)."""
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        out = model(pixel_values=pixels, bool_masked_pos=None if mask is None else torch.from_numpy(mask))
    tokens = out.last_hidden_state[:, 1 + registers :].numpy()
    return tokens.reshape(images.shape[0], images.shape[1] // PATCH, images.shape[2] // PATCH, -1)


def _tokens(model, images, mask=None) -> np.ndarray:
    (tokens,) = model(jnp.asarray(images), token_mask=None if mask is None else jnp.asarray(mask))
    return np.asarray(tokens)


def _assert_close(ours, reference, rtol=1e-4):
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error < rtol, f"relative error {error:.2e}"


def _hub_interpolate_pos_encoding(embeddings_module):
    """DINOv2 hub's `interpolate_pos_encoding` (scale_factor (n + 0.1) / M, no antialias), for
    transformers' embedding module."""

    def interpolate(embeddings, height, width):
        pos = embeddings_module.position_embeddings.float()
        num_positions = pos.shape[1] - 1
        if embeddings.shape[1] - 1 == num_positions and height == width:
            return embeddings_module.position_embeddings
        side, dim = int(math.sqrt(num_positions)), pos.shape[-1]
        rows, cols = height // PATCH, width // PATCH
        patch_pos = F.interpolate(
            pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=False,
            scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
        )
        assert patch_pos.shape[-2:] == (rows, cols)
        return torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    return interpolate


# Hugging Face on-disk names -> the published torch.hub names (the hub `_pretrain.pth` layout).
_HUB_NAMES = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.mask_token", "mask_token"),
    ("embeddings.register_tokens", "register_tokens"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("encoder.layer.", "blocks."),
    (".attention.output.dense.", ".attn.proj."),
    (".layer_scale1.lambda1", ".ls1.gamma"),
    (".layer_scale2.lambda1", ".ls2.gamma"),
    (".mlp.weights_in.", ".mlp.w12."),
    (".mlp.weights_out.", ".mlp.w3."),
    ("layernorm.", "norm."),
)


def _hub_state_dict(hf_directory) -> dict[str, torch.Tensor]:
    """The hub state dict of a saved transformers DINOv2: renamed keys, q/k/v fused into qkv."""
    hub = {}
    for key, value in load_file(str(hf_directory / "model.safetensors")).items():
        for old, new in _HUB_NAMES:
            key = key.replace(old, new)
        hub[key] = torch.from_numpy(value)
    for i in range(DEPTH):
        for leaf in ("weight", "bias"):
            parts = [hub.pop(f"blocks.{i}.attention.attention.{p}.{leaf}") for p in ("query", "key", "value")]
            hub[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts)
    return hub


def save_hub_checkpoint(path, *, directory) -> None:
    """A random DINOv2 of `TINY_SETTINGS` written as torch.hub's `.pth` at `path` (via its
    transformers twin saved in `directory`)."""
    _hf_model().save_pretrained(directory)
    torch.save(_hub_state_dict(directory), path)


# ----------------------------------------------------------------------------- parity


def test_hf_parity_at_pretrain_size_scanned_and_unscanned(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    images = _images((PRETRAIN, PRETRAIN))
    mask = np.random.default_rng(1).random((2, (PRETRAIN // PATCH) ** 2)) < 0.5
    scanned, unrolled = _vit(scan_blocks=True), _vit(scan_blocks=False, seed=1)
    for model in (scanned, unrolled):
        summary = load_pretrained_encoder(model, tmp_path / "hf")
        assert summary.loaded_values == summary.parameter_count
    reference = _hf_tokens(hf, images)
    jitted = nnx.jit(lambda model, images: model(images)[0])  # as the steps call it
    _assert_close(np.asarray(jitted(scanned, jnp.asarray(images))), reference)
    np.testing.assert_allclose(_tokens(unrolled, images), _tokens(scanned, images), atol=1e-5)
    # The token mask is transformers' bool_masked_pos.
    _assert_close(_tokens(scanned, images, mask), _hf_tokens(hf, images, mask=mask))


def test_hf_registers_parity_at_pretrain_and_larger_size(tmp_path):
    hf = _hf_model(registers=4)
    hf.save_pretrained(tmp_path / "hf")
    model = _vit(num_register_tokens=4, pos_interpolation="size_antialias")
    load_pretrained_encoder(model, tmp_path / "hf")
    for size_hw in ((PRETRAIN, PRETRAIN), (LARGE, LARGE), (70, LARGE)):
        images = _images(size_hw)
        _assert_close(_tokens(model, images), _hf_tokens(hf, images, registers=4))


def test_hub_interpolation_at_larger_input_follows_dinov2_not_transformers(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    images = _images((LARGE, LARGE))
    hf_size_mode = _hf_tokens(hf, images)
    hf.embeddings.interpolate_pos_encoding = _hub_interpolate_pos_encoding(hf.embeddings)
    dinov2 = _hf_tokens(hf, images)
    ours = {}
    for mode in ("hub", "size"):
        model = _vit(pos_interpolation=mode)
        load_pretrained_encoder(model, tmp_path / "hf")
        ours[mode] = _tokens(model, images)
    _assert_close(ours["hub"], dinov2)
    _assert_close(ours["size"], hf_size_mode)
    difference = np.abs(ours["hub"] - hf_size_mode).max() / np.abs(hf_size_mode).max()
    assert difference > 1e-2, f"hub and size modes agree to {difference:.1e}: the test could not tell them apart"


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_hub_and_hf_layouts_import_to_the_same_outputs(tmp_path, ffn):
    hf = _hf_model(swiglu=ffn == "swiglu")
    hf.save_pretrained(tmp_path / "hf")
    hub = _hub_state_dict(tmp_path / "hf")
    torch.save(hub, tmp_path / "dinov2_pretrain.pth")
    # A VFM-UDA Lightning checkpoint: the encoder under `network.encoder.`, beside the head.
    wrapped = {f"network.encoder.{k}": v for k, v in hub.items()} | {"network.upscale.0.weight": torch.zeros(3)}
    torch.save({"state_dict": wrapped}, tmp_path / "vfm_uda.ckpt")
    # transformers >= 5 module names (q_proj / ..., gate_proj / up_proj / down_proj).
    torch.save(hf.state_dict(), tmp_path / "hf_modules.bin")
    images = _images((PRETRAIN, PRETRAIN))
    reference = _hf_tokens(hf, images)
    for path in ("hf", "hf/model.safetensors", "dinov2_pretrain.pth", "vfm_uda.ckpt", "hf_modules.bin"):
        model = _vit(ffn=ffn, seed=3)
        summary = load_pretrained_encoder(model, tmp_path / path)
        assert summary.loaded_values == summary.parameter_count, path
        _assert_close(_tokens(model, images), reference)


# ----------------------------------------------------------------------------- pieces


def test_token_mask_replaces_patch_embeddings_before_the_position_embedding():
    model = _vit(num_register_tokens=2)
    model.mask_token[...] = jax.random.normal(jax.random.key(5), (1, DIM))
    images = jnp.asarray(_images((LARGE, LARGE)))
    mask = np.random.default_rng(2).random((2, (LARGE // PATCH) ** 2)) < 0.7
    plain, masked = np.asarray(model.embed(images)), np.asarray(model.embed(images, jnp.asarray(mask)))
    assert plain.shape == (2, 1 + 2 + 81, DIM)
    patch_pos = np.asarray(model.pos_embedding((LARGE // PATCH, LARGE // PATCH)))[1:]
    expected = np.where(mask[..., None], np.asarray(model.mask_token[...]) + patch_pos, plain[:, 3:])
    np.testing.assert_allclose(masked[:, 3:], expected, atol=1e-6)
    np.testing.assert_array_equal(masked[:, :3], plain[:, :3])  # cls and registers untouched
    assert mask.any() and (~mask).any()


@pytest.mark.parametrize("mode", vit_lib.POS_INTERPOLATIONS)
@pytest.mark.parametrize("grid, out_hw", [(37, (80, 80)), (37, (29, 29)), (4, (9, 5)), (5, (5, 7))])
def test_pos_resampling_matches_torch_interpolate(mode, grid, out_hw):
    pos = torch.randn(1, 8, grid, grid)
    if mode == "hub":  # as DINOv2's interpolate_pos_encoding calls it
        scale_factor = tuple((n + vit_lib.HUB_INTERPOLATE_OFFSET) / grid for n in out_hw)
        reference = F.interpolate(pos, scale_factor=scale_factor, mode="bicubic", antialias=False)
    else:  # as transformers' Dinov2Model / Dinov2WithRegistersModel call it
        antialias = mode == "size_antialias"
        reference = F.interpolate(pos, size=out_hw, mode="bicubic", align_corners=False, antialias=antialias)
    ours = vit_lib.resample_pos_grid(jnp.asarray(pos[0].permute(1, 2, 0).numpy()), out_hw, mode)
    np.testing.assert_allclose(np.asarray(ours), reference[0].permute(1, 2, 0).numpy(), atol=2e-5)


def test_pos_resampling_keeps_the_pretrained_grid_and_differs_from_jax_cubic():
    grid = jax.random.normal(jax.random.key(0), (4, 4, 3))
    for mode in vit_lib.POS_INTERPOLATIONS:
        np.testing.assert_array_equal(np.asarray(vit_lib.resample_pos_grid(grid, (4, 4), mode)), np.asarray(grid))
    jax_cubic = jax.image.resize(grid, (9, 9, 3), "cubic", antialias=False)
    assert np.abs(np.asarray(vit_lib.resample_pos_grid(grid, (9, 9), "size") - jax_cubic)).max() > 1e-2


def _pos_embed_gradient(model, images) -> np.ndarray:
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        (tokens,) = nnx.merge(graphdef, params)(images)
        return jnp.sum(tokens * jnp.arange(DIM))

    return np.asarray(jax.grad(loss)(params)["pos_embed"][...])[0]


def test_pos_embed_gradient_flows_through_the_interpolation_with_and_without_remat():
    images = jnp.asarray(_images((LARGE, 70), batch=1))
    grad = _pos_embed_gradient(_vit(), images)
    assert np.all(np.abs(grad[1:]).sum(-1) > 0)  # every pretrained grid entry reaches the output
    assert np.abs(grad[0]).sum() > 0
    model_config = config_lib.default_config().model
    model_config.dtype, model_config.scan_blocks, model_config.remat = "float32", True, "full"
    rematerialised = vit_lib.build_vit(_encoder_config(), model_config, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_pos_embed_gradient(rematerialised, images), grad, rtol=1e-5, atol=1e-6)


def test_drop_path_only_with_a_key_and_a_rate():
    images = jnp.asarray(_images((PRETRAIN, PRETRAIN), batch=8))
    key = jax.random.key(0)
    still, dropping = _vit(), _vit(drop_path_rate=0.9)
    assert dropping.drop_path_rates == (0.0, 0.9)
    np.testing.assert_array_equal(_tokens(still, images), np.asarray(still(images, dropout_key=key)[0]))
    np.testing.assert_array_equal(_tokens(dropping, images), _tokens(still, images))  # same seed, no key
    assert not np.allclose(np.asarray(dropping(images, dropout_key=key)[0]), _tokens(dropping, images))


def test_config_keys_reach_the_model():
    model = _vit(num_register_tokens=3, layerscale_init=0.5, mlp_ratio=2, norm_eps=1e-3, patch_size=7, pretrain_size=42)
    assert model.register_tokens.shape == (1, 3, DIM) and model.pos_embed.shape == (1, 1 + 36, DIM)
    assert np.all(np.asarray(model.blocks.ls1.gamma[...]) == 0.5)
    assert model.blocks.mlp.fc1.kernel.shape == (DEPTH, DIM, 2 * DIM)
    assert model.blocks.norm1.epsilon == 1e-3 and model.norm.epsilon == 1e-3
    assert model.mask_token.shape == (1, DIM) and np.all(np.asarray(model.mask_token[...]) == 0)
    (tokens,) = model(jnp.zeros((1, 28, 35, 3)))
    assert tokens.shape == (1, 4, 5, DIM)
    assert vit_lib.output_strides(_encoder_config(patch_size=7)) == (7,)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.embed(jnp.zeros((1, 28, 30, 3)))  # the call resizes first (`input_scale`)
    model_config = config_lib.default_config().model
    model_config.dtype = "bfloat16"
    half = vit_lib.build_vit(_encoder_config(), model_config, rngs=nnx.Rngs(0))
    assert half(jnp.zeros((1, PRETRAIN, PRETRAIN, 3)))[0].dtype == jnp.bfloat16
    assert half.pos_embed[...].dtype == jnp.float32  # parameters stay float32


def test_the_input_is_resized_by_input_scale_to_a_multiple_of_the_patch():
    scaled, plain = _vit(input_scale=1.1), _vit(input_scale=1.0)
    images = jnp.asarray(_images((64, 64), batch=1))
    (tokens,) = scaled(images)
    assert tokens.shape == (1, 5, 5, DIM)  # 64 x 1.1 = 70.4 -> 70, VFM-UDA's 1024 -> 1120
    assert vit_lib.token_grid_hw(_encoder_config(input_scale=1.1), (1024, 1024)) == (80, 80)
    resized = jax.image.resize(images, (1, 70, 70, 3), "linear", antialias=False)
    np.testing.assert_allclose(tokens, plain(resized)[0], rtol=1e-6)


def test_presets_match_dinov2_sizes():
    small = nnx.eval_shape(lambda: _vit_preset("s"))
    reference = transformers.Dinov2Model(transformers.Dinov2Config(image_size=518, patch_size=14, hidden_size=384,
                                                                   num_hidden_layers=12, num_attention_heads=6))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param))) == sum(
        p.numel() for p in reference.parameters()
    )
    giant = nnx.eval_shape(lambda: _vit_preset("g"))
    assert giant.blocks.mlp.w12.kernel.shape == (40, 1536, 2 * 4096)  # DINOv2's SwiGLU hidden 4096
    assert giant.blocks.attn.qkv.kernel.shape == (40, 1536, 3 * 1536)
    assert config_lib.vit_config("l").embed_dim == 1024 and config_lib.vit_config("b").num_heads == 12


def _vit_preset(size):
    model_config = config_lib.default_config().model
    return vit_lib.build_vit(config_lib.vit_config(size), model_config, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- errors


def test_wrong_layout_is_refused_on_one_screen(tmp_path):
    mit_keys = ["patch_embed1.proj.weight", "block1.0.attn.q.weight", "block1.0.attn.kv.weight", "norm1.weight"]
    mit_keys += [f"block3.{i}.mlp.fc{j}.weight" for i in range(40) for j in (1, 2)]
    path = tmp_path / "mit_b5.pth"
    torch.save({k: torch.zeros(2) for k in mit_keys}, path)
    with pytest.raises(WeightsError) as error:
        load_pretrained_encoder(_vit(), path)
    message = str(error.value)
    assert str(path) in message and "DINOv2" in message
    assert len(message.splitlines()) == 1 and len(message) < 600, message


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(depth=3), "depth 2 (the model's 3)"),
        (dict(embed_dim=48, num_heads=3), "embed_dim 32 (the model's 48)"),
        (dict(num_register_tokens=4), "num_register_tokens 0 (the model's 4)"),
        (dict(pretrain_size=70), "pretrain_size 56 (the model's 70)"),
        (dict(ffn="swiglu"), "ffn 'mlp' (the model's 'swiglu')"),
    ],
)
def test_a_checkpoint_of_another_size_is_refused_naming_the_file_and_setting(tmp_path, change, named):
    _hf_model().save_pretrained(tmp_path / "hf")
    model = nnx.eval_shape(lambda: _vit(**change))
    with pytest.raises(WeightsError) as error:
        load_pretrained_encoder(model, tmp_path / "hf")
    message = str(error.value)
    assert str(tmp_path / "hf" / "model.safetensors") in message and named in message, message
    assert len(message.splitlines()) == 1 and len(message) < 400, message


def test_non_strict_import_loads_what_fits(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    hub = _hub_state_dict(tmp_path / "hf")
    del hub["mask_token"]  # as VFM-UDA++ checkpoints, which drop DINOv2's mask token
    torch.save(hub, tmp_path / "no_mask_token.pth")
    model = _vit(seed=4)
    with pytest.raises(WeightsError, match="1 missing: mask_token"):
        load_pretrained_encoder(model, tmp_path / "no_mask_token.pth")
    summary = load_pretrained_encoder(model, tmp_path / "no_mask_token.pth", strict=False)
    assert summary.missing == ("mask_token",)
    images = _images((PRETRAIN, PRETRAIN))
    _assert_close(_tokens(model, images), _hf_tokens(hf, images))
