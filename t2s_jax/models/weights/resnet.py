"""ImageNet ResNet weights into a `ResNet` encoder: mmcv ResNetV1c (`open-mmlab://resnet101_v1c`,
deep stem) or torchvision (`resnet101`, 7x7 stem) state dicts; also the backbone of an mmseg
segmentor checkpoint (`state_dict` with `backbone.` prefixes)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from t2s_jax.models.resnet import ResNet
from t2s_jax.models.weights import layouts
from t2s_jax.models.weights.errors import WeightsError
from t2s_jax.models.weights.loading import LoadSummary, load_variables
from t2s_jax.models.weights.reading import read_checkpoint

# The key that marks each stem's layout.
_STEM_MARKERS = {"deep": "stem.0.weight", "7x7": "conv1.weight"}


def checkpoint_stem(tensors: Mapping[str, np.ndarray]) -> str | None:
    """The stem a ResNet state dict holds ('deep' or '7x7'), None if neither layout's key is there."""
    found = [stem for stem, key in _STEM_MARKERS.items() if key in tensors]
    return found[0] if len(found) == 1 else None


def describe_resnet(encoder: ResNet) -> str:
    return f"the ResNet encoder (stem {encoder.stem}, depths {encoder.depths}, embed_dims {encoder.embed_dims})"


def load_resnet_pretrained(encoder: ResNet, path: str | Path, *, strict: bool = True) -> LoadSummary:
    """Load a ResNet PyTorch checkpoint into `encoder` in place.

    Conv weights OIHW -> HWIO, BatchNorm weight / bias / running_mean / running_var -> scale /
    bias / mean / var; `fc.*`, heads and `num_batches_tracked` are skipped. A checkpoint whose
    stem is not the model's is refused; strict=False logs the other mismatches and loads the rest.
    """
    source, tensors = read_checkpoint(path)
    stem = checkpoint_stem(tensors)
    if stem is not None and stem != encoder.stem:
        raise WeightsError(
            f"checkpoint {source} holds a ResNet with the {stem!r} stem ({_STEM_MARKERS[stem]}), but the model has "
            f"the {encoder.stem!r} stem: set config.model.encoder.stem = {stem!r} or use a "
            f"{encoder.stem!r}-stem checkpoint"
        )
    summary = load_variables(
        encoder,
        tensors,
        layouts.resnet_keys,
        source=source,
        description=describe_resnet(encoder),
        ignored=layouts.IGNORED_FOR_RESNET,
        strict=strict,
        layout="the mmcv ResNetV1c / torchvision ResNet layout",
        checkpoint_kind="ResNet",
    )
    logging.info("pretrained encoder: %s", summary)
    return summary
