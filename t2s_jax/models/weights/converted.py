"""Directories written by `python -m t2s_jax.models.convert`: `state/` (an Orbax tree
{'params', 'batch_stats'}) and `model_config.json` (the `config.model` it belongs to)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t2s_jax import checkpointing
from t2s_jax.models.segmentor import Segmentor, build_segmentor
from t2s_jax.models.weights import layouts
from t2s_jax.models.weights.errors import WeightsError, first_line, listing
from t2s_jax.models.weights.loading import count_parameters


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
        raise WeightsError(f"cannot read the converted checkpoint {directory}: {first_line(e)}") from e
    return tree, model_config


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    """Nested dict -> {path: array}, list indices (stored as strings) back to ints as in nnx paths."""
    flat = {}
    for key, value in tree.items():
        path = prefix + (int(key) if str(key).isdigit() else key,)
        flat.update(_flatten(value, path) if isinstance(value, Mapping) else {path: np.asarray(value)})
    return flat


def encoder_tensors(directory: Path) -> dict[str, np.ndarray]:
    """The MiT tensors of a converted directory (a segmentor's encoder, or an encoder alone) in
    the canonical layout, so they load into any MiT layout (scanned or not) like a `.pth`."""
    tree, _ = read_converted(directory)
    params = tree.get("params", {})
    encoder = params.get("encoder", params)
    tensors = {}
    for path, array in _flatten(encoder).items():
        stacked = layouts.is_stacked(path)
        keys = layouts.mit_keys(path, array.shape[0] if stacked else 0)
        for key, value in zip(keys, array if stacked else [array]):
            tensors[key] = layouts.to_torch(value, path[-1])
    return tensors


def load_converted_segmentor(directory: Path) -> Segmentor:
    """The segmentor `model_config.json` describes, with every stored parameter and BN statistic."""
    tree, model_config = read_converted(directory)
    if "encoder" not in tree.get("params", {}):
        raise WeightsError(f"{directory} holds a MiT encoder without a head: nothing to evaluate "
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
            raise WeightsError(f"{directory}: the stored {name} do not fit the model its model_config.json "
                               f"describes: {listing(wrong)}")
        nnx.replace_by_pure_dict(
            state, tree.get(name, {}), lambda variable, x: variable.replace(jnp.asarray(x, variable.get_value().dtype))
        )
    model = nnx.merge(graphdef, params, batch_stats)
    logging.info("converted segmentor %s: %s parameters", directory, f"{count_parameters(model):,}")
    return model
