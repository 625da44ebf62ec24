"""Reading weight files: PyTorch files with `torch.load(..., weights_only=True)` (never a plain
pickle load), `.safetensors` files, Hugging Face directories and converted directories."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from t2s_jax.models.weights import converted
from t2s_jax.models.weights.errors import WeightsError, first_line, listing

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
ACCEPTED = (
    "accepted: a PyTorch file (" + ", ".join(TORCH_SUFFIXES) + ") in the mmseg MiT layout, the mmcv / "
    "torchvision ResNet layout or the torch.hub DINOv2 layout, a .safetensors file, a Hugging Face directory (config.json + model.safetensors "
    "or pytorch_model.bin) or a directory written by `python -m t2s_jax.models.convert` (state/ + model_config.json)"
)


def load_mit_pth(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a PyTorch checkpoint, read with `torch.load(weights_only=True)`.

    Unwraps a `state_dict` (or `model`) entry. When keys carry mmseg's `backbone.` prefix (a full
    segmentor checkpoint) only the backbone tensors are returned, without the prefix.
    """
    try:
        import torch
    except ImportError as e:  # torch is only a test / conversion dependency
        raise WeightsError(f"reading the PyTorch checkpoint {path} needs torch (pip install torch)") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: all unreadable for us
        raise WeightsError(
            f"cannot read PyTorch checkpoint {path} with torch.load(weights_only=True): {first_line(e)}; "
            "expected a state dict of tensors, e.g. the MiT ImageNet mit_b5.pth"
        ) from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: _to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path} holds no tensors (keys: {listing(list(obj), 10)})")
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
        raise WeightsError(f"cannot read safetensors file {path}: {first_line(e)}") from e


def _hf_weights_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise WeightsError(
        f"{directory} is not a checkpoint directory (no model.safetensors, pytorch_model.bin, or "
        f"state/ + model_config.json); {ACCEPTED}"
    )


def read_checkpoint(path: str | Path) -> tuple[Path, dict[str, np.ndarray]]:
    """(the weights file or directory, its tensors) for a `.safetensors` file, a PyTorch file, a
    Hugging Face directory or a converted directory (its encoder, in the canonical layout)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint not found: {path}; {ACCEPTED}")
    if path.is_dir():
        if converted.is_converted_dir(path):
            return path, converted.encoder_tensors(path)
        path = _hf_weights_file(path)
    if path.suffix == ".safetensors":
        return path, _read_safetensors(path)
    if path.suffix not in TORCH_SUFFIXES:
        raise WeightsError(f"unknown checkpoint kind: {path}; {ACCEPTED}")
    return path, load_mit_pth(path)
