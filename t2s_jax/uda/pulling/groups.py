"""Sampling groups of the pulling loss on the device mesh: each group draws from its own images,
per-class sums cross groups and devices (see the package docstring)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from t2s_jax.parallel import DATA_AXIS
from t2s_jax.uda.pulling.loss import QUERY_CHUNK, group_pulling_loss
from t2s_jax.uda.pulling.options import PullOptions

GROUP_AXIS = "pull_groups"  # vmap axis of the sampling groups of one device


def _num_groups(batch_size: int, mesh: jax.sharding.Mesh | None, num_groups: int | None) -> tuple[int, int]:
    """(G, devices on 'data'); G defaults to one group per device."""
    num_devices = 1 if mesh is None else mesh.shape[DATA_AXIS]
    groups = num_devices if num_groups is None else num_groups
    if groups < 1 or batch_size % groups:
        raise ValueError(
            f"pull.num_groups={groups} must divide the batch of {batch_size} images (contiguous sampling groups)"
        )
    if groups > 1 and groups % num_devices:
        raise ValueError(
            f"pull.num_groups={groups} must be 1 or a multiple of the {num_devices} devices on the mesh's "
            f"'{DATA_AXIS}' axis (0 in the config: one group per device)"
        )
    return groups, num_devices


def pulling_loss(
    options: PullOptions,
    key: jax.Array,
    query_features: jax.Array,
    query_labels: jax.Array,
    source_key_features: jax.Array,
    source_labels: jax.Array,
    target_key_features: jax.Array | None,
    target_pseudo_labels: jax.Array | None,
    target_confidence: jax.Array | None,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_pull and logging scalars with checked `options` (`PullOptions.from_config`).

    Features (B, h, w, D), maps (B, h, w), all on one feature grid. Gradients reach
    `query_features` only. Without target data (domain generalisation) pass None for the
    three target inputs. `options.num_groups` sampling groups (None: one per device of
    `mesh`'s 'data' axis; 1 without a mesh) draw from their own images; on `mesh` each
    device runs its groups.
    """
    if query_features.shape[:-1] != query_labels.shape or source_key_features.shape[:-1] != source_labels.shape:
        raise ValueError(
            f"pulling_loss: features {query_features.shape} / {source_key_features.shape} do not match label "
            f"maps {query_labels.shape} / {source_labels.shape} (downsample labels to the feature grid)"
        )
    arrays = dict(
        query_features=query_features,
        query_labels=query_labels,
        source_key_features=source_key_features,
        source_labels=source_labels,
        target_key_features=target_key_features,
        target_pseudo_labels=target_pseudo_labels,
        target_confidence=target_confidence,
    )
    arrays = {name: array for name, array in arrays.items() if array is not None}
    batch_size = query_labels.shape[0]
    if any(array.shape[0] != batch_size for array in arrays.values()):
        shapes = {name: array.shape for name, array in arrays.items()}
        raise ValueError(f"pulling_loss: every input needs the same batch (leading) size, got {shapes}")
    groups, num_devices = _num_groups(batch_size, mesh, options.num_groups)
    group_options = dataclasses.replace(options, num_queries=math.ceil(options.num_queries / groups))  # N b / B
    group_loss = functools.partial(group_pulling_loss, options=group_options, num_groups=groups)
    if groups == 1:  # the whole batch: the paper's sampling, today's draws
        return group_loss(key, arrays, axis_names=(), query_chunk_size=QUERY_CHUNK)
    local_groups = groups // num_devices
    on_mesh = num_devices > 1
    axis_names = (GROUP_AXIS, DATA_AXIS) if on_mesh else (GROUP_AXIS,)
    # The chunk bounds a device's gathered negatives: its groups' chunks are vmapped together.
    group_loss = functools.partial(
        group_loss, axis_names=axis_names, query_chunk_size=max(1, QUERY_CHUNK // local_groups)
    )

    def device_loss(key, arrays):
        first_group = jax.lax.axis_index(DATA_AXIS) * local_groups if on_mesh else 0
        group_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, first_group + jnp.arange(local_groups))
        by_group = jax.tree.map(lambda x: x.reshape(local_groups, x.shape[0] // local_groups, *x.shape[1:]), arrays)
        outputs = jax.vmap(group_loss, axis_name=GROUP_AXIS)(group_keys, by_group)
        return jax.tree.map(lambda x: x[0], outputs)  # summed over all groups: the same in each

    if not on_mesh:
        return device_loss(key, arrays)
    # check_vma=False: jax 0.10 cannot psum over a vmap axis inside a checked shard_map (an
    # assertion in pvary). The outputs are psums over every group, so replicated as declared.
    return jax.shard_map(
        device_loss,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
        out_specs=PartitionSpec(),
        check_vma=False,
    )(key, arrays)

