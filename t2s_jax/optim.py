"""AdamW with DAFormer's parameter groups and poly-with-warmup schedule (method.md section 4).

Groups: the decoder head and the projector train at `head_lr_multiplier` x the base
rate; encoder LayerNorm scales and biases get no weight decay. The schedule is mmcv's
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


def make_optimizer(
    optim_config: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
    """AdamW over the two parameter groups of a segmentor's parameter state."""

    def adamw(learning_rate: float) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate_schedule(learning_rate, optim_config, num_steps),
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=1e-8,
            weight_decay=optim_config.weight_decay,
            mask=weight_decay_mask,
        )

    return optax.multi_transform(
        {
            ENCODER_GROUP: adamw(optim_config.learning_rate),
            HEAD_GROUP: adamw(optim_config.learning_rate * optim_config.head_lr_multiplier),
        },
        parameter_groups,
    )
