"""Pretrained-weight import: parity with `transformers` SegFormer, the mmseg `.pth` layout, bad
checkpoints, and the Orbax conversion. Reference models are random-initialised (no downloads)."""

import functools
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerModel

from t2s_jax import checkpointing, main
from t2s_jax import config as config_lib
from t2s_jax.models import (
    WeightsError,
    MiT,
    Segmentor,
    build_encoder,
    from_hf_pretrained,
    load_pretrained_encoder,
    load_segmentor,
    maybe_load_pretrained,
    model_config_from_hf,
)
from t2s_jax.models.convert import convert_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

# Two shapes of the reference; inputs are non-square with sides that are not multiples of 32.
CONFIG_A = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 2], num_attention_heads=[1, 2, 3, 4],
                sr_ratios=[8, 4, 2, 1], decoder_hidden_size=32, num_labels=5)
CONFIG_B = dict(hidden_sizes=[8, 16, 24, 32], depths=[2, 1, 3, 1], num_attention_heads=[1, 1, 2, 2],
                sr_ratios=[4, 2, 2, 1], mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=24, num_labels=3)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter and BatchNorm statistic away from its init, so mix-ups show."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model.eval()


@functools.cache
def reference(kind: str, config_name: str):
    """(torch model, HF config) of one reference configuration, built once per session."""
    hf_config = SegformerConfig(**{"A": CONFIG_A, "B": CONFIG_B}[config_name])
    cls = SegformerForSemanticSegmentation if kind == "segmentation" else SegformerModel
    return perturbed(cls(hf_config), seed=len(kind) + ord(config_name)), hf_config


def save_hf(model, directory) -> dict:
    """`save_pretrained` into `directory`; returns the saved tensors (the published key names)."""
    model.save_pretrained(directory)
    return safetensors.torch.load_file(directory / "model.safetensors")


def torch_outputs(model, images_nhwc: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2)), output_hidden_states=True)
    stages = [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states]
    logits = out.logits.numpy().transpose(0, 2, 3, 1) if hasattr(out, "logits") else None
    return stages, logits


# Tiny models: compiling dominates the run time, and XLA's CPU backend optimisations halve
# the compile time for nothing here.


@functools.partial(jax.jit, static_argnums=0)
def _evaluate(graphdef, state, images_nhwc):
    model = nnx.merge(graphdef, state)
    if isinstance(model, Segmentor):
        out = model.forward(images_nhwc)
        # The plain call API, `model(images, train=False)`, gives the same logits.
        return out.encoder_features, jnp.stack([out.logits, model(images_nhwc, train=False)])
    return model(images_nhwc), None


def run(model, images_nhwc: np.ndarray):
    """Jitted evaluation forward of a Segmentor (stages, logits) or a MiT (stages, None)."""
    graphdef, state = nnx.split(model)
    stages, logits = _evaluate(graphdef, state, images_nhwc)
    if logits is not None:
        np.testing.assert_array_equal(logits[0], logits[1])
        logits = logits[0]
    return stages, logits


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def images(batch, height, width, seed=0):
    return np.random.RandomState(seed).randn(batch, height, width, 3).astype(np.float32)


def mmseg_layout(hf_state: dict) -> dict:
    """HF SegFormer encoder tensors renamed to the SegFormer/mmseg MiT layout, written out by hand."""
    out = {}
    for key, value in hf_state.items():
        key = key.removeprefix("segformer.")
        if not key.startswith("encoder."):
            continue
        parts = key.split(".")
        if parts[1] == "patch_embeddings":  # encoder.patch_embeddings.i.{proj,layer_norm}.leaf
            out[f"patch_embed{int(parts[2]) + 1}.{'proj' if parts[3] == 'proj' else 'norm'}.{parts[4]}"] = value
        elif parts[1] == "layer_norm":  # encoder.layer_norm.i.leaf
            out[f"norm{int(parts[2]) + 1}.{parts[3]}"] = value
        else:  # encoder.block.i.j.<module>.leaf
            prefix, module, leaf = f"block{int(parts[2]) + 1}.{parts[3]}", ".".join(parts[4:-1]), parts[-1]
            renamed = {"attention.self.query": "attn.q", "attention.self.sr": "attn.sr",
                       "attention.self.layer_norm": "attn.norm", "attention.output.dense": "attn.proj",
                       "layer_norm_1": "norm1", "layer_norm_2": "norm2", "mlp.dense1": "mlp.fc1",
                       "mlp.dwconv.dwconv": "mlp.dwconv.dwconv", "mlp.dense2": "mlp.fc2"}
            if module == "attention.self.key":
                value_key = key.replace("attention.self.key", "attention.self.value")
                value_tensor = hf_state.get(value_key, hf_state.get("segformer." + value_key))
                out[f"{prefix}.attn.kv.{leaf}"] = torch.cat([value, value_tensor])
            elif module != "attention.self.value":
                out[f"{prefix}.{renamed[module]}.{leaf}"] = value
    return out


def abstract_encoder(hf_config, scan_blocks=False) -> MiT:
    model_config = model_config_from_hf(hf_config.to_dict(), with_head=False, scan_blocks=scan_blocks)
    return nnx.eval_shape(lambda: build_encoder(model_config.encoder, model_config, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "config_name,scan_blocks,size_hw", [("A", False, (75, 101)), ("B", True, (50, 37))]
)
def test_hf_segmentation_parity(tmp_path, config_name, scan_blocks, size_hw):
    torch_model, _ = reference("segmentation", config_name)
    torch_model.save_pretrained(tmp_path)
    model = from_hf_pretrained(tmp_path, scan_blocks=scan_blocks)
    assert isinstance(model, Segmentor) and model.head.__class__.__name__ == "SegFormerHead"
    x = images(2, *size_hw)
    expected_stages, expected_logits = torch_outputs(torch_model, x)
    stages, logits = run(model, x)
    for i, (got, expected) in enumerate(zip(stages, expected_stages, strict=True)):
        assert got.shape == expected.shape, i
        assert rel_err(got, expected) <= 1e-4, f"stage {i + 1}"
    assert logits.shape == expected_logits.shape
    assert rel_err(logits, expected_logits) <= 1e-4


def test_hf_encoder_only_checkpoint_gives_mit(tmp_path):
    torch_model, _ = reference("encoder", "B")
    torch_model.save_pretrained(tmp_path)
    model = from_hf_pretrained(tmp_path)
    assert isinstance(model, MiT)
    x = images(1, 40, 56)
    expected_stages, _ = torch_outputs(torch_model, x)
    stages, _ = run(model, x)
    for got, expected in zip(stages, expected_stages, strict=True):
        assert rel_err(got, expected) <= 1e-4


# ----------------------------------------------------------------------------- PyTorch files


def test_mmseg_pth_layout_matches_hf_import(tmp_path):
    torch_model, hf_config = reference("segmentation", "A")
    state = mmseg_layout(save_hf(torch_model, tmp_path / "hf"))
    assert "block1.0.attn.kv.weight" in state and "block1.0.mlp.dwconv.dwconv.weight" in state
    state["head.weight"] = torch.zeros(1000, 64)  # the ImageNet classifier of the published files
    state["head.bias"] = torch.zeros(1000)
    torch.save({"state_dict": state, "meta": {"epoch": 300}}, tmp_path / "mit.pth")
    # mmseg full-model layout: backbone. prefix, decode head alongside.
    full = {f"backbone.{k}": v for k, v in state.items()} | {"decode_head.conv_seg.weight": torch.zeros(5, 32, 1, 1)}
    torch.save(full, tmp_path / "mmseg_full.pth")

    x = images(1, 75, 101)
    hf_stages, _ = run(from_hf_pretrained(tmp_path / "hf").encoder, x)
    for name, scan_blocks in (("mit.pth", False), ("mmseg_full.pth", True)):
        encoder = abstract_encoder(hf_config, scan_blocks)
        summary = load_pretrained_encoder(encoder, tmp_path / name)
        assert summary.loaded_tensors == len(state) - 2
        assert summary.parameter_count == sum(v.numel() for v in state.values()) - 65000
        assert summary.ignored == ("head.bias", "head.weight")
        stages, _ = run(encoder, x)
        for got, expected in zip(stages, hf_stages, strict=True):
            assert rel_err(got, expected) <= 1e-5, (name, scan_blocks)


def test_transformers_state_dict_pth_and_safetensors_file(tmp_path):
    """A `.pth` of `model.state_dict()` (transformers' in-memory module names) and a bare
    `.safetensors` file of a SegformerModel both load into a Segmentor's encoder."""
    torch_model, hf_config = reference("segmentation", "A")
    torch.save(torch_model.state_dict(), tmp_path / "state_dict.pth")
    assert any(".q_proj." in k for k in torch_model.state_dict())  # the names differ from the saved layout
    encoder_model, _ = reference("encoder", "A")
    encoder_model.save_pretrained(tmp_path / "hf_encoder")
    x = images(1, 64, 48)
    expected, _ = torch_outputs(torch_model, x)
    expected_encoder_only, _ = torch_outputs(encoder_model, x)

    model_config = config_lib.default_config().model
    model_config.encoder = model_config_from_hf(hf_config.to_dict(), with_head=False).encoder
    model_config.projector.enabled = False
    model_config.pretrained = str(tmp_path / "state_dict.pth")
    segmentor = nnx.eval_shape(lambda: Segmentor(model_config, rngs=nnx.Rngs(0)))
    summary = maybe_load_pretrained(segmentor, model_config)
    assert summary.loaded_tensors > 0 and not summary.missing
    stages, _ = run(segmentor.encoder, x)
    for got, want in zip(stages, expected, strict=True):
        assert rel_err(got, want) <= 1e-4

    encoder = abstract_encoder(hf_config)
    load_pretrained_encoder(encoder, tmp_path / "hf_encoder" / "model.safetensors")
    stages, _ = run(encoder, x)
    for got, want in zip(stages, expected_encoder_only, strict=True):
        assert rel_err(got, want) <= 1e-4


# ----------------------------------------------------------------------------- bad checkpoints


def test_truncated_files_name_the_file(tmp_path):
    torch_model, hf_config = reference("encoder", "A")
    torch.save(mmseg_layout(save_hf(torch_model, tmp_path / "hf")), tmp_path / "good.pth")
    sources = {"cut.pth": tmp_path / "good.pth", "cut.safetensors": tmp_path / "hf" / "model.safetensors"}
    for name, source in sources.items():
        data = source.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(WeightsError, match=f"cannot read .*{name}"):
            load_pretrained_encoder(abstract_encoder(hf_config), tmp_path / name)
    with pytest.raises(WeightsError, match="not found: .*absent.pth"):
        load_pretrained_encoder(abstract_encoder(hf_config), tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match="no config.json"):
        from_hf_pretrained(tmp_path)
    # Neither kind: the message names the path and what is accepted.
    encoder = abstract_encoder(hf_config)  # the checks fail before anything is loaded into it
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(WeightsError, match="unknown checkpoint kind: .*weights.npz; accepted: a PyTorch file"):
        load_pretrained_encoder(encoder, tmp_path / "weights.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"empty is not a checkpoint directory .*state/ \+ model_config.json"):
        load_pretrained_encoder(encoder, tmp_path / "empty")
    with pytest.raises(WeightsError, match="empty is not a segmentor checkpoint directory"):
        load_segmentor(tmp_path / "empty")


def _refusal(capsys, config, workdir, **run_options) -> str:
    """The one line `main.run` refuses the command with (exit 2), after checking it left no workdir."""
    with pytest.raises(SystemExit) as stop:
        main.run(config, str(workdir), **run_options)
    stderr = capsys.readouterr().err
    assert stop.value.code == 2, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    assert not os.path.exists(workdir)
    return stderr.strip()


def test_missing_or_garbage_pretrained_weights_are_refused_before_the_workdir(tmp_path, capsys):
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 64)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00{bad}")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    config = tiny.tiny_config(str(tmp_path / "no_data"))
    workdir = tmp_path / "run"
    refusals = {
        "absent.pth": r"config.model.pretrained: checkpoint not found: .*absent.pth; accepted: a PyTorch file .*"
                      r"mmseg MiT layout.*Hugging Face directory.*python -m t2s_jax.models.convert.*",
        "garbage.pth": r"config.model.pretrained: cannot read PyTorch checkpoint .*garbage.pth with "
                       r"torch.load\(weights_only=True\): .*; expected a state dict of tensors, e.g. .*mit_b5.pth",
        "garbage.safetensors": r"config.model.pretrained: cannot read safetensors file .*garbage.safetensors: .*",
    }
    for name, expected in refusals.items():
        config.model.pretrained = str(tmp_path / name)
        assert re.fullmatch(f"error: {expected}", _refusal(capsys, config, workdir))
    config.model.pretrained = ""
    refusals = {
        "absent": r"--pretrained: .*absent does not exist; expected a Hugging Face SegFormer directory .*"
                  r"or a directory written by `python -m t2s_jax.models.convert`.*",
        "garbage.pth": r"--pretrained: .*garbage.pth is not a segmentor checkpoint directory; expected .*",
        "hf": r"--pretrained: cannot read .*hf/config.json: .*; expected a SegFormer config.json",
    }
    for name, expected in refusals.items():
        line = _refusal(capsys, config, workdir, mode="eval", pretrained=str(tmp_path / name))
        assert re.fullmatch(f"error: {expected}", line)


def test_missing_pretrained_weights_on_the_command_line(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "t2s_jax.main", f"--config={tiny.DEMO_CONFIG}", f"--workdir={workdir}",
         f"--config.model.pretrained={tmp_path / 'mit_b5.pth'}", "--config.train.num_steps=2"],
        cwd=tiny.REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: config.model.pretrained: checkpoint not found: {tmp_path}/mit_b5.pth;")
    assert result.stderr.count("\n") == 1 and not os.path.exists(workdir)
    # The conversion command: the same one line, nothing written.
    result = subprocess.run(
        [sys.executable, "-m", "t2s_jax.models.convert", f"--checkpoint={tmp_path / 'mit_b5.pth'}",
         f"--output={tmp_path / 'out'}", f"--config={tiny.DEMO_CONFIG}"],
        cwd=tiny.REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: checkpoint not found: {tmp_path}/mit_b5.pth;"), result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "out")


def test_wrong_layout_reports_missing_and_unexpected_keys(tmp_path):
    torch_model, hf_config = reference("encoder", "A")
    expected_keys = mmseg_layout(save_hf(torch_model, tmp_path / "hf"))
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.bias": torch.zeros(10)}, tmp_path / "resnet.pth")
    with pytest.raises(WeightsError) as error:
        load_pretrained_encoder(abstract_encoder(hf_config), tmp_path / "resnet.pth")
    message = str(error.value)
    assert "resnet.pth" in message
    assert "unexpected: conv1.weight, fc.bias" in message
    assert "no key matched" in message
    assert f"{len(expected_keys)} missing: " in message and "patch_embed1.proj.weight" in message


def test_shape_mismatch_and_strict_false(tmp_path, caplog):
    torch_model, hf_config = reference("encoder", "A")
    state = mmseg_layout(save_hf(torch_model, tmp_path / "hf"))
    torch.save(state, tmp_path / "mit.pth")
    wider = SegformerConfig(**(CONFIG_A | {"hidden_sizes": [16, 32, 48, 72]}))
    with pytest.raises(WeightsError) as error:
        load_pretrained_encoder(abstract_encoder(wider), tmp_path / "mit.pth")
    message = str(error.value)
    assert "mit.pth" in message and "shape mismatch" in message
    assert "block4.0.attn.q.weight (64, 64) does not fit" in message and "(72, 72)" in message
    assert "patch_embed1" not in message  # stages 1-3 fit

    del state["norm4.weight"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "partial.pth")
    expected = r"(?s)partial\.pth.*1 missing: norm4\.weight.*1 unexpected: extra\.weight"
    with pytest.raises(WeightsError, match=expected):
        load_pretrained_encoder(abstract_encoder(hf_config), tmp_path / "partial.pth")
    encoder = abstract_encoder(hf_config)
    nnx.update(encoder, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nnx.state(encoder)))
    with caplog.at_level(logging.WARNING):
        summary = load_pretrained_encoder(encoder, tmp_path / "partial.pth", strict=False)
    assert summary.missing == ("norm4.weight",) and summary.unexpected == ("extra.weight",)
    assert "norm4.weight" in caplog.text
    np.testing.assert_array_equal(encoder.stages[3].norm.scale[...], 0.0)  # left as it was
    np.testing.assert_array_equal(encoder.stages[3].norm.bias[...], state["norm4.bias"].numpy())  # loaded


# ----------------------------------------------------------------------------- conversion


def test_convert_hf_checkpoint_to_orbax(tmp_path):
    torch_model, _ = reference("segmentation", "B")
    saved = save_hf(torch_model, tmp_path / "hf")
    summary = convert_checkpoint(tmp_path / "hf", tmp_path / "orbax")
    assert summary.parameter_count == sum(p.numel() for p in torch_model.parameters())
    # All saved tensors but BatchNorm's step counter, with each key/value pair fused into one kv.
    assert summary.loaded_tensors == len(saved) - 1 - sum(1 for k in saved if "attention.self.value" in k)
    model = from_hf_pretrained(tmp_path / "hf")
    expected = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    abstract = {
        "params": jax.eval_shape(lambda: expected),
        "batch_stats": jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))),
    }
    restored = checkpointing.restore_tree(str(tmp_path / "orbax" / "state"), abstract)
    assert jax.tree.structure(restored["params"]) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        restored["batch_stats"]["head"]["linear_fuse"]["bn"]["var"],
        torch_model.decode_head.batch_norm.running_var.numpy(),
    )
    assert (tmp_path / "orbax" / "model_config.json").is_file()


def test_convert_cli_with_config_loads_encoder_under_daformer_head(tmp_path):
    """`python -m t2s_jax.models.convert --config=...`: MiT weights under the configured segmentor;
    the output directory then serves as `model.pretrained` and as `--mode=eval --pretrained`."""
    torch_model, hf_config = reference("encoder", "B")
    state = mmseg_layout(save_hf(torch_model, tmp_path / "hf"))
    torch.save(state, tmp_path / "mit.pth")
    (tmp_path / "tiny.py").write_text(
        "from t2s_jax import config as config_lib\n"
        "def get_config():\n"
        "    config = config_lib.default_config()\n"
        f"    config.model.encoder = config_lib.mit_config('b0', embed_dims={tuple(CONFIG_B['hidden_sizes'])},\n"
        f"        depths={tuple(CONFIG_B['depths'])}, num_heads={tuple(CONFIG_B['num_attention_heads'])},\n"
        f"        sr_ratios={tuple(CONFIG_B['sr_ratios'])}, mlp_ratio=2)\n"
        "    config.model.head_channels = 8\n"
        "    config.model.projector.enabled = False\n"
        "    config.model.scan_blocks = True\n"
        "    return config\n"
    )
    command = [sys.executable, "-m", "t2s_jax.models.convert", f"--checkpoint={tmp_path / 'mit.pth'}",
               f"--output={tmp_path / 'out'}", f"--config={tmp_path / 'tiny.py'}"]
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {len(state)} tensors" in result.stdout
    model_config = ml_collections.ConfigDict(json.loads((tmp_path / "out" / "model_config.json").read_text()))
    assert model_config.head == "daformer" and model_config.pretrained == str(tmp_path / "mit.pth")
    restored = checkpointing.restore_tree(str(tmp_path / "out" / "state"))
    kv = restored["params"]["encoder"]["stages"]["2"]["blocks"]["attn"]["kv"]["kernel"]  # stacked: 3 blocks
    np.testing.assert_array_equal(kv[1], state["block3.1.attn.kv.weight"].numpy().T)
    assert "aspp_1x1" in restored["params"]["head"]

    # --mode=eval --pretrained=the directory: the whole segmentor, its encoder as from the .pth.
    segmentor = load_segmentor(tmp_path / "out")
    assert segmentor.head.__class__.__name__ == "DAFormerHead"
    from_pth = abstract_encoder(hf_config, scan_blocks=True)
    from_dir = nnx.clone(from_pth)
    load_pretrained_encoder(from_pth, tmp_path / "mit.pth")
    expected = nnx.to_flat_state(nnx.state(from_pth))
    loaded = dict(nnx.to_flat_state(nnx.state(segmentor.encoder)))
    assert set(loaded) == {path for path, _ in expected}
    for path, want in expected:
        np.testing.assert_array_equal(loaded[path].get_value(), want.get_value(), err_msg=str(path))
    # model.pretrained = the directory: the encoder again, through the canonical keys.
    summary = load_pretrained_encoder(from_dir, tmp_path / "out")
    assert summary.loaded_tensors == len(state) and summary.path == str(tmp_path / "out")
    for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(from_dir)), expected, strict=True):
        np.testing.assert_array_equal(got.get_value(), want.get_value(), err_msg=str(path))
    np.testing.assert_array_equal(segmentor.head.aspp_1x1.conv.kernel[...],
                                  restored["params"]["head"]["aspp_1x1"]["conv"]["kernel"])
