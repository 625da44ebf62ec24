"""Pure train steps: source-only, DAFormer (DACS) self-training, T2S-DA and domain generalisation.

One function per step, `(state, batch, imagenet_params) -> (state, metrics)`, jitted
once by the caller over the device mesh. Method details: `shared/docs/method.md`
sections 4 (DAFormer) and 5 (T2S-DA).

Accelerators want large batches, so the student's passes of a step (source, mixed,
pseudo-target) run as ONE batched forward/backward and the teacher's passes (target,
source) as one forward, interleaved example-major so a device's examples stay on it
(`stack_passes`). BatchNorm normalises each pass with its own statistics
(`num_batch_groups`), so the semantics of separate passes hold.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from t2s_jax import losses, parallel
from t2s_jax.models import stack_passes, unstack_passes
from t2s_jax.optim import learning_rate_schedule
from t2s_jax.uda import augment, classmix, ema, feature_distance, normalize, pseudo_labels, pulling
from t2s_jax.uda.translation import pseudo_target_images

METHODS = ("source_only", "daformer", "t2s", "dg")
Metrics = dict[str, jax.Array]


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


def initial_train_state(
    params: nnx.State, batch_stats: nnx.State, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    """Step 0: the teacher is a copy of the student (method.md 4.1)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        teacher_params=jax.tree.map(jnp.copy, params),
        teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, dict[str, jax.Array], nnx.State], tuple[TrainState, Metrics]]:
    """The step of `config.method`; jit it with the state replicated and the batch sharded on `mesh`."""
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r}; expected one of {METHODS}")
    learning_rate = learning_rate_schedule(config.optim.learning_rate, config.optim, num_steps)
    losses_fn = {
        "source_only": _source_only_losses,
        "daformer": _daformer_losses,
        "t2s": _daformer_losses,
        "dg": _domain_generalisation_losses,
    }[config.method]

    def train_step(state: TrainState, batch: dict[str, jax.Array], imagenet_params: nnx.State):
        keys = _step_keys(state.rng, state.step)
        teacher_params = ema.update_teacher(
            state.teacher_params, state.params, state.step, config.uda.ema_max_alpha
        )
        context = _StepContext(config, graphdef, mesh, state, teacher_params, imagenet_params, keys)

        def loss_fn(params):
            return losses_fn(context, params, batch)

        grads, (batch_stats, teacher_batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["learning_rate"] = learning_rate(state.step)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            teacher_params=teacher_params,
            teacher_batch_stats=teacher_batch_stats,
            opt_state=opt_state,
        )
        return new_state, metrics

    return train_step


# Independent random streams of one step, folded from the step's key by position.
_RANDOM_STREAMS = ("dropout", "classmix", "augment", "translation", "pulling")


def _step_keys(rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    step_key = jax.random.fold_in(rng, step)
    return {name: jax.random.fold_in(step_key, i) for i, name in enumerate(_RANDOM_STREAMS)}


@dataclasses.dataclass(frozen=True)
class _StepContext:
    """What the loss functions of one traced step share."""

    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    mesh: jax.sharding.Mesh | None
    state: TrainState
    teacher_params: nnx.State  # already EMA-updated for this step
    imagenet_params: nnx.State  # frozen initial parameters; only the encoder is used
    keys: dict[str, jax.Array]

    def student_forward(self, params, images, num_groups, *, with_projection=False):
        """Training-mode student pass over `num_groups` stacked passes; returns (output, new BN stats)."""
        # copy=True: fresh Variables at this trace level, so BatchNorm may update them here.
        model = nnx.merge(self.graphdef, params, self.state.batch_stats, copy=True)
        output = model.forward(
            images,
            train=True,
            num_batch_groups=num_groups,
            dropout_key=self.keys["dropout"],
            with_projection=with_projection,
        )
        return output, nnx.state(model, nnx.BatchStat)

    def teacher_forward(self, images, num_groups, *, with_projection=False):
        """Teacher pass: dropout and stochastic depth off, BN on the batch's own statistics."""
        model = nnx.merge(
            self.graphdef, self.teacher_params, self.state.teacher_batch_stats, copy=True
        )
        output = model.forward(
            images, train=False, use_batch_stats=True, num_batch_groups=num_groups,
            with_projection=with_projection,
        )
        output = jax.tree.map(jax.lax.stop_gradient, output)
        return output, nnx.state(model, nnx.BatchStat)

    def imagenet_features(self, images):
        """Last-stage features of the frozen ImageNet encoder (feature distance)."""
        model = nnx.merge(self.graphdef, self.imagenet_params, self.state.batch_stats)
        return jax.lax.stop_gradient(model.encoder(images)[-1])


def _source_cross_entropy(context: _StepContext, logits: jax.Array, labels: jax.Array) -> jax.Array:
    return losses.cross_entropy(losses.upsample_logits(logits, labels.shape[1:3]), labels)


def _feature_distance(context: _StepContext, source_features, source_images, source_labels):
    uda = context.config.uda
    if uda.fd_weight <= 0:
        return jnp.zeros((), jnp.float32)
    return uda.fd_weight * feature_distance.thing_feature_distance(
        source_features,
        context.imagenet_features(source_images),
        source_labels,
        thing_classes=tuple(uda.fd_classes),
        min_ratio=uda.fd_min_ratio,
        num_classes=context.config.model.num_classes,
    )


def _source_only_losses(context: _StepContext, params, batch):
    source_labels = batch["source_label"].astype(jnp.int32)
    output, batch_stats = context.student_forward(
        params, normalize.normalize(batch["source_image"]), 1
    )
    loss_source = _source_cross_entropy(context, output.logits, source_labels)
    metrics = {"loss": loss_source, "loss_source": loss_source}
    return loss_source, (batch_stats, context.state.teacher_batch_stats, metrics)


def _augment_options(uda: ml_collections.ConfigDict, images: jax.Array) -> dict:
    """Strong-augmentation settings (method.md 4.6); DAFormer sizes the blur kernel per axis."""
    height, width = images.shape[1:3]
    return dict(
        color_jitter_prob=uda.color_jitter_prob,
        color_jitter_strength=uda.color_jitter_strength,
        color_jitter_hue=uda.color_jitter_hue,
        blur_prob=uda.blur_prob,
        blur_sigma=tuple(uda.blur_sigma),
        blur_kernel_size=(
            augment.blur_kernel_size_for(height, uda.blur_kernel_fraction),
            augment.blur_kernel_size_for(width, uda.blur_kernel_fraction),
        ),
    )


def _pseudo_target(context: _StepContext, source_0_255, target_0_255):
    pull = context.config.pull
    translate = functools.partial(
        pseudo_target_images,
        engine=pull.translation,
        fda_beta=pull.fda_beta,
        **_augment_options(context.config.uda, source_0_255),
    )
    if pull.translation == "fda" and context.mesh is not None:
        # FDA is deterministic and per example: each device transforms its own images.
        fda_per_device = parallel.per_device(lambda s, t: translate(None, s, t), context.mesh)
        return fda_per_device(source_0_255, target_0_255)
    return translate(context.keys["translation"], source_0_255, target_0_255)


def _daformer_losses(context: _StepContext, params, batch):
    """DACS self-training (method.md 4), plus the pulling loss when method == 't2s' (5)."""
    config = context.config
    use_pull = config.method == "t2s"
    source_raw = batch["source_image"].astype(jnp.float32)
    target_raw = batch["target_image"].astype(jnp.float32)
    source_labels = batch["source_label"].astype(jnp.int32)
    crop_hw = source_labels.shape[1:3]

    # Teacher: pseudo-labels on the target and, for T2S-DA, keys on target and source.
    teacher_images = [target_raw] + ([source_raw] if use_pull else [])
    teacher_output, teacher_batch_stats = context.teacher_forward(
        normalize.normalize(stack_passes(teacher_images)),
        len(teacher_images),
        with_projection=use_pull,
    )
    teacher_target_logits = unstack_passes(teacher_output.logits, len(teacher_images))[0]
    target_pseudo = pseudo_labels.pseudo_labels(
        losses.upsample_logits(teacher_target_logits, crop_hw),
        threshold=config.uda.pseudo_threshold,
        ignore_top=config.uda.pseudo_ignore_top,
        ignore_bottom=config.uda.pseudo_ignore_bottom,
    )
    pseudo_label, pseudo_weight, _, quality = target_pseudo

    # ClassMix of source onto target, then strong augmentation of the mixed image.
    mix_mask = classmix.classmix_masks(context.keys["classmix"], source_labels, config.model.num_classes)
    mixed_raw = classmix.mix(mix_mask, source_raw, target_raw)
    mixed_labels = jnp.where(mix_mask > 0, source_labels, pseudo_label)
    mixed_weight = classmix.mix(mix_mask, jnp.ones_like(pseudo_weight), pseudo_weight)
    mixed_images = augment.strong_augment(
        context.keys["augment"], mixed_raw, **_augment_options(config.uda, mixed_raw)
    )

    student_images = [source_raw, mixed_images]
    if use_pull:
        query_images = _query_images(context, source_raw, target_raw)
        if query_images is not None:
            student_images.append(query_images)
    student_output, batch_stats = context.student_forward(
        params,
        normalize.normalize(stack_passes(student_images)),
        len(student_images),
        with_projection=use_pull,
    )
    student_logits = unstack_passes(student_output.logits, len(student_images))
    loss_source = _source_cross_entropy(context, student_logits[0], source_labels)
    loss_mixed = losses.cross_entropy(
        losses.upsample_logits(student_logits[1], crop_hw), mixed_labels, weights=mixed_weight
    )
    source_features = unstack_passes(student_output.encoder_features[-1], len(student_images))[0]
    loss_fd = _feature_distance(context, source_features, normalize.normalize(source_raw), source_labels)
    total = loss_source + loss_mixed + loss_fd
    metrics = {
        "loss_source": loss_source,
        "loss_mixed": loss_mixed,
        "loss_fd": loss_fd,
        "pseudo_quality": quality,
    }
    if "target_label" in batch:
        metrics["pseudo_label_accuracy"] = _pseudo_label_accuracy(pseudo_label, batch["target_label"])
    if use_pull:
        loss_pull, pull_metrics = _pulling_loss(
            context, student_output, teacher_output, len(student_images), source_labels
        )
        total = total + config.pull.weight * loss_pull
        metrics.update(pull_metrics, loss_pull=loss_pull)
    metrics["loss"] = total
    return total, (batch_stats, teacher_batch_stats, metrics)


def _domain_generalisation_losses(context: _StepContext, params, batch):
    """Paper 4.2: no target data; the pseudo-target is a style augmentation of the source."""
    config = context.config
    source_raw = batch["source_image"].astype(jnp.float32)
    source_labels = batch["source_label"].astype(jnp.int32)
    teacher_output, teacher_batch_stats = context.teacher_forward(
        normalize.normalize(source_raw), 1, with_projection=True
    )
    student_images = [source_raw, _pseudo_target(context, source_raw, None)]
    student_output, batch_stats = context.student_forward(
        params, normalize.normalize(stack_passes(student_images)), 2, with_projection=True
    )
    loss_source = _source_cross_entropy(
        context, unstack_passes(student_output.logits, 2)[0], source_labels
    )
    loss_pull, pull_metrics = _pulling_loss(context, student_output, teacher_output, 2, source_labels)
    total = loss_source + config.pull.weight * loss_pull
    metrics = {"loss": total, "loss_source": loss_source, "loss_pull": loss_pull, **pull_metrics}
    return total, (batch_stats, teacher_batch_stats, metrics)


def _query_images(context: _StepContext, source_raw, target_raw):
    """The extra student pass the queries come from, or None when they reuse the source pass."""
    domain = context.config.pull.query_domain
    if domain == "pseudo_target":
        return _pseudo_target(context, source_raw, target_raw)
    if domain == "target":
        return target_raw
    if domain == "source":
        return None
    raise ValueError(f"config.pull.query_domain={domain!r}; expected pseudo_target | source | target")


def _pulling_loss(context, student_output, teacher_output, num_student_groups, source_labels):
    """The pulling loss (before lambda) from the student's query pass and the teacher's key passes."""
    config = context.config
    queries_by_pass = unstack_passes(student_output.projection, num_student_groups)
    # 'source' queries reuse the source pass; otherwise the last student pass holds the queries.
    queries = queries_by_pass[0] if config.pull.query_domain == "source" else queries_by_pass[-1]
    feature_hw = queries.shape[1:3]
    source_labels_grid = pulling.downsample_labels_nearest(source_labels, feature_hw)

    teacher_groups = 1 if config.method == "dg" else 2  # (source) or (target, source)
    source_keys = unstack_passes(teacher_output.projection, teacher_groups)[-1]
    target_keys = target_labels = target_confidence = None
    if config.method != "dg":
        target_keys = unstack_passes(teacher_output.projection, teacher_groups)[0]
        target_logits = unstack_passes(teacher_output.logits, teacher_groups)[0]
        probabilities = jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1)
        target_labels = pulling.downsample_labels_nearest(jnp.argmax(probabilities, -1), feature_hw)
        target_confidence = pulling.downsample_labels_nearest(jnp.max(probabilities, -1), feature_hw)

    query_labels = target_labels if config.pull.query_domain == "target" else source_labels_grid
    return pulling.pulling_loss(
        context.keys["pulling"],
        query_features=queries,
        query_labels=query_labels,
        source_key_features=source_keys,
        source_labels=source_labels_grid,
        target_key_features=target_keys,
        target_pseudo_labels=target_labels,
        target_confidence=target_confidence,
        mesh=context.mesh,
        **pulling.pulling_loss_options(config),
    )


def _pseudo_label_accuracy(pseudo_label: jax.Array, target_label: jax.Array) -> jax.Array:
    """Monitoring only: agreement of pseudo-labels with the target labels where those exist."""
    target_label = target_label.astype(jnp.int32)
    valid = target_label != 255
    correct = jnp.sum((pseudo_label == target_label) & valid)
    return correct / jnp.maximum(jnp.sum(valid), 1)
