"""What a run builds before its first step: the mesh, the train state (on the devices, or as
shapes only) and the jitted step. The loop, eval mode and `t2s_jax.bench` share it, so the
benchmark times exactly the step that trains."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t2s_jax import hosts, methods, parallel, steps
from t2s_jax.models import maybe_load_pretrained
from t2s_jax.optim import make_optimizer
from t2s_jax.training.control import RunError

# Compiler options for executables that run once (state initialisation): the backend's
# optimisation passes cost more compile time than the single run they speed up.
_RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def make_run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The data mesh of `config.num_devices`, with every batch size checked against it."""
    try:
        mesh = parallel.make_mesh(config.num_devices)
        parallel.check_batch_size("data.batch_size", config.data.batch_size, mesh)
    except ValueError as error:
        raise RunError(str(error)) from None
    eval_batch = parallel.padded_batch_size(config.data.eval_batch_size, mesh)
    logging.info(
        "mesh of %d devices (processes x devices: %d x %d); global batch %d per domain, eval batch %d%s",
        mesh.size, jax.process_count(), len(parallel.local_mesh_devices(mesh)), config.data.batch_size,
        eval_batch, "" if eval_batch == config.data.eval_batch_size else
        f" (config.data.eval_batch_size={config.data.eval_batch_size} padded to the mesh)",
    )  # fmt: skip
    return mesh


def model_config_for_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model settings of this run: the projector and the distillation head exist only where
    a term reads them."""
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.projector.enabled = methods.needs_projector(config)
    if "distill_head" in model_config:  # absent in configs stored before it
        model_config.distill_head.enabled = methods.needs_distill_head(config)
    return model_config


def abstract_model_state(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The student's graph and the shapes of its parameters and BN statistics (replicated on
    `mesh` when given: a restore target); nothing is initialised or compiled."""
    model_config = model_config_for_run(config)
    host = hosts.build_host(config)
    model = nnx.eval_shape(lambda: host.build_model(model_config, rngs=nnx.Rngs(0)))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    if mesh is not None:
        sharding = parallel.replicated(mesh)
        params, batch_stats = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), (params, batch_stats)
        )
    return graphdef, params, batch_stats


def _initial_state_fn(config: ml_collections.ConfigDict, optimizer: Any):
    """(params, batch_stats) -> (fresh train state, the frozen ImageNet model's (params, batch_stats))."""
    terms = methods.build_terms(config)

    def initial_state(params, batch_stats):
        state = steps.initial_train_state(params, batch_stats, optimizer, config.seed, terms=terms)
        # The ImageNet reference of the feature distance is the initial model, kept frozen with
        # its BatchNorm statistics (a ResNet's run in eval mode); its own buffers: the step
        # donates the state.
        return state, jax.tree.map(jnp.copy, (params, batch_stats))

    return initial_state


def abstract_train_state(
    config: ml_collections.ConfigDict, num_steps: int
) -> tuple[nnx.GraphDef, steps.TrainState, nnx.State, Any]:
    """(graphdef, train state, ImageNet variables, optimizer) of `config` as shapes only."""
    graphdef, params, batch_stats = abstract_model_state(config)
    optimizer = make_optimizer(config.optim, num_steps)
    state, imagenet_variables = jax.eval_shape(_initial_state_fn(config, optimizer), params, batch_stats)
    return graphdef, state, imagenet_variables, optimizer


def create_model_state(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Student parameters and BN statistics, initialised on the devices straight into their
    shardings (one jitted init, compiled without backend optimisation).

    With `config.model.pretrained` the encoder is then overwritten by the ImageNet weights.
    """
    model_config = model_config_for_run(config)
    graphdef = abstract_model_state(config)[0]

    host = hosts.build_host(config)

    def init():
        model = host.build_model(model_config, rngs=nnx.Rngs(config.seed))
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        return params, batch_stats

    init = jax.jit(init, out_shardings=parallel.replicated(mesh)).lower()
    params, batch_stats = init.compile(compiler_options=_RUN_ONCE_COMPILER_OPTIONS)()
    if model_config.pretrained:
        model = nnx.merge(graphdef, params, batch_stats)
        maybe_load_pretrained(model, model_config)
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params = jax.device_put(params, parallel.replicated(mesh))
    return graphdef, params, batch_stats


def create_train_state(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_steps: int
) -> tuple[nnx.GraphDef, steps.TrainState, nnx.State, Any]:
    """(graphdef, fresh train state, frozen ImageNet variables, optimizer)."""
    graphdef, params, batch_stats = create_model_state(config, mesh)
    optimizer = make_optimizer(config.optim, num_steps)
    initial_state = jax.jit(_initial_state_fn(config, optimizer), out_shardings=parallel.replicated(mesh))
    initial_state = initial_state.lower(params, batch_stats)
    state, imagenet_variables = initial_state.compile(compiler_options=_RUN_ONCE_COMPILER_OPTIONS)(params, batch_stats)
    return graphdef, state, imagenet_variables, optimizer


def jit_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    optimizer: Any,
    mesh: jax.sharding.Mesh,
    num_steps: int,
):
    """The step of `config.method` jitted for `mesh`: state and ImageNet variables replicated,
    the batch sharded on 'data', the incoming state donated (updated in place)."""
    return jax.jit(
        steps.make_train_step(config, graphdef, optimizer, num_steps, mesh),
        in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh), parallel.replicated(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
