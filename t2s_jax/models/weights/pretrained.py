"""The entry points: any accepted path into a model's encoder, or into a whole segmentor; and
the check a command runs on such a path before it starts any work."""

from __future__ import annotations

import logging
from pathlib import Path

import ml_collections

from t2s_jax.models.mit import MiT
from t2s_jax.models.resnet import ResNet
from t2s_jax.models.segmentor import Segmentor
from t2s_jax.models.vit import ViT
from t2s_jax.models.weights import converted, hf, layouts
from t2s_jax.models.weights.dinov2 import load_dinov2_pretrained
from t2s_jax.models.weights.errors import WeightsError
from t2s_jax.models.weights.loading import LoadSummary, load_variables
from t2s_jax.models.weights.reading import read_checkpoint
from t2s_jax.models.weights.resnet import load_resnet_pretrained

_SEGMENTOR_ACCEPTED = (
    "expected a Hugging Face SegFormer directory with a decode head (config.json + weights) or a "
    "directory written by `python -m t2s_jax.models.convert` (state/ + model_config.json)"
)


def load_pretrained_encoder(
    model: MiT | ResNet | ViT | Segmentor, path: str | Path, *, strict: bool = True
) -> LoadSummary:
    """Load encoder weights into `model` (a MiT, a ResNet, a ViT or a Segmentor's encoder) in place.

    A ResNet takes a PyTorch file in the mmcv ResNetV1c or torchvision layout
    (`load_resnet_pretrained`); a ViT a torch.hub DINOv2 state dict or a Hugging Face DINOv2
    directory or file (`load_dinov2_pretrained`). For a MiT:

    `path`: a `.pth`/`.pt`/`.bin` PyTorch file (SegFormer/mmseg layout, optionally under
    `state_dict` and/or with a `backbone.` prefix, or a Hugging Face state dict), a
    `.safetensors` file, a Hugging Face directory (`SegformerModel` or any SegFormer with a
    head, whose head is skipped) or a directory of `python -m t2s_jax.models.convert` (its
    encoder; scanned or unrolled blocks either way). strict=False logs what does not fit and
    loads the rest.
    """
    encoder = model.encoder if isinstance(model, Segmentor) else model
    if isinstance(encoder, ResNet):
        return load_resnet_pretrained(encoder, path, strict=strict)
    if isinstance(encoder, ViT):
        return load_dinov2_pretrained(encoder, path, strict=strict)
    if not isinstance(encoder, MiT):
        raise TypeError(f"expected a MiT, a ResNet, a ViT or a Segmentor, got {type(model).__name__}")
    source, tensors = read_checkpoint(path)
    summary = load_variables(
        encoder,
        layouts.to_canonical(tensors),
        layouts.mit_keys,
        source=source,
        description=hf.describe_encoder(encoder),
        ignored=layouts.IGNORED_FOR_ENCODER,
        strict=strict,
    )
    logging.info("pretrained encoder: %s", summary)
    return summary


def maybe_load_pretrained(model: Segmentor, model_config: ml_collections.ConfigDict) -> LoadSummary | None:
    """Load `config.model.pretrained` (if set) into the segmentor's encoder, strictly."""
    if not model_config.pretrained:
        return None
    return load_pretrained_encoder(model, model_config.pretrained)


def load_segmentor(path: str | Path) -> Segmentor:
    """The segmentor of a converted directory (as `model_config.json` describes it) or of a
    Hugging Face SegFormer directory with a decode head, with its weights: what
    `--mode=eval --pretrained=PATH` evaluates."""
    directory = Path(path)
    if converted.is_converted_dir(directory):
        return converted.load_converted_segmentor(directory)
    if (directory / "config.json").is_file():
        model = hf.from_hf_pretrained(directory)
        if not isinstance(model, Segmentor):
            raise WeightsError(f"{directory} holds a SegFormer encoder without a decode head: nothing to evaluate")
        return model
    raise WeightsError(f"{directory} is not a segmentor checkpoint directory; {_SEGMENTOR_ACCEPTED}")


def problem(path: str | Path, *, segmentor: bool = False) -> str | None:
    """Why `path` cannot be read as pretrained encoder weights (with `segmentor`: as a whole
    segmentor), in one line; or None. The weights are read, so a damaged file is found here,
    before any work starts; whether they fit the model is checked when they are loaded."""
    path = Path(path)
    try:
        if segmentor and not path.exists():
            return f"{path} does not exist; {_SEGMENTOR_ACCEPTED}"
        if segmentor and not (converted.is_converted_dir(path) or (path / "config.json").is_file()):
            return f"{path} is not a segmentor checkpoint directory; {_SEGMENTOR_ACCEPTED}"
        if segmentor and not converted.is_converted_dir(path):
            hf.read_hf_config(path)
        read_checkpoint(path)
    except WeightsError as error:
        return str(error)
    return None
