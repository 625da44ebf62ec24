"""Mean-teacher EMA of the student's parameters (method.md section 4.1).

alpha_t = min(1 - 1/(t+1), max_alpha); theta_T <- alpha_t theta_T + (1 - alpha_t) theta_S.
At t = 0 alpha is 0, so the teacher becomes an exact copy of the student (DAFormer's
`_init_ema_weights`). Only parameters are averaged: callers pass the `nnx.Param` state,
never BatchNorm statistics.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def ema_alpha(step: jax.Array | int, max_alpha: float = 0.999) -> jax.Array:
    """Teacher momentum at optimiser step `step` (0-based), as a float32 scalar."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (step + 1.0), max_alpha)


def update_teacher(teacher_params: Any, student_params: Any, step: jax.Array | int, max_alpha: float = 0.999) -> Any:
    """EMA of the parameter pytrees (same structure); returns the new teacher parameters."""
    step_size = 1.0 - ema_alpha(step, max_alpha)
    new_teacher = optax.incremental_update(new_tensors=student_params, old_tensors=teacher_params, step_size=step_size)
    # Keep each leaf's dtype: a float32 step size must not promote lower-precision parameters.
    return jax.tree.map(lambda new, old: new.astype(old.dtype), new_teacher, teacher_params)
