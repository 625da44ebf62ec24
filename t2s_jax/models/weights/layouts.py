"""Key layouts: every source is brought into one canonical layout, PyTorch tensor conventions.

  encoder   the SegFormer/mmseg MiT layout (`patch_embed1.proj.weight`, `block1.0.attn.q.weight`,
            `block1.0.attn.kv.weight`, `block1.0.attn.sr.weight`, `block1.0.mlp.dwconv.dwconv.weight`,
            `norm1.weight`, ...); Hugging Face names are translated (their key and value
            projections are fused into `attn.kv`, keys first as in mmseg).
  resnet    the mmcv ResNetV1c / torchvision layout (`stem.0.weight` or `conv1.weight`,
            `layer1.0.conv1.weight`, `layer1.0.bn1.running_mean`, `layer1.0.downsample.0.weight`),
            unchanged: both name the stages alike and differ only in the stem.
  head      Hugging Face's SegFormer decode head (`decode_head.linear_c.0.proj.weight`,
            `decode_head.linear_fuse.weight`, `decode_head.batch_norm.*`, `decode_head.classifier.*`).

Each model variable names the canonical key(s) it takes (`mit_keys`, `segmentor_keys`: a
scanned stage's stacked variable takes one key per block), converted from PyTorch layout
(Linear (out, in) -> (in, out); Conv (out, in, kh, kw) -> (kh, kw, in, out)). Another host's
layout is one more translation into canonical keys and one more key function.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

# Keys that are legitimately present but never loaded into an encoder: the ImageNet classifier
# of the MiT `.pth` files, Hugging Face's image-classification head, mmseg decode heads, and
# PyTorch BatchNorm's step counter.
IGNORED_FOR_ENCODER = re.compile(r"^(head|classifier|decode_head|auxiliary_head)\.|num_batches_tracked$")
# The same for a ResNet encoder: torchvision's ImageNet classifier `fc`.
IGNORED_FOR_RESNET = re.compile(r"^(fc|decode_head|auxiliary_head)\.|num_batches_tracked$")
IGNORED_ALWAYS = re.compile(r"num_batches_tracked$")

# ----------------------------------------------------------------------------- Hugging Face -> canonical

# transformers >= 5 module names (what `model.state_dict()` holds) -> the names its
# `save_pretrained` writes and the published checkpoints use.
_HF_MODULE_RENAMES = (
    (r"(^|\.)stages\.(\d+)\.patch_embeddings\.", r"\1encoder.patch_embeddings.\2."),
    (r"(^|\.)stages\.(\d+)\.blocks\.", r"\1encoder.block.\2."),
    (r"(^|\.)stages\.(\d+)\.layer_norm\.", r"\1encoder.layer_norm.\2."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
)
# Hugging Face block submodules -> mmseg names (`attn.k` / `attn.v` are fused into `attn.kv`).
_HF_BLOCK_MODULES = {
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.self.sr": "attn.sr",
    "attention.self.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj",
    "layer_norm_1": "norm1",
    "layer_norm_2": "norm2",
    "mlp.dense1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.dense2": "mlp.fc2",
}
_HF_LAYOUT = re.compile(r"^(segformer\.)?(encoder\.(block|patch_embeddings|layer_norm)\.|stages\.\d+\.)")


def _hf_key_to_mmseg(key: str) -> str:
    """One Hugging Face SegFormer key in the canonical layout (unknown keys come back unchanged)."""
    for pattern, replacement in _HF_MODULE_RENAMES:
        key = re.sub(pattern, replacement, key)
    if m := re.fullmatch(r"(?:segformer\.)?encoder\.patch_embeddings\.(\d+)\.(proj|layer_norm)\.(\w+)", key):
        return f"patch_embed{int(m[1]) + 1}.{'proj' if m[2] == 'proj' else 'norm'}.{m[3]}"
    if m := re.fullmatch(r"(?:segformer\.)?encoder\.layer_norm\.(\d+)\.(\w+)", key):
        return f"norm{int(m[1]) + 1}.{m[2]}"
    if m := re.fullmatch(r"(?:segformer\.)?encoder\.block\.(\d+)\.(\d+)\.(.+)\.(\w+)", key):
        if m[3] in _HF_BLOCK_MODULES:
            return f"block{int(m[1]) + 1}.{m[2]}.{_HF_BLOCK_MODULES[m[3]]}.{m[4]}"
    return key


def to_canonical(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bring Hugging Face or mmseg tensors into the canonical layout (module docstring)."""
    if not any(_HF_LAYOUT.match(k) for k in tensors):
        return {k.removeprefix("backbone."): v for k, v in tensors.items()}
    canonical = {_hf_key_to_mmseg(k): v for k, v in tensors.items()}
    for key in [k for k in canonical if re.fullmatch(r"block\d+\.\d+\.attn\.k\.\w+", k)]:
        value_key = key.replace(".attn.k.", ".attn.v.")
        if value_key in canonical:  # a lone half stays under its own name and is reported
            kv_key = key.replace(".attn.k.", ".attn.kv.")
            canonical[kv_key] = np.concatenate([canonical.pop(key), canonical.pop(value_key)], axis=0)
    return canonical


# ----------------------------------------------------------------------------- model variable -> keys

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def mit_keys(path: tuple, stacked_depth: int) -> list[str]:
    """Canonical key(s) of a MiT variable at `path` (relative to the MiT), one per stacked block."""
    stage, part, leaf = path[1] + 1, path[2], _LEAF_NAMES[path[-1]]
    if part == "blocks":
        if isinstance(path[3], int):  # unrolled: ('stages', s, 'blocks', j, ...)
            blocks, module = [path[3]], path[4:-1]
        else:  # scanned: one variable stacking all blocks of the stage
            blocks, module = list(range(stacked_depth)), path[3:-1]
        module_name = ".".join(module)
        module_name = "mlp.dwconv.dwconv" if module_name == "mlp.dwconv" else module_name
        return [f"block{stage}.{j}.{module_name}.{leaf}" for j in blocks]
    module_name = {"patch_embed": f"patch_embed{stage}.proj", "patch_norm": f"patch_embed{stage}.norm"}.get(
        part, f"norm{stage}"
    )
    return [f"{module_name}.{leaf}"]


# ResNet stem modules -> mmcv ResNetV1c keys (deep stem: conv, BN, ReLU three times) or
# torchvision keys (7x7 stem).
_RESNET_STEM_KEYS = {
    "stem_conv1": "stem.0", "stem_bn1": "stem.1", "stem_conv2": "stem.3", "stem_bn2": "stem.4",
    "stem_conv3": "stem.6", "stem_bn3": "stem.7", "conv1": "conv1", "bn1": "bn1",
}
_RESNET_SHORTCUT_KEYS = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def resnet_keys(path: tuple, stacked_depth: int) -> list[str]:
    """Canonical key of a ResNet variable at `path` (relative to the ResNet; blocks are never stacked)."""
    del stacked_depth
    leaf = _LEAF_NAMES[path[-1]]
    if path[0] == "stages":  # ('stages', s, i, module, leaf)
        stage, block, module = path[1] + 1, path[2], path[3]
        return [f"layer{stage}.{block}.{_RESNET_SHORTCUT_KEYS.get(module, module)}.{leaf}"]
    return [f"{_RESNET_STEM_KEYS[path[0]]}.{leaf}"]


def _segformer_head_keys(path: tuple) -> list[str]:
    """Canonical key of a `SegFormerHead` variable (path relative to the head)."""
    leaf = _LEAF_NAMES[path[-1]]
    if path[0] == "linear_c":
        return [f"decode_head.linear_c.{path[1]}.proj.{leaf}"]
    if path[0] == "linear_fuse":
        return [f"decode_head.{'linear_fuse' if path[1] == 'conv' else 'batch_norm'}.{leaf}"]
    return [f"decode_head.classifier.{leaf}"]


def segmentor_keys(path: tuple, stacked_depth: int) -> list[str]:
    """Canonical key(s) of a variable of a Segmentor with the SegFormer head."""
    if path[0] == "encoder":
        return mit_keys(path[1:], stacked_depth)
    return _segformer_head_keys(path[1:])


def is_stacked(path: tuple) -> bool:
    """A scanned stage's block variable: 'blocks' followed by a module name, not a block index."""
    return "blocks" in path and not isinstance(path[path.index("blocks") + 1], int)


# ----------------------------------------------------------------------------- PyTorch <-> Flax arrays


def from_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    """PyTorch layout -> Flax layout."""
    if leaf == "kernel" and array.ndim == 2:  # Linear (out, in) -> (in, out)
        return array.T
    if leaf == "kernel" and array.ndim == 4:  # Conv (out, in/groups, kh, kw) -> (kh, kw, in/groups, out)
        return array.transpose(2, 3, 1, 0)
    return array


def to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    """Flax layout -> PyTorch layout (the inverse of `from_torch`)."""
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array
