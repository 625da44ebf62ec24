"""The generic loader: canonical tensors into every variable of an NNX module.

A key function (`layouts.mit_keys`, `layouts.segmentor_keys`) names the canonical key(s) each
variable takes. Missing keys, unexpected keys and shape mismatches are collected and reported
together, naming the file.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t2s_jax.models.weights import layouts
from t2s_jax.models.weights.errors import WeightsError, listing


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
            parts.append(f"ignored {len(self.ignored)} tensors ({listing(self.ignored, 5)})")
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("mismatched", self.mismatched)):
            if keys:
                parts.append(f"{len(keys)} {name} ({listing(keys, 5)})")
        return "; ".join(parts)


def count_parameters(module: nnx.Module) -> int:
    """Number of scalars in the module's `nnx.Param` variables (works on abstract modules too)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def load_variables(
    module: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    keys_of: Callable[[tuple, int], list[str]],
    *,
    source: Path,
    description: str,
    ignored: re.Pattern,
    strict: bool,
    layout: str = "the canonical mmseg/SegFormer layout",
    checkpoint_kind: str = "MiT / SegFormer",
) -> LoadSummary:
    """Copy canonical `tensors` into every variable of `module` (`keys_of` names the keys).

    `layout` and `checkpoint_kind` name, in the mismatch report, the key layout `keys_of`
    expects and the kind of checkpoint that has it.
    """
    state = nnx.state(module)  # Params and BatchStats: the only variables our modules hold
    updates, missing, mismatched, used = [], [], [], set()
    loaded_tensors = loaded_values = 0
    for path, variable in nnx.to_flat_state(state):
        current = variable.get_value()
        stacked = layouts.is_stacked(path)
        keys = keys_of(path, current.shape[0] if stacked else 0)
        absent = [k for k in keys if k not in tensors]
        if absent:
            missing.extend(absent)
            continue
        expected_shape = current.shape[1:] if stacked else current.shape
        arrays = [layouts.from_torch(tensors[k], path[-1]) for k in keys]
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
        report = _mismatch_report(
            source, description, layout, checkpoint_kind, missing, unexpected, mismatched, nothing_loaded=not updates
        )
        if strict:
            raise WeightsError(report)
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


def _mismatch_report(
    source: Path,
    description: str,
    layout: str,
    checkpoint_kind: str,
    missing,
    unexpected,
    mismatched,
    nothing_loaded: bool,
) -> str:
    lines = [f"checkpoint {source} does not fit {description} (keys in {layout}):"]
    if nothing_loaded:
        lines.append(f"  no key matched: is this a {checkpoint_kind} checkpoint?")
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            lines.append(f"  {len(keys)} {name}: {listing(keys)}")
    return "\n".join(lines)
