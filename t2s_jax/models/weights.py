"""Import of published PyTorch weights: MiT ImageNet `.pth` (SegFormer/mmseg layout) and
Hugging Face SegFormer checkpoints (`config.json` + `model.safetensors`); and of the Orbax
directories `python -m t2s_jax.models.convert` writes from them (`state/` + `model_config.json`).

Every source is first brought into one canonical key layout, PyTorch tensor conventions:
  encoder   the SegFormer/mmseg MiT layout (`patch_embed1.proj.weight`, `block1.0.attn.q.weight`,
            `block1.0.attn.kv.weight`, `block1.0.attn.sr.weight`, `block1.0.mlp.dwconv.dwconv.weight`,
            `norm1.weight`, ...); Hugging Face names are translated (their key and value
            projections are fused into `attn.kv`, keys first as in mmseg).
  head      Hugging Face's SegFormer decode head (`decode_head.linear_c.0.proj.weight`,
            `decode_head.linear_fuse.weight`, `decode_head.batch_norm.*`, `decode_head.classifier.*`).
Each model variable then names the canonical key(s) it takes (a scanned stage's stacked
variable takes one key per block), converted from PyTorch layout (Linear (out, in) -> (in,
out); Conv (out, in, kh, kw) -> (kh, kw, in, out)). Missing keys, unexpected keys and shape
mismatches are collected and reported together, naming the file.

Files are read with safetensors or `torch.load(..., weights_only=True)`: never a plain
pickle load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t2s_jax import checkpointing
from t2s_jax import config as config_lib
from t2s_jax.models.mit import MiT, build_encoder
from t2s_jax.models.segmentor import Segmentor, build_segmentor

_MAX_LISTED = 25  # keys listed per category in an error message

# Keys that are legitimately present but never loaded into an encoder: the ImageNet classifier
# of the MiT `.pth` files, Hugging Face's image-classification head, mmseg decode heads, and
# PyTorch BatchNorm's step counter.
_IGNORED_FOR_ENCODER = re.compile(r"^(head|classifier|decode_head|auxiliary_head)\.|num_batches_tracked$")
_IGNORED_ALWAYS = re.compile(r"num_batches_tracked$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


@dataclasses.dataclass(frozen=True)
class LoadSummary:
    """What a weight import did."""

    path: str
    loaded_tensors: int  # checkpoint tensors (canonical layout) copied into the model
    loaded_values: int  # scalars copied (parameters and BatchNorm statistics)
    parameter_count: int  # scalars in the target's nnx.Param variables
    ignored: tuple[str, ...] = ()  # known keys deliberately skipped (classifier heads, step counters)
    missing: tuple[str, ...] = ()  # only non-empty with strict=False
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()

    def __str__(self) -> str:
        parts = [
            f"{self.path}: loaded {self.loaded_tensors} tensors ({self.loaded_values:,} values)",
            f"model has {self.parameter_count:,} parameters",
        ]
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} tensors ({_listing(self.ignored, 5)})")
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("mismatched", self.mismatched)):
            if keys:
                parts.append(f"{len(keys)} {name} ({_listing(keys, 5)})")
        return "; ".join(parts)


# ----------------------------------------------------------------------------- reading files


def load_mit_pth(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a PyTorch checkpoint, read with `torch.load(weights_only=True)`.

    Unwraps a `state_dict` (or `model`) entry. When keys carry mmseg's `backbone.` prefix (a full
    segmentor checkpoint) only the backbone tensors are returned, without the prefix.
    """
    try:
        import torch
    except ImportError as e:  # torch is only a test / conversion dependency
        raise CheckpointError(f"reading the PyTorch checkpoint {path} needs torch (pip install torch)") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: all unreadable for us
        raise CheckpointError(f"cannot read PyTorch checkpoint {path} with torch.load(weights_only=True): {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: _to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (keys: {_listing(list(obj), 10)})")
    if any(k.startswith("backbone.") for k in tensors):
        tensors = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    return tensors


def _to_numpy(tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # truncated or corrupt header / data
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_ACCEPTED = (
    "accepted: a PyTorch file (" + ", ".join(_TORCH_SUFFIXES) + "), a .safetensors file, a Hugging Face "
    "directory (config.json + model.safetensors or pytorch_model.bin) or a directory written by "
    "`python -m t2s_jax.models.convert` (state/ + model_config.json)"
)


def _hf_weights_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"{directory} is not a checkpoint directory (no model.safetensors, pytorch_model.bin, or "
        f"state/ + model_config.json); {_ACCEPTED}"
    )


def is_converted_dir(path: str | Path) -> bool:
    """Whether `path` is a directory written by `python -m t2s_jax.models.convert`."""
    path = Path(path)
    return (path / "state").is_dir() and (path / "model_config.json").is_file()


def read_converted(directory: str | Path) -> tuple[dict, ml_collections.ConfigDict]:
    """({'params', 'batch_stats'} as nested dicts of arrays, the `config.model` they belong to) of a
    converted directory. Keys are as Orbax stores them (list indices as strings)."""
    directory = Path(directory)
    try:
        tree = checkpointing.restore_tree(str(directory / "state"))
        model_config = ml_collections.ConfigDict(json.loads((directory / "model_config.json").read_text()))
    except Exception as e:  # damaged Orbax metadata, truncated arrays, bad JSON
        raise CheckpointError(f"cannot read the converted checkpoint {directory}: {e}") from e
    return tree, model_config


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    """Nested dict -> {path: array}, list indices (stored as strings) back to ints as in nnx paths."""
    flat = {}
    for key, value in tree.items():
        path = prefix + (int(key) if str(key).isdigit() else key,)
        flat.update(_flatten(value, path) if isinstance(value, Mapping) else {path: np.asarray(value)})
    return flat


def _to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    """Flax layout -> PyTorch layout (the inverse of `_from_torch`)."""
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def _converted_encoder_tensors(directory: Path) -> dict[str, np.ndarray]:
    """The MiT tensors of a converted directory (a segmentor's encoder, or an encoder alone) in
    the canonical layout, so they load into any MiT layout (scanned or not) like a `.pth`."""
    tree, _ = read_converted(directory)
    params = tree.get("params", {})
    encoder = params.get("encoder", params)
    tensors = {}
    for path, array in _flatten(encoder).items():
        stacked = _is_stacked(path)
        keys = _mit_keys(path, array.shape[0] if stacked else 0)
        for key, value in zip(keys, array if stacked else [array]):
            tensors[key] = _to_torch(value, path[-1])
    return tensors


def read_checkpoint(path: str | Path) -> tuple[Path, dict[str, np.ndarray]]:
    """(the weights file or directory, its tensors) for a `.safetensors` file, a PyTorch file, a
    Hugging Face directory or a converted directory (its encoder, in the canonical layout)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; {_ACCEPTED}")
    if path.is_dir():
        if is_converted_dir(path):
            return path, _converted_encoder_tensors(path)
        path = _hf_weights_file(path)
    if path.suffix == ".safetensors":
        return path, _read_safetensors(path)
    if path.suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(f"unknown checkpoint kind: {path}; {_ACCEPTED}")
    return path, load_mit_pth(path)


# ----------------------------------------------------------------------------- canonical layout

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


# ----------------------------------------------------------------------------- model variable <-> key

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _mit_keys(path: tuple, stacked_depth: int) -> list[str]:
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


def _segformer_head_keys(path: tuple) -> list[str]:
    """Canonical key of a `SegFormerHead` variable (path relative to the head)."""
    leaf = _LEAF_NAMES[path[-1]]
    if path[0] == "linear_c":
        return [f"decode_head.linear_c.{path[1]}.proj.{leaf}"]
    if path[0] == "linear_fuse":
        return [f"decode_head.{'linear_fuse' if path[1] == 'conv' else 'batch_norm'}.{leaf}"]
    return [f"decode_head.classifier.{leaf}"]


def _segmentor_keys(path: tuple, stacked_depth: int) -> list[str]:
    """Canonical key(s) of a variable of a Segmentor with the SegFormer head."""
    if path[0] == "encoder":
        return _mit_keys(path[1:], stacked_depth)
    return _segformer_head_keys(path[1:])


def _is_stacked(path: tuple) -> bool:
    """A scanned stage's block variable: 'blocks' followed by a module name, not a block index."""
    return "blocks" in path and not isinstance(path[path.index("blocks") + 1], int)


def _from_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    """PyTorch layout -> Flax layout."""
    if leaf == "kernel" and array.ndim == 2:  # Linear (out, in) -> (in, out)
        return array.T
    if leaf == "kernel" and array.ndim == 4:  # Conv (out, in/groups, kh, kw) -> (kh, kw, in/groups, out)
        return array.transpose(2, 3, 1, 0)
    return array


def _listing(keys, limit: int = _MAX_LISTED) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_variables(
    module: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    keys_of: Callable[[tuple, int], list[str]],
    *,
    source: Path,
    description: str,
    ignored: re.Pattern,
    strict: bool,
) -> LoadSummary:
    """Copy canonical `tensors` into every variable of `module` (`keys_of` names the keys)."""
    state = nnx.state(module)  # Params and BatchStats: the only variables our modules hold
    updates, missing, mismatched, used = [], [], [], set()
    loaded_tensors = loaded_values = 0
    for path, variable in nnx.to_flat_state(state):
        current = variable.get_value()
        stacked = _is_stacked(path)
        keys = keys_of(path, current.shape[0] if stacked else 0)
        absent = [k for k in keys if k not in tensors]
        if absent:
            missing.extend(absent)
            continue
        expected_shape = current.shape[1:] if stacked else current.shape
        arrays = [_from_torch(tensors[k], path[-1]) for k in keys]
        wrong = [f"{k} {tensors[k].shape}" for k, a in zip(keys, arrays) if a.shape != expected_shape]
        used.update(keys)
        if wrong:
            mismatched.extend(f"{w} does not fit {'/'.join(map(str, path))} {expected_shape}" for w in wrong)
            continue
        value = np.stack(arrays) if stacked else arrays[0]
        loaded_tensors += len(keys)
        loaded_values += value.size
        updates.append((path, variable.replace(_place_like(value, current))))
    unexpected = sorted(k for k in tensors if k not in used and not ignored.search(k))
    skipped = tuple(sorted(k for k in tensors if k not in used and ignored.search(k)))
    if missing or unexpected or mismatched:
        report = _mismatch_report(source, description, missing, unexpected, mismatched, nothing_loaded=not updates)
        if strict:
            raise CheckpointError(report)
        logging.warning("%s\nstrict=False: loading the tensors that fit.", report)
    nnx.update(module, nnx.from_flat_state(updates))
    return LoadSummary(
        path=str(source),
        loaded_tensors=loaded_tensors,
        loaded_values=loaded_values,
        parameter_count=count_parameters(module),
        ignored=skipped,
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
    )


def _place_like(value: np.ndarray, current) -> jax.Array:
    """`value` with the variable's dtype, and its sharding when the variable is a concrete array."""
    value = value.astype(current.dtype)
    if isinstance(current, jax.Array):
        return jax.device_put(value, current.sharding)
    return jnp.asarray(value)


def _mismatch_report(source: Path, description: str, missing, unexpected, mismatched, nothing_loaded: bool) -> str:
    lines = [f"checkpoint {source} does not fit {description} (keys in the canonical mmseg/SegFormer layout):"]
    if nothing_loaded:
        lines.append("  no key matched: is this a MiT / SegFormer checkpoint?")
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            lines.append(f"  {len(keys)} {name}: {_listing(keys)}")
    return "\n".join(lines)


def count_parameters(module: nnx.Module) -> int:
    """Number of scalars in the module's `nnx.Param` variables (works on abstract modules too)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def _describe_encoder(encoder: MiT) -> str:
    return f"the MiT encoder (embed_dims {encoder.embed_dims}, depths {encoder.depths})"


# ----------------------------------------------------------------------------- public entry points


def load_pretrained_encoder(model: MiT | Segmentor, path: str | Path, *, strict: bool = True) -> LoadSummary:
    """Load MiT weights into `model` (a MiT or a Segmentor's encoder) in place.

    `path`: a `.pth`/`.pt`/`.bin` PyTorch file (SegFormer/mmseg layout, optionally under
    `state_dict` and/or with a `backbone.` prefix, or a Hugging Face state dict), a
    `.safetensors` file, a Hugging Face directory (`SegformerModel` or any SegFormer with a
    head, whose head is skipped) or a directory of `python -m t2s_jax.models.convert` (its
    encoder; scanned or unrolled blocks either way). strict=False logs what does not fit and
    loads the rest.
    """
    encoder = model.encoder if isinstance(model, Segmentor) else model
    if not isinstance(encoder, MiT):
        raise TypeError(f"expected a MiT or a Segmentor, got {type(model).__name__}")
    source, tensors = read_checkpoint(path)
    summary = _load_variables(
        encoder,
        to_canonical(tensors),
        _mit_keys,
        source=source,
        description=_describe_encoder(encoder),
        ignored=_IGNORED_FOR_ENCODER,
        strict=strict,
    )
    logging.info("pretrained encoder: %s", summary)
    return summary


def maybe_load_pretrained(model: Segmentor, model_config: ml_collections.ConfigDict) -> LoadSummary | None:
    """Load `config.model.pretrained` (if set) into the segmentor's encoder, strictly."""
    if not model_config.pretrained:
        return None
    return load_pretrained_encoder(model, model_config.pretrained)


def model_config_from_hf(
    hf_config: Mapping, *, with_head: bool, dtype: str = "float32", scan_blocks: bool = True
) -> ml_collections.ConfigDict:
    """`config.model` describing the Hugging Face SegFormer of `hf_config` (config.json contents).

    Every LayerNorm eps is 1e-5: the Hugging Face port uses PyTorch's default everywhere (its
    `layer_norm_eps` field is not used by the modelling code). BatchNorm eps 1e-5 likewise.
    """
    num_stages = len(hf_config["depths"])
    expected = {"patch_sizes": [7] + [3] * (num_stages - 1), "strides": [4] + [2] * (num_stages - 1)}
    for field, value in expected.items():
        if list(hf_config.get(field, value)) != value:
            raise CheckpointError(f"unsupported SegFormer {field} {hf_config[field]}; MiT uses {value}")
    if hf_config.get("hidden_act", "gelu") != "gelu" or hf_config.get("num_channels", 3) != 3:
        raise CheckpointError("unsupported SegFormer config: MiT uses hidden_act='gelu' and 3 input channels")
    mlp_ratios = set(hf_config.get("mlp_ratios", [4]))
    if len(mlp_ratios) != 1:
        raise CheckpointError(f"unsupported per-stage mlp_ratios {hf_config['mlp_ratios']}")
    model = config_lib.default_config().model
    model.encoder = config_lib.mit_config(
        "b0",
        embed_dims=tuple(hf_config["hidden_sizes"]),
        depths=tuple(hf_config["depths"]),
        num_heads=tuple(hf_config["num_attention_heads"]),
        sr_ratios=tuple(hf_config["sr_ratios"]),
        mlp_ratio=int(mlp_ratios.pop()),
        drop_path_rate=float(hf_config.get("drop_path_rate", 0.1)),
        embed_norm_eps=1e-5,
        block_norm_eps=1e-5,
    )
    model.head = "segformer"
    if with_head:
        model.head_channels = int(hf_config["decoder_hidden_size"])
        model.dropout_rate = float(hf_config.get("classifier_dropout_prob", 0.1))
        id2label = hf_config.get("id2label")
        model.num_classes = len(id2label) if id2label else int(hf_config["num_labels"])
    model.bn_eps = 1e-5
    model.projector.enabled = False
    model.dtype = dtype
    model.scan_blocks = scan_blocks
    return model


def from_hf_pretrained(path: str | Path, *, dtype: str = "float32", scan_blocks: bool = True) -> Segmentor | MiT:
    """The model a Hugging Face SegFormer directory describes, with its weights.

    A checkpoint with a decode head (`SegformerForSemanticSegmentation`) gives a `Segmentor`
    with the SegFormer head: `model(images)` returns stride-4 logits. An encoder-only
    checkpoint (`SegformerModel`, e.g. the MiT ImageNet weights) gives the `MiT` encoder:
    `model(images)` returns the four stage features. (To put those weights under a DAFormer
    head, set `config.model.pretrained` or call `load_pretrained_encoder`.) Loading is strict.
    """
    return load_hf_pretrained(path, dtype=dtype, scan_blocks=scan_blocks)[0]


def load_hf_pretrained(
    path: str | Path, *, dtype: str = "float32", scan_blocks: bool = True
) -> tuple[Segmentor | MiT, ml_collections.ConfigDict, LoadSummary]:
    """`from_hf_pretrained`, also returning the `config.model` it built and the load summary."""
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
    hf_config = json.loads(config_file.read_text())
    source, tensors = read_checkpoint(directory)
    canonical = to_canonical(tensors)
    with_head = "SegformerForSemanticSegmentation" in hf_config.get("architectures", []) or any(
        k.startswith("decode_head.") for k in canonical
    )
    model_config = model_config_from_hf(hf_config, with_head=with_head, dtype=dtype, scan_blocks=scan_blocks)
    # Shapes only: the strict load below overwrites every variable (no random init cost).
    if with_head:
        model = nnx.eval_shape(lambda: build_segmentor(model_config, rngs=nnx.Rngs(0)))
        keys_of, ignored = _segmentor_keys, _IGNORED_ALWAYS
        description = f"a SegFormer segmentor (embed_dims {model.encoder.embed_dims}, depths {model.encoder.depths})"
    else:
        model = nnx.eval_shape(lambda: build_encoder(model_config.encoder, model_config, rngs=nnx.Rngs(0)))
        keys_of, ignored, description = _mit_keys, _IGNORED_FOR_ENCODER, _describe_encoder(model)
    summary = _load_variables(
        model, canonical, keys_of, source=source, description=description, ignored=ignored, strict=True
    )
    logging.info("from_hf_pretrained: %s", summary)
    return model, model_config, summary


def load_segmentor(path: str | Path) -> Segmentor:
    """The segmentor of a converted directory (as `model_config.json` describes it) or of a
    Hugging Face SegFormer directory with a decode head, with its weights: what
    `--mode=eval --pretrained=PATH` evaluates."""
    directory = Path(path)
    if is_converted_dir(directory):
        return _load_converted_segmentor(directory)
    if (directory / "config.json").is_file():
        model = from_hf_pretrained(directory)
        if not isinstance(model, Segmentor):
            raise CheckpointError(
                f"{directory} holds a SegFormer encoder without a decode head: nothing to evaluate"
            )
        return model
    raise CheckpointError(f"{directory} is not a segmentor checkpoint directory; expected a Hugging Face "
                          "SegFormer directory (config.json + weights) or a directory written by "
                          "`python -m t2s_jax.models.convert` (state/ + model_config.json)")


def _load_converted_segmentor(directory: Path) -> Segmentor:
    tree, model_config = read_converted(directory)
    if "encoder" not in tree.get("params", {}):
        raise CheckpointError(f"{directory} holds a MiT encoder without a head: nothing to evaluate "
                              "(convert it with --config to put it under a head)")
    model = nnx.eval_shape(lambda: build_segmentor(model_config, rngs=nnx.Rngs(0)))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    stored = {name: _flatten(tree.get(name, {})) for name in ("params", "batch_stats")}
    for name, state in (("params", params), ("batch_stats", batch_stats)):
        expected = {path: variable.get_value().shape for path, variable in nnx.to_flat_state(state)}
        got = {path: array.shape for path, array in stored[name].items()}
        if got != expected:
            wrong = sorted("/".join(map(str, p)) for p in set(got) ^ set(expected))
            wrong += sorted(f"{'/'.join(map(str, p))} {got[p]} vs {expected[p]}"
                            for p in set(got) & set(expected) if got[p] != expected[p])
            raise CheckpointError(f"{directory}: the stored {name} do not fit the model its model_config.json "
                                  f"describes: {_listing(wrong)}")
        nnx.replace_by_pure_dict(
            state, tree.get(name, {}), lambda variable, x: variable.replace(jnp.asarray(x, variable.get_value().dtype))
        )
    model = nnx.merge(graphdef, params, batch_stats)
    logging.info("converted segmentor %s: %s parameters", directory, f"{count_parameters(model):,}")
    return model
