"""Hugging Face SegFormer directories as complete models: the `config.model` their
`config.json` describes, built and loaded strictly."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import ml_collections
from flax import nnx

from t2s_jax import config as config_lib
from t2s_jax.models.mit import MiT, build_mit
from t2s_jax.models.segmentor import Segmentor, build_segmentor
from t2s_jax.models.weights import layouts
from t2s_jax.models.weights.errors import WeightsError, first_line
from t2s_jax.models.weights.loading import LoadSummary, load_variables
from t2s_jax.models.weights.reading import read_checkpoint


def describe_encoder(encoder: MiT) -> str:
    return f"the MiT encoder (embed_dims {encoder.embed_dims}, depths {encoder.depths})"


def read_hf_config(directory: Path) -> dict:
    """The contents of a Hugging Face directory's config.json."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {config_file}: {first_line(e)}; expected a SegFormer config.json") from e
    if not isinstance(hf_config, dict):
        raise WeightsError(f"{config_file} holds a {type(hf_config).__name__}; expected a SegFormer config.json")
    return hf_config


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
            raise WeightsError(f"unsupported SegFormer {field} {hf_config[field]}; MiT uses {value}")
    if hf_config.get("hidden_act", "gelu") != "gelu" or hf_config.get("num_channels", 3) != 3:
        raise WeightsError("unsupported SegFormer config: MiT uses hidden_act='gelu' and 3 input channels")
    mlp_ratios = set(hf_config.get("mlp_ratios", [4]))
    if len(mlp_ratios) != 1:
        raise WeightsError(f"unsupported per-stage mlp_ratios {hf_config['mlp_ratios']}")
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
    hf_config = read_hf_config(directory)
    source, tensors = read_checkpoint(directory)
    canonical = layouts.to_canonical(tensors)
    with_head = "SegformerForSemanticSegmentation" in hf_config.get("architectures", []) or any(
        k.startswith("decode_head.") for k in canonical
    )
    model_config = model_config_from_hf(hf_config, with_head=with_head, dtype=dtype, scan_blocks=scan_blocks)
    # Shapes only: the strict load below overwrites every variable (no random init cost).
    if with_head:
        model = nnx.eval_shape(lambda: build_segmentor(model_config, rngs=nnx.Rngs(0)))
        keys_of, ignored = layouts.segmentor_keys, layouts.IGNORED_ALWAYS
        description = f"a SegFormer segmentor (embed_dims {model.encoder.embed_dims}, depths {model.encoder.depths})"
    else:
        model = nnx.eval_shape(lambda: build_mit(model_config.encoder, model_config, rngs=nnx.Rngs(0)))
        keys_of, ignored, description = layouts.mit_keys, layouts.IGNORED_FOR_ENCODER, describe_encoder(model)
    summary = load_variables(
        model, canonical, keys_of, source=source, description=description, ignored=ignored, strict=True
    )
    logging.info("from_hf_pretrained: %s", summary)
    return model, model_config, summary
