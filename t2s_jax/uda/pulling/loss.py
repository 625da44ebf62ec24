"""The pulling loss of one sampling group: prototypes, InfoNCE / MSE of the drawn queries, the
per-class combination with DRW weights (method.md 5.2-5.7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t2s_jax.uda.pulling.options import PullOptions
from t2s_jax.uda.pulling.sampling import NegativeSample, draw_pull_samples

_HIGHEST = jax.lax.Precision.HIGHEST
QUERY_CHUNK = 128  # query slots whose negatives are gathered at once, per device (memory vs loop steps)


def l2_normalize(features: jax.Array, eps: float = 1e-12) -> jax.Array:
    """float32 features / ||features|| along the last axis; zero vectors stay zero (finite gradient)."""
    features = features.astype(jnp.float32)
    squared = jnp.sum(features * features, axis=-1, keepdims=True)
    return features * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def class_sums(values: jax.Array, labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Per-class sums of the flat (P, ...) `values` and (K,) pixel counts; labels outside [0, K) are skipped."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # labels >= K: zero rows
    sums = jnp.einsum("pk,p...->k...", one_hot, values.astype(jnp.float32), precision=_HIGHEST)
    return sums, jnp.sum(one_hot, axis=0)


def drw_weights(confidence_sum: jax.Array, count: jax.Array, present: jax.Array, *, scale: float) -> jax.Array:
    """DRW (K,) weights (1 - conf_c)^s from per-class target confidence sums and pixel counts,
    normalised to mean 1 over `present`, 0 elsewhere."""
    mean_confidence = jnp.where(count > 0, confidence_sum / jnp.maximum(count, 1.0), 0.0)
    raw = jnp.where(present, jnp.clip(1.0 - mean_confidence, 0.0, 1.0) ** scale, 0.0)
    mean_raw = jnp.sum(raw) / jnp.maximum(jnp.sum(present), 1)
    # All present classes fully confident: every raw weight is 0, fall back to equal weights.
    weights = jnp.where(mean_raw > 0, raw / jnp.where(mean_raw > 0, mean_raw, 1.0), 1.0)
    return jnp.where(present, weights, 0.0)


def combine(class_loss_sum: jax.Array, class_query_count: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_c w_c L_c / sum_c w_c over classes with queries, L_c = loss sum / query count; 0 if none."""
    class_loss = class_loss_sum / jnp.maximum(class_query_count, 1.0)
    weights = jnp.where(class_query_count > 0, weights, 0.0)
    total = jnp.sum(weights)
    return jnp.sum(weights * class_loss) / jnp.where(total > 0, total, 1.0)


def infonce_losses(
    queries: jax.Array,
    positives: jax.Array,
    keys: jax.Array,
    negatives: NegativeSample,
    *,
    temperature: float,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """(Q,) InfoNCE losses of L2-normalised (Q, D) queries, and the sum of their valid negative similarities.

    loss = -log(exp(q.k+/tau) / (exp(q.k+/tau) + sum_valid exp(q.k-/tau))), computed as
    log(1 + sum_valid exp((q.k- - q.k+)/tau)); exactly 0 for a query without valid
    negatives. Negatives are rows `negatives.index` of the (P, D) `keys`, gathered
    `chunk_size` queries at a time and recomputed in the backward pass, so at most
    chunk_size x M x D keys exist at once.
    """
    num_queries = queries.shape[0]
    chunk_size = min(chunk_size, num_queries)
    num_chunks = -(-num_queries // chunk_size)
    pad = num_chunks * chunk_size - num_queries

    def chunked(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))  # padded rows: no valid negative
        return x.reshape(num_chunks, chunk_size, *x.shape[1:])

    @jax.checkpoint
    def chunk_loss(chunk):
        query, positive, index, valid = chunk
        negative_similarity = jnp.einsum("qd,qmd->qm", query, keys[index], precision=_HIGHEST)
        positive_similarity = jnp.sum(query * positive, axis=-1, keepdims=True)
        margins = (negative_similarity - positive_similarity) / temperature
        any_negative = jnp.any(valid, axis=1)
        # Rows without a valid negative get finite dummies so no -inf reaches logsumexp's gradient.
        margins = jnp.where(valid, margins, jnp.where(any_negative[:, None], -jnp.inf, 0.0))
        loss = jnp.where(any_negative, jnp.logaddexp(0.0, jax.nn.logsumexp(margins, axis=1)), 0.0)
        return loss, jnp.sum(jnp.where(valid, negative_similarity, 0.0))

    chunks = (queries, positives, negatives.index, negatives.valid)
    losses, similarity_sums = jax.lax.map(chunk_loss, tuple(chunked(x) for x in chunks))
    return losses.reshape(-1)[:num_queries], jnp.sum(similarity_sums)


def _psum(x, axis_names: tuple[str, ...]):
    for axis_name in axis_names:  # one at a time: a vmap axis and a shard_map axis do not mix in one psum
        x = jax.lax.psum(x, axis_name)
    return x



def group_pulling_loss(
    key: jax.Array,
    arrays: dict[str, jax.Array],
    options: PullOptions,
    *,
    axis_names: tuple[str, ...],
    num_groups: int,
    query_chunk_size: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of one sampling group; per-class statistics are summed over the groups on `axis_names`.

    `options.num_queries` is the group's base number of queries (the caller scales it).
    """
    num_classes, loss = options.num_classes, options.loss
    has_target = "target_key_features" in arrays
    dim = arrays["query_features"].shape[-1]
    source_keys = l2_normalize(jax.lax.stop_gradient(arrays["source_key_features"]).reshape(-1, dim))
    source_labels = arrays["source_labels"].reshape(-1)
    target_keys = target_labels = target_confidence = None
    if has_target:
        target_keys = l2_normalize(jax.lax.stop_gradient(arrays["target_key_features"]).reshape(-1, dim))
        target_labels = arrays["target_pseudo_labels"].reshape(-1)
        target_confidence = jax.lax.stop_gradient(arrays["target_confidence"]).reshape(-1)
    if options.key_domain == "target":
        prototype_sums, prototype_counts = class_sums(target_keys, target_labels, num_classes)
    else:
        prototype_sums, prototype_counts = class_sums(source_keys, source_labels, num_classes)
    prototype_sums, prototype_counts = _psum((prototype_sums, prototype_counts), axis_names)
    prototypes = l2_normalize(prototype_sums / jnp.maximum(prototype_counts, 1.0)[:, None])

    samples = draw_pull_samples(
        key,
        arrays["query_labels"],
        source_labels,
        target_labels,
        target_confidence,
        prototype_counts > 0,
        num_classes=num_classes,
        num_queries=options.num_queries,
        class_balanced_queries=options.class_balanced_queries,
        num_negatives=options.num_negatives,
        domain_equalised_negatives=options.domain_equalised_negatives,
        unreliable_fraction=options.unreliable_fraction,
        loss=loss,
    )
    queries = samples.queries
    query_vectors = l2_normalize(arrays["query_features"].reshape(-1, dim)[queries.pixel])
    positives = prototypes[queries.class_id]
    sums = {}  # statistics summed over all groups
    if loss == "mse":
        losses = jnp.sum(jnp.square(query_vectors - positives), axis=-1)
    else:
        all_keys = jnp.concatenate([source_keys, target_keys], axis=0) if has_target else source_keys
        negatives = samples.negatives._replace(valid=samples.negatives.valid & queries.valid[:, None])
        losses, sums["negative_similarity"] = infonce_losses(
            query_vectors, positives, all_keys, negatives, temperature=options.temperature, chunk_size=query_chunk_size
        )
        sums["num_negatives"] = jnp.sum(negatives.valid).astype(jnp.float32)
    losses = jnp.where(queries.valid, losses, 0.0)
    used_class = jnp.where(queries.valid, queries.class_id, num_classes)  # unused slots: no class
    sums["class_loss"], sums["class_queries"] = class_sums(losses, used_class, num_classes)
    positive_similarity = jnp.sum(query_vectors * positives, axis=-1)
    sums["positive_similarity"] = jnp.sum(jnp.where(queries.valid, positive_similarity, 0.0))
    sums["unreliable_threshold"] = samples.unreliable_threshold
    if options.dynamic_reweighting:
        sums["confidence"], sums["target_pixels"] = class_sums(target_confidence, target_labels, num_classes)
    sums = _psum(sums, axis_names)

    present = sums["class_queries"] > 0
    if options.dynamic_reweighting:
        weights = drw_weights(sums["confidence"], sums["target_pixels"], present, scale=options.reweight_scale)
    else:
        weights = present.astype(jnp.float32)
    value = combine(sums["class_loss"], sums["class_queries"], weights)

    num_valid = jnp.sum(sums["class_queries"])
    aux = dict(
        classes_present=jnp.sum(present).astype(jnp.float32),
        num_queries=num_valid,
        positive_similarity=sums["positive_similarity"] / jnp.maximum(num_valid, 1.0),
        unreliable_threshold=sums["unreliable_threshold"] / num_groups,  # the groups' mean
    )
    if loss == "infonce":
        aux["negative_similarity"] = sums["negative_similarity"] / jnp.maximum(sums["num_negatives"], 1.0)
    return value, {name: jax.lax.stop_gradient(value_) for name, value_ in aux.items()}


