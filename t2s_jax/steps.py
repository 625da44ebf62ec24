"""The pure train step: shared teacher work, then the loss terms of the run's method.

`(state, batch, imagenet_params) -> (state, metrics)`, jitted once by the caller over the
device mesh. A method is a list of terms (`t2s_jax/methods.py`, `t2s_jax/uda/term.py`):

    EMA update -> teacher forward over the terms' views -> pseudo-labels (once)
      -> each term prepares its student passes -> ONE batched student forward/backward
      -> each term's weighted losses -> their sum -> one optimizer update

Accelerators want large batches, so the student's passes of a step (source, mixed,
pseudo-target, masked, ...) run as one forward, and the teacher's views (target, source) as
another, interleaved example-major so a device's examples stay on it (`stack_passes`).
BatchNorm normalises each pass with its own statistics (`num_batch_groups`), so the
semantics of separate passes hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from t2s_jax import methods
from t2s_jax.classes import IGNORE_INDEX
from t2s_jax.models import SegmentorOutput, resize_bilinear, stack_passes, unstack_passes
from t2s_jax.optim import learning_rate_schedule
from t2s_jax.uda import ema, normalize, pseudo_labels
from t2s_jax.uda.term import Metrics, PseudoLabels, StepContext, Term


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
    mask_teacher_params: nnx.State | None = None  # MIC's separate EMA teacher (mic.teacher_alpha)


def mask_teacher_alpha(terms: Sequence[Term]) -> float | None:
    """The EMA alpha of a term's own teacher (MIC with `mic.teacher_alpha`), or None."""
    alphas = {term.teacher_alpha for term in terms if getattr(term, "teacher_alpha", None) is not None}
    if len(alphas) > 1:
        raise ValueError(f"terms ask for separate teachers with different EMA alphas {sorted(alphas)}")
    return alphas.pop() if alphas else None


def initial_train_state(
    params: nnx.State,
    batch_stats: nnx.State,
    optimizer: optax.GradientTransformation,
    seed: int,
    *,
    with_mask_teacher: bool = False,
) -> TrainState:
    """Step 0: the teacher (and MIC's own teacher, if any) is a copy of the student (method.md 4.1)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        teacher_params=jax.tree.map(jnp.copy, params),
        teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
        mask_teacher_params=jax.tree.map(jnp.copy, params) if with_mask_teacher else None,
    )


# Independent random streams of one step, folded from the step's key by position: a new
# stream goes at the end, so the others keep their draws.
RANDOM_STREAMS = ("dropout", "classmix", "augment", "translation", "pulling", "mask", "mask_augment")


def _step_keys(rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    step_key = jax.random.fold_in(rng, step)
    return {name: jax.random.fold_in(step_key, i) for i, name in enumerate(RANDOM_STREAMS)}


def _first_requests(requests: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """Names in order of first request, each once."""
    return tuple(dict.fromkeys(name for names in requests for name in names))


def _forward(graphdef, params, batch_stats, passes: dict[str, jax.Array], *, train: bool, **kwargs):
    """One batched pass over the named image batches; returns ({name: output}, new BN statistics)."""
    names = list(passes)
    # copy=True: fresh Variables at this trace level, so BatchNorm may update them here.
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    images = normalize.normalize(stack_passes([passes[name] for name in names]))
    output = model.forward(images, train=train, num_batch_groups=len(names), **kwargs)
    outputs = {
        name: jax.tree.map(lambda x, i=index: unstack_passes(x, len(names))[i], output)
        for index, name in enumerate(names)
    }
    return outputs, nnx.state(model, nnx.BatchStat)


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
) -> Callable[[TrainState, dict[str, jax.Array], nnx.State], tuple[TrainState, Metrics]]:
    """The step of the run's terms (`methods.build_terms`); jit it with the state replicated
    and the batch sharded on `mesh`."""
    terms = methods.build_terms(config)
    learning_rate = learning_rate_schedule(config.optim.learning_rate, config.optim, num_steps)
    teacher_views = _first_requests([term.teacher_views for term in terms])
    teacher_projection = any(term.teacher_projection for term in terms)
    student_projection = any(term.student_projection for term in terms)
    needs_pseudo_labels = any(term.needs_pseudo_labels for term in terms)
    own_teacher_alpha = mask_teacher_alpha(terms)
    uda = config.uda

    def teacher_forward(teacher_params, teacher_batch_stats, passes, with_projection):
        """Dropout and stochastic depth off, BN on the batch's own statistics, no gradient."""
        outputs, new_stats = _forward(
            graphdef, teacher_params, teacher_batch_stats, passes,
            train=False, use_batch_stats=True, with_projection=with_projection,
        )  # fmt: skip
        return jax.tree.map(jax.lax.stop_gradient, outputs), new_stats

    def train_step(state: TrainState, batch: dict[str, jax.Array], imagenet_params: nnx.State):
        keys = _step_keys(state.rng, state.step)
        teacher_params = ema.update_teacher(state.teacher_params, state.params, state.step, uda.ema_max_alpha)
        mask_teacher_params = state.mask_teacher_params
        if own_teacher_alpha is not None:
            mask_teacher_params = ema.update_teacher(mask_teacher_params, state.params, state.step, own_teacher_alpha)

        source_image = batch["source_image"].astype(jnp.float32)
        target_image = batch["target_image"].astype(jnp.float32) if "target_image" in batch else None
        if target_image is not None and uda.single_target_image:
            # MaskTwins' released code trains on the first target image only (docs/method.md §7).
            target_image = jnp.broadcast_to(target_image[:1], target_image.shape)
        images = {"source": source_image, "target": target_image}

        teacher: dict[str, SegmentorOutput] = {}
        teacher_batch_stats = state.teacher_batch_stats
        if teacher_views:
            teacher, teacher_batch_stats = teacher_forward(
                teacher_params, state.teacher_batch_stats, {v: images[v] for v in teacher_views}, teacher_projection
            )
        metrics: Metrics = {}
        pseudo = None
        if needs_pseudo_labels:
            logits = teacher["target"].logits
            pseudo = PseudoLabels(*pseudo_labels.pseudo_labels(
                resize_bilinear(logits, target_image.shape[1:3]),
                threshold=uda.pseudo_threshold, ignore_top=uda.pseudo_ignore_top,
                ignore_bottom=uda.pseudo_ignore_bottom,
            ))  # fmt: skip
            metrics["pseudo_quality"] = pseudo.quality
            if "target_label" in batch:
                metrics["pseudo_label_accuracy"] = _pseudo_label_accuracy(pseudo.label, batch["target_label"])

        def imagenet_features(images_0_255):
            model = nnx.merge(graphdef, imagenet_params, state.batch_stats)
            return jax.lax.stop_gradient(model.encoder(normalize.normalize(images_0_255))[-1])

        def own_teacher_forward(params, images_0_255):
            outputs, _ = teacher_forward(params, state.teacher_batch_stats, {"view": images_0_255}, False)
            return outputs["view"]

        context = StepContext(
            config=config, mesh=mesh, keys=keys, step=state.step,
            source_image=source_image, source_label=batch["source_label"].astype(jnp.int32),
            target_image=target_image, teacher=teacher, pseudo=pseudo,
            imagenet_features=imagenet_features, teacher_forward=own_teacher_forward,
            mask_teacher_params=mask_teacher_params,
        )  # fmt: skip
        passes: dict[str, jax.Array] = {}
        prepared = []
        for term in terms:
            term_passes, term_prepared = term.prepare(context)
            for name, pass_images in term_passes.items():
                passes.setdefault(name, pass_images)
            prepared.append(term_prepared)

        def loss_fn(params):
            student, batch_stats = _forward(
                graphdef, params, state.batch_stats, passes,
                train=True, dropout_key=keys["dropout"], with_projection=student_projection,
            )  # fmt: skip
            weighted: dict[str, jax.Array] = {}
            term_metrics: Metrics = {}
            for term, term_prepared in zip(terms, prepared):
                term_losses, extra = term.losses(context, student, term_prepared)
                weighted.update(term_losses)
                term_metrics.update(extra)
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
            mask_teacher_params=mask_teacher_params,
        )
        return new_state, {name: jax.lax.stop_gradient(value) for name, value in metrics.items()}

    return train_step
