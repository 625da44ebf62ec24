"""The pure train step: shared teacher work, then the loss terms of the run's method.

`(state, batch, imagenet_variables) -> (state, metrics)`, jitted once by the caller over the
device mesh. A method is a list of terms (`t2s_jax/methods.py`, `t2s_jax/uda/term.py`):

    EMA update, each term's own state update -> each term's batch transform
      -> teacher forward over the terms' views -> pseudo-labels (once)
      -> each term prepares its student passes -> ONE batched student forward/backward
      -> each term's weighted losses -> their sum -> one optimizer update

The step knows no term: what a term needs (views, passes, random streams, state) it
declares (`Term`), and the step checks that no two terms claim the same pass or name.

The model is reached only through the run's host (`t2s_jax/hosts/`): the student's passes of
a step (source, mixed, pseudo-target, masked, ...) run as one host forward, the teacher's
views (target, source) as another; the host stacks them so BatchNorm normalises each pass
with its own statistics, and the semantics of separate passes hold. A term's supervised loss
is the host's too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from t2s_jax import hosts, methods
from t2s_jax.classes import IGNORE_INDEX
from t2s_jax.models import SegmentorOutput, resize_bilinear
from t2s_jax.optim import learning_rate_schedule
from t2s_jax.uda import ema, pseudo_labels
from t2s_jax.uda.term import Metrics, PseudoLabels, StepContext, Term, stream_key


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. The frozen ImageNet encoder is passed separately."""

    step: jax.Array  # int32 scalar: optimizer updates done so far
    params: nnx.State  # student parameters
    batch_stats: nnx.State  # student BatchNorm running statistics
    teacher_params: nnx.State  # EMA of the student parameters
    teacher_batch_stats: nnx.State  # the teacher's own running statistics (never averaged)
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2] raw PRNG key; per-step keys are folded in from `step`
    term_states: dict[str, Any]  # {term name: its own state} of the terms that keep one


def initial_train_state(
    params: nnx.State,
    batch_stats: nnx.State,
    optimizer: optax.GradientTransformation,
    seed: int,
    *,
    terms: Sequence[Term] = (),
) -> TrainState:
    """Step 0: the teacher is a copy of the student (method.md 4.1); each term's own state
    from its `init_state`."""
    term_states = {term.name: term.init_state(params) for term in terms}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        teacher_params=jax.tree.map(jnp.copy, params),
        teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
        term_states={name: state for name, state in term_states.items() if state is not None},
    )


MIRRORED_TARGET = "target_mirrored"  # the teacher's view of the mirrored target (`uda.teacher_flip`)
STEP = "step"  # owner name of the step's own random streams and metrics
# Metrics the step logs itself; no term may log these names.
STEP_METRICS = ("loss", "learning_rate", "grad_norm", "pseudo_quality", "pseudo_label_accuracy")


def _term_keys(rng: jax.Array, step: jax.Array, terms: Sequence[Term]) -> dict[str, dict[str, jax.Array]]:
    """{owner: {stream: key}} of this step: the step's dropout and host crops, each term's declared streams."""
    step_key = jax.random.fold_in(rng, step)
    owners = {STEP: ("dropout", "crop"), **{term.name: term.random_streams for term in terms}}
    return {owner: {s: stream_key(step_key, owner, s) for s in streams} for owner, streams in owners.items()}


def check_terms(terms: Sequence[Term]) -> None:
    """A ValueError naming both terms when two share a name or produce the same student pass,
    or naming the term that reads a pass no other term produces."""
    names = [term.name for term in terms]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"config.terms: terms {repeated} are listed more than once")
    producer: dict[str, str] = {}
    for term in terms:
        for name in term.student_passes:
            if name in producer:
                raise ValueError(
                    f"terms {producer[name]!r} and {term.name!r} both produce the student pass {name!r}; "
                    "one of them must read it (reads_passes) instead"
                )
            producer[name] = term.name
    for term in terms:
        for name in term.reads_passes:
            if producer.get(name, term.name) == term.name:
                raise ValueError(
                    f"term {term.name!r} reads the student pass {name!r}, which no other term of the "
                    f"run produces (produced: {producer})"
                )


def _merge_named(into: dict[str, jax.Array], owners: dict[str, str], items: dict[str, jax.Array], owner: str) -> None:
    """Adds `owner`'s named losses/metrics; a name another owner already logs is an error naming both."""
    for name, value in items.items():
        if name in owners:
            raise ValueError(f"{owners[name]!r} and {owner!r} both log {name!r}; each name needs one owner")
        owners[name] = owner
        into[name] = value


def _first_requests(requests: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """Names in order of first request, each once."""
    return tuple(dict.fromkeys(name for names in requests for name in names))


def _with_model(graphdef, params, batch_stats, run: Callable[[nnx.Module], Any]) -> tuple[Any, nnx.State]:
    """`run(model)` on the model of `params` and `batch_stats`; (its result, the BN statistics after it)."""
    # copy=True: fresh Variables at this trace level, so BatchNorm may update them here.
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    return run(model), nnx.state(model, nnx.BatchStat)


def flip_averaged_logits(logits: jax.Array, mirrored_logits: jax.Array) -> jax.Array:
    """Logits whose softmax is the mean of the softmax of `logits` and of the mirror view's,
    flipped back (VFM-UDA's flip test-time augmentation of the teacher)."""
    probabilities = jax.nn.softmax(logits, -1) + jax.nn.softmax(mirrored_logits[:, :, ::-1], -1)
    return jnp.log(0.5 * probabilities)


def _pseudo_label_accuracy(pseudo_label: jax.Array, target_label: jax.Array) -> jax.Array:
    """Monitoring only: agreement of pseudo-labels with the target labels where those exist."""
    target_label = target_label.astype(jnp.int32)
    valid = target_label != IGNORE_INDEX
    correct = jnp.sum((pseudo_label == target_label) & valid)
    return correct / jnp.maximum(jnp.sum(valid), 1)


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    mesh: jax.sharding.Mesh | None = None,
    terms: Sequence[Term] | None = None,
) -> Callable[[TrainState, dict[str, jax.Array], nnx.State], tuple[TrainState, Metrics]]:
    """The step of `terms` (default: the run's, `methods.build_terms`) on the run's host
    (`hosts.build_host`); jit it with the state replicated and the batch sharded on `mesh`."""
    terms = methods.build_terms(config) if terms is None else tuple(terms)
    host = hosts.build_host(config)
    check_terms(terms)
    learning_rate = learning_rate_schedule(config.optim.learning_rate, config.optim, num_steps)
    teacher_views = _first_requests([term.teacher_views for term in terms])
    teacher_projection = any(term.teacher_projection for term in terms)
    student_projection = any(term.student_projection for term in terms)
    needs_pseudo_labels = any(term.needs_pseudo_labels for term in terms)
    uda = config.uda
    teacher_flip = bool(uda.get("teacher_flip", False))
    if teacher_flip and needs_pseudo_labels:
        teacher_views = (*teacher_views, MIRRORED_TARGET)

    def teacher_forward(teacher_params, teacher_batch_stats, views, with_projection):
        """Dropout and stochastic depth off, BN on the batch's own statistics, no gradient."""
        outputs, new_stats = _with_model(
            graphdef, teacher_params, teacher_batch_stats,
            lambda model: host.teacher_forward(model, views, with_projection=with_projection),
        )  # fmt: skip
        return jax.tree.map(jax.lax.stop_gradient, outputs), new_stats

    def train_step(state: TrainState, batch: dict[str, jax.Array], imagenet_variables: tuple[nnx.State, nnx.State]):
        keys = _term_keys(state.rng, state.step, terms)
        teacher_params = ema.update_teacher(state.teacher_params, state.params, state.step, uda.ema_max_alpha)
        term_states = {
            term.name: term.update_state(state.term_states[term.name], state.params, state.step)
            for term in terms
            if term.name in state.term_states
        }

        batch = {
            name: value.astype(jnp.float32 if name.endswith("_image") else jnp.int32) for name, value in batch.items()
        }
        for term in terms:
            batch = term.transform_batch(batch)
        source_image, target_image = batch["source_image"], batch.get("target_image")
        images = {"source": source_image, "target": target_image}
        if MIRRORED_TARGET in teacher_views:
            images[MIRRORED_TARGET] = target_image[:, :, ::-1]

        teacher: dict[str, SegmentorOutput] = {}
        teacher_batch_stats = state.teacher_batch_stats
        if teacher_views:
            teacher, teacher_batch_stats = teacher_forward(
                teacher_params, state.teacher_batch_stats, {v: images[v] for v in teacher_views}, teacher_projection
            )
        metrics: Metrics = {}
        pseudo = None
        target_valid = batch.get("target_valid")
        if needs_pseudo_labels:
            logits = resize_bilinear(teacher["target"].logits, target_image.shape[1:3])
            if teacher_flip:
                mirrored = resize_bilinear(teacher[MIRRORED_TARGET].logits, target_image.shape[1:3])
                logits = flip_averaged_logits(logits, mirrored)
            pseudo = PseudoLabels(*pseudo_labels.pseudo_labels(
                logits,
                threshold=uda.pseudo_threshold, ignore_top=uda.pseudo_ignore_top,
                ignore_bottom=uda.pseudo_ignore_bottom, valid=target_valid,
            ))  # fmt: skip
            metrics["pseudo_quality"] = pseudo.quality
            if "target_label" in batch:
                metrics["pseudo_label_accuracy"] = _pseudo_label_accuracy(pseudo.label, batch["target_label"])

        def imagenet_features(images_0_255):
            model = nnx.merge(graphdef, *imagenet_variables)
            return jax.lax.stop_gradient(host.imagenet_features(model, images_0_255))

        def view_forward(params, images_0_255):
            outputs, _ = teacher_forward(params, state.teacher_batch_stats, {"view": images_0_255}, False)
            return outputs["view"]

        shared = StepContext(
            config=config, mesh=mesh, host=host, keys={}, step=state.step,
            source_image=source_image, source_label=batch["source_label"],
            target_image=target_image, target_valid=target_valid, teacher=teacher, pseudo=pseudo,
            imagenet_features=imagenet_features, teacher_forward=view_forward,
        )  # fmt: skip
        contexts = [
            dataclasses.replace(shared, keys=keys[term.name], state=term_states.get(term.name)) for term in terms
        ]
        passes: dict[str, jax.Array] = {}
        prepared = []
        for term, context in zip(terms, contexts):
            term_passes, term_prepared = term.prepare(context)
            if set(term_passes) != set(term.student_passes):
                raise ValueError(
                    f"term {term.name!r} prepared the passes {sorted(term_passes)} but declares "
                    f"student_passes={term.student_passes}"
                )
            passes.update(term_passes)
            prepared.append(term_prepared)

        def loss_fn(params):
            student, batch_stats = _with_model(
                graphdef, params, state.batch_stats,
                lambda model: host.student_forward(
                    model, passes, dropout_key=keys[STEP]["dropout"], crop_key=keys[STEP]["crop"],
                    with_projection=student_projection,
                ),
            )  # fmt: skip
            weighted: dict[str, jax.Array] = {}
            term_metrics: Metrics = {}
            owners = dict.fromkeys(STEP_METRICS, STEP)
            for term, context, term_prepared in zip(terms, contexts, prepared):
                term_losses, extra = term.losses(context, student, term_prepared)
                _merge_named(weighted, owners, term_losses, term.name)
                _merge_named(term_metrics, owners, extra, term.name)
            total = sum(weighted.values())
            return total, (batch_stats, {**weighted, **term_metrics, "loss": total})

        grads, (batch_stats, step_metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics.update(step_metrics)
        metrics["learning_rate"] = learning_rate(state.step)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            teacher_params=teacher_params,
            teacher_batch_stats=teacher_batch_stats,
            opt_state=opt_state,
            term_states=term_states,
        )
        return new_state, {name: jax.lax.stop_gradient(value) for name, value in metrics.items()}

    return train_step
