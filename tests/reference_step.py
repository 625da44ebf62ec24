"""An unbatched reference of the train step, written plainly from the public pieces.

Each teacher view and each student pass runs through the model on its own (its own
BatchNorm statistics, the running statistics updated pass after pass, as DAFormer's
separate forwards do); the terms' losses are summed by hand. The random draws are the
step's: each term's streams are keyed by `term.stream_key(step key, term name, stream)`.
Dropout and stochastic depth must be off (their masks depend on how passes are batched).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t2s_jax.hosts import SingleScaleHost
from t2s_jax.models import resize_bilinear
from t2s_jax.uda import ema, normalize, pseudo_labels
from t2s_jax.uda.term import PseudoLabels, StepContext, stream_key


def _run_model(graphdef, params, batch_stats, images, **forward):
    """One pass through the model on its own: (output, BatchNorm statistics after it)."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    output = model.forward(normalize.normalize(images), **forward)
    return output, nnx.state(model, nnx.BatchStat)


def reference_step(config: ml_collections.ConfigDict, graphdef, terms, state, batch, imagenet_variables):
    """What one step computes: {"metrics", "grads", "batch_stats", "teacher_params",
    "teacher_batch_stats", "term_states"}."""
    if config.model.dropout_rate or config.model.encoder.drop_path_rate:
        raise ValueError("the reference step needs dropout and stochastic depth off")
    uda = config.uda
    step_key = jax.random.fold_in(state.rng, state.step)
    teacher_params = ema.update_teacher(state.teacher_params, state.params, state.step, uda.ema_max_alpha)
    term_states = {
        name: term.update_state(state.term_states[name], state.params, state.step)
        for term in terms
        for name in [term.name]
        if name in state.term_states
    }
    batch = {k: v.astype(jnp.float32) if k.endswith("_image") else v.astype(jnp.int32) for k, v in batch.items()}
    for term in terms:
        batch = term.transform_batch(batch)
    images = {"source": batch["source_image"], "target": batch.get("target_image")}

    # The teacher: one forward per view, each with its own batch statistics.
    teacher_projection = any(term.teacher_projection for term in terms)
    teacher, teacher_stats = {}, state.teacher_batch_stats
    for term in terms:
        for view in term.teacher_views:
            if view not in teacher:
                output, teacher_stats = _run_model(
                    graphdef, teacher_params, teacher_stats, images[view],
                    train=False, use_batch_stats=True, with_projection=teacher_projection,
                )  # fmt: skip
                teacher[view] = jax.tree.map(jax.lax.stop_gradient, output)
    metrics = {}
    pseudo = None
    if any(term.needs_pseudo_labels for term in terms):
        logits = resize_bilinear(teacher["target"].logits, images["target"].shape[1:3])
        pseudo = PseudoLabels(*pseudo_labels.pseudo_labels(
            logits, threshold=uda.pseudo_threshold, ignore_top=uda.pseudo_ignore_top,
            ignore_bottom=uda.pseudo_ignore_bottom,
        ))  # fmt: skip
        metrics["pseudo_quality"] = pseudo.quality
        if "target_label" in batch:
            valid = batch["target_label"] != 255
            metrics["pseudo_label_accuracy"] = jnp.sum((pseudo.label == batch["target_label"]) & valid) / jnp.maximum(
                jnp.sum(valid), 1
            )

    def imagenet_features(images_0_255):
        model = nnx.merge(graphdef, *imagenet_variables)
        return jax.lax.stop_gradient(model.encoder(normalize.normalize(images_0_255))[-1])

    def own_teacher(params, images_0_255):
        output, _ = _run_model(graphdef, params, state.teacher_batch_stats, images_0_255, train=False, use_batch_stats=True)
        return jax.tree.map(jax.lax.stop_gradient, output)

    contexts = [
        StepContext(
            config=config, mesh=None, host=SingleScaleHost(), step=state.step, source_image=batch["source_image"],
            source_label=batch["source_label"], target_image=batch.get("target_image"), target_valid=None, teacher=teacher,
            pseudo=pseudo, imagenet_features=imagenet_features, teacher_forward=own_teacher,
            keys={stream: stream_key(step_key, term.name, stream) for stream in term.random_streams},
            state=term_states.get(term.name),
        )  # fmt: skip
        for term in terms
    ]
    prepared = [term.prepare(context) for term, context in zip(terms, contexts)]
    student_projection = any(term.student_projection for term in terms)

    def loss_fn(params):
        student, stats = {}, state.batch_stats
        for passes, _ in prepared:  # each student pass on its own, in the terms' order
            for name, pass_images in passes.items():
                student[name], stats = _run_model(
                    graphdef, params, stats, pass_images,
                    train=True, dropout_key=jax.random.key(0), with_projection=student_projection,
                )  # fmt: skip
        named, total = {}, 0.0
        for term, context, (_, term_prepared) in zip(terms, contexts, prepared):
            term_losses, term_metrics = term.losses(context, student, term_prepared)
            for value in term_losses.values():
                total = total + value
            named.update(term_losses)
            named.update(term_metrics)
        return total, (stats, {**named, "loss": total})

    grads, (batch_stats, step_metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics.update(step_metrics)
    return dict(
        metrics=metrics,
        grads=grads,
        batch_stats=batch_stats,
        teacher_params=teacher_params,
        teacher_batch_stats=teacher_stats,
        term_states=term_states,
    )
