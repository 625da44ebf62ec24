"""DINOv2 weights into a `ViT` encoder: torch.hub state dicts (`dinov2_vit{s,b,l,g}14[_reg]`) and
Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` checkpoints, through one canonical layout.

The canonical layout is the torch.hub one (`cls_token`, `pos_embed`, `mask_token`,
`register_tokens`, `patch_embed.proj.*`, `blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
mlp.fc1, mlp.fc2, ls2.gamma}` (ViT-g: `mlp.w12`, `mlp.w3`), `norm.*`), which the ViT's parameter
names follow. Hugging Face keys are renamed into it, both as `save_pretrained` writes them
(`attention.attention.{query,key,value}`, `attention.output.dense`, `mlp.weights_in/out`) and as
transformers >= 5 modules name them (`attention.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`); the
separate query / key / value projections are concatenated back into `attn.qkv`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from t2s_jax.models.vit import ViT
from t2s_jax.models.weights import layouts
from t2s_jax.models.weights.errors import WeightsError, listing
from t2s_jax.models.weights.loading import LoadSummary, load_variables
from t2s_jax.models.weights.reading import read_checkpoint

HUB_LAYOUT = (
    "the torch.hub DINOv2 layout (cls_token, pos_embed, patch_embed.proj.weight, blocks.N.attn.qkv.weight, ...)"
)
HF_LAYOUT = "a Hugging Face Dinov2Model (embeddings.patch_embeddings.projection.weight, encoder.layer.N.*, ...)"

# The key that marks each layout, and the prefixes it may come under: a whole model of
# VFM-UDA (`network.encoder.`), an mmseg-style segmentor (`backbone.`), a wrapper (`encoder.`);
# transformers' task models nest the backbone under their base-model prefix.
_HUB_MARKER, _HUB_PREFIXES = "patch_embed.proj.weight", ("", "encoder.", "backbone.", "network.encoder.")
_HF_MARKER, _HF_PREFIXES = "embeddings.patch_embeddings.projection.weight", ("", "dinov2.", "dinov2_with_registers.")

_HF_EMBEDDINGS = {
    "cls_token": "cls_token",
    "mask_token": "mask_token",
    "register_tokens": "register_tokens",
    "position_embeddings": "pos_embed",
    "patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "patch_embeddings.projection.bias": "patch_embed.proj.bias",
}
# Hugging Face layer submodules -> hub block submodules (`attn.q/k/v` are fused into `attn.qkv`,
# `mlp.gate/up` into `mlp.w12`).
_HF_LAYER_MODULES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.attention.query": "attn.q",
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
    "attention.q_proj": "attn.q",
    "attention.k_proj": "attn.k",
    "attention.v_proj": "attn.v",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.w3",
}
# Parts concatenated (along the output rows) into one hub Linear.
_FUSED = {"attn.qkv": ("attn.q", "attn.k", "attn.v"), "mlp.w12": ("mlp.gate", "mlp.up")}


def _under_prefix(tensors: Mapping[str, np.ndarray], marker: str, prefixes: tuple[str, ...]) -> dict | None:
    """The tensors under the first prefix whose `marker` key is present, prefix removed; None if none is."""
    for prefix in prefixes:
        if prefix + marker in tensors:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    return None


def _hf_key_to_hub(key: str) -> str:
    """One Hugging Face DINOv2 key in the hub layout (unknown keys come back unchanged)."""
    if key.startswith("embeddings.") and key.removeprefix("embeddings.") in _HF_EMBEDDINGS:
        return _HF_EMBEDDINGS[key.removeprefix("embeddings.")]
    if m := re.fullmatch(r"layernorm\.(weight|bias)", key):
        return f"norm.{m[1]}"
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", key)
    if m and m[2] in _HF_LAYER_MODULES:
        return f"blocks.{m[1]}.{_HF_LAYER_MODULES[m[2]]}.{'gamma' if m[3] == 'lambda1' else m[3]}"
    return key


def _fuse(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate separate projections into the hub's fused Linear layers (a partial set stays as is)."""
    for key in list(tensors):
        for fused, parts in _FUSED.items():
            if m := re.fullmatch(rf"(blocks\.\d+\.){re.escape(parts[0])}\.(weight|bias)", key):
                names = [f"{m[1]}{part}.{m[2]}" for part in parts]
                if all(name in tensors for name in names):
                    tensors[f"{m[1]}{fused}.{m[2]}"] = np.concatenate([tensors.pop(n) for n in names], axis=0)
    return tensors


def to_hub_layout(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """DINOv2 tensors (hub or Hugging Face, any accepted prefix) in the hub layout; None when
    neither layout's marker key is there."""
    hub = _under_prefix(tensors, _HUB_MARKER, _HUB_PREFIXES)
    if hub is not None:
        return hub
    hf = _under_prefix(tensors, _HF_MARKER, _HF_PREFIXES)
    if hf is None:
        return None
    return _fuse({_hf_key_to_hub(k): v for k, v in hf.items()})


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "gamma"}


def vit_keys(path: tuple, stacked_depth: int) -> list[str]:
    """Hub key(s) of a ViT variable at `path` (relative to the ViT), one per stacked block."""
    if len(path) == 1:  # cls_token, register_tokens, mask_token, pos_embed
        return [path[0]]
    leaf = _LEAF_NAMES[path[-1]]
    if path[0] == "blocks":
        if isinstance(path[1], int):  # unrolled: ('blocks', i, module..., leaf)
            blocks, module = [path[1]], path[2:-1]
        else:  # scanned: one variable stacking every block
            blocks, module = list(range(stacked_depth)), path[1:-1]
        return [f"blocks.{i}.{'.'.join(module)}.{leaf}" for i in blocks]
    return [f"{'patch_embed.proj' if path[0] == 'patch_embed' else path[0]}.{leaf}"]


def checkpoint_architecture(hub: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The `config.model.encoder` settings hub-layout tensors imply (those whose keys are present)."""
    found = {}
    if "patch_embed.proj.weight" in hub:
        found["embed_dim"], _, _, found["patch_size"] = hub["patch_embed.proj.weight"].shape
    blocks = {int(m[1]) for k in hub if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        found["depth"] = max(blocks) + 1
        found["ffn"] = "swiglu" if "blocks.0.mlp.w12.weight" in hub else "mlp"
    found["num_register_tokens"] = hub["register_tokens"].shape[1] if "register_tokens" in hub else 0
    if "pos_embed" in hub and "patch_size" in found:
        found["pretrain_size"] = math.isqrt(hub["pos_embed"].shape[1] - 1) * found["patch_size"]
    return found


def _architecture_problem(source: Path, hub: Mapping[str, np.ndarray], encoder: ViT) -> str | None:
    """One line naming the settings in which the checkpoint's ViT and `encoder` differ, or None."""
    model = {
        "embed_dim": encoder.embed_dims[0],
        "patch_size": encoder.patch_size,
        "depth": encoder.depth,
        "ffn": encoder.ffn,
        "num_register_tokens": encoder.num_register_tokens,
        "pretrain_size": encoder.pretrain_grid * encoder.patch_size,
    }
    differences = [
        f"{name} {value!r} (the model's {model[name]!r})"
        for name, value in checkpoint_architecture(hub).items()
        if value != model[name]
    ]
    if not differences:
        return None
    return (
        f"checkpoint {source} holds a DINOv2 ViT with {', '.join(differences)}: set config.model.encoder "
        "accordingly or use a checkpoint of this model's size"
    )


def describe_vit(encoder: ViT) -> str:
    return (
        f"the ViT encoder (embed_dim {encoder.embed_dims[0]}, depth {encoder.depth}, "
        f"{encoder.num_register_tokens} register tokens, position grid {encoder.pretrain_grid})"
    )


def load_dinov2_pretrained(encoder: ViT, path: str | Path, *, strict: bool = True) -> LoadSummary:
    """Load DINOv2 weights into `encoder` in place.

    `path`: a torch.hub DINOv2 state dict (`.pth`, optionally under `state_dict` and/or with an
    `encoder.`, `backbone.` or `network.encoder.` prefix), a Hugging Face `Dinov2Model` /
    `Dinov2WithRegistersModel` directory (config.json + model.safetensors) or weights file.
    Files are read safely (`torch.load(weights_only=True)`, safetensors). A file in neither
    layout is refused naming both, one of another size (depth, width, registers, pretrain size)
    naming the settings that differ; strict=False logs the mismatches and loads what fits.
    """
    source, tensors = read_checkpoint(path)
    hub = to_hub_layout(tensors)
    if hub is None:
        raise WeightsError(
            f"checkpoint {source} is not a DINOv2 checkpoint: expected {HUB_LAYOUT} or {HF_LAYOUT}; "
            f"it holds {len(tensors)} tensors ({listing(sorted(tensors), 5)})"
        )
    if strict and (problem := _architecture_problem(source, hub, encoder)):
        raise WeightsError(problem)
    summary = load_variables(
        encoder,
        hub,
        vit_keys,
        source=source,
        description=describe_vit(encoder),
        ignored=layouts.IGNORED_FOR_ENCODER,
        strict=strict,
        layout=HUB_LAYOUT,
        checkpoint_kind="DINOv2",
    )
    logging.info("pretrained encoder: %s", summary)
    return summary
