"""AdamW with DAFormer's parameter groups and poly-with-warmup schedule (method.md section 4).

Groups: the decoder head and the projector train at `head_lr_multiplier` x the base
rate; encoder LayerNorm scales and biases get no weight decay (`exempt_encoder_norms`).
A ViT encoder may also take VFM-UDA's layer-wise decay (`layer_decay` d < 1): block i of L
trains at d^(L-1-i) x the encoder rate, the embeddings and the final norm at d^L. The schedule is mmcv's
`poly` policy with linear warmup: lr(t) = lr0 * (1 - t/T)^power, multiplied during
the first `warmup_steps` by 1 - (1 - t/warmup_steps) * (1 - warmup_ratio).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from t2s_jax.models import is_encoder_norm_param, is_head_param

ENCODER_GROUP = "encoder"
HEAD_GROUP = "head"


def learning_rate_schedule(
    base_learning_rate: float, optim_config: ml_collections.ConfigDict, num_steps: int
) -> optax.Schedule:
    """mmcv poly decay over `num_steps` times linear warmup from `warmup_ratio`."""
    warmup_steps = optim_config.warmup_steps
    warmup_ratio = optim_config.warmup_ratio
    power = optim_config.poly_power

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        remaining = (num_steps - jnp.minimum(step, num_steps)) / num_steps  # exact near the end
        poly = base_learning_rate * remaining**power
        if warmup_steps <= 0:
            return poly
        # = 1 - (1 - t/w)(1 - ratio), written without float32 cancellation near t = 0.
        warmup = warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
        return jnp.where(step < warmup_steps, poly * warmup, poly)

    return schedule


def path_names(path: tuple) -> tuple[str, ...]:
    """A pytree key path as nnx names ('encoder', 'stages', '0', 'norm1', 'scale')."""
    names = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
    # Leaves of an nnx.State sit under the Variable's `.value` attribute.
    return tuple(names[:-1] if names and names[-1] == "value" else names)


def parameter_groups(params: Any) -> Any:
    """The optimizer group of every parameter leaf: 'head' (10x lr) or 'encoder'."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: HEAD_GROUP if is_head_param(path_names(path)) else ENCODER_GROUP, params
    )


def weight_decay_mask(params: Any) -> Any:
    """True for leaves that are decayed: all but the encoder LayerNorms."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not is_encoder_norm_param(path_names(path)), params
    )


def _block_index(names: tuple[str, ...]) -> int | None:
    """The index of an unrolled ViT block's leaf (encoder.blocks.<i>...), else None."""
    if len(names) > 2 and names[:2] == ("encoder", "blocks") and names[2].isdigit():
        return int(names[2])
    return None


def layer_decay_factors(params: Any, layer_decay: float) -> Any:
    """Each encoder leaf's learning-rate factor under layer-wise decay (1 elsewhere): block i of
    L gets d^(L-1-i), as a (L, 1, ...) array over the stacked axis of scanned blocks; the
    encoder's other leaves (patch embedding, tokens, position embedding, final norm) d^L."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    named = [(path_names(path), leaf) for path, leaf in leaves]
    depth = 0
    for names, leaf in named:
        if names[:2] == ("encoder", "blocks"):
            index = _block_index(names)
            depth = max(depth, index + 1 if index is not None else leaf.shape[0])

    def factor(path, leaf):
        names = path_names(path)
        if names[:1] != ("encoder",):
            return jnp.ones((), jnp.float32)
        if names[:2] != ("encoder", "blocks"):
            return jnp.float32(layer_decay**depth)
        index = _block_index(names)
        if index is not None:
            return jnp.float32(layer_decay ** (depth - 1 - index))
        per_block = layer_decay ** (depth - 1 - jnp.arange(leaf.shape[0], dtype=jnp.float32))
        return per_block.reshape((-1,) + (1,) * (leaf.ndim - 1))

    return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_layer_decay(layer_decay: float) -> optax.GradientTransformation:
    """Multiplies each encoder update by its `layer_decay_factors` (the whole AdamW step, its
    decoupled weight decay included: as a per-group learning rate does in PyTorch)."""

    def update(updates, state, params=None):
        del params
        factors = layer_decay_factors(updates, layer_decay)
        return jax.tree.map(lambda u, f: u * f.astype(u.dtype), updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    optim_config: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
    """AdamW over the two parameter groups of a segmentor's parameter state."""
    exempt_norms = bool(optim_config.get("exempt_encoder_norms", True))
    layer_decay = float(optim_config.get("layer_decay", 1.0))

    def adamw(learning_rate: float) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate_schedule(learning_rate, optim_config, num_steps),
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=1e-8,
            weight_decay=optim_config.weight_decay,
            mask=weight_decay_mask if exempt_norms else None,
        )

    encoder = adamw(optim_config.learning_rate)
    if layer_decay != 1.0:
        encoder = optax.chain(encoder, scale_by_layer_decay(layer_decay))
    return optax.multi_transform(
        {
            ENCODER_GROUP: encoder,
            HEAD_GROUP: adamw(optim_config.learning_rate * optim_config.head_lr_multiplier),
        },
        parameter_groups,
    )
