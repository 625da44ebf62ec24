"""The T2S-DA pulling loss (method.md 5.2-5.7 and 5.9; paper sections 3.3-3.5).

Queries are student projector features of the pseudo-target image at pixels of class c
(labels: the source labels); each is pulled to its positive key, the source prototype
of class c (mean of the teacher's L2-normalised source features of class c,
re-normalised), and, for InfoNCE, pushed from M negatives: teacher source features of
other classes and *unreliable* teacher target features (confidence below the
alpha-quantile of the batch's target confidence) pseudo-labelled as another class.

Every draw has a fixed size and is taken with replacement from a masked candidate set,
so the loss compiles once whatever classes a batch holds:

* Candidate sets are contiguous blocks of one argsort of the pixels by class. A uniform
  member of class c is `order[start_c + randint(count_c)]`; a uniform member of "any
  class but c" is `order[u + count_c * (u >= start_c)]`, u ~ randint(total - count_c).
  Each draw is O(1): no (pixels x queries) masks or gathers.
* Queries fill a static budget of slots: class-balanced (CBQS) N_c = ceil(N K_b rho_c)
  sums to less than N K_b + K_b, so (N + 1) K slots always suffice (N K when
  class-equalised, N_c = N). Slot j belongs to the class whose cumulative count first
  exceeds j; unused slots are masked. rho_c and K_b count the candidate query pixels
  (valid labels of classes that have a positive key: with the default domains, every
  valid source pixel). [our reading of eq. 16]
* Negatives: M per query slot, M/2 from each domain with DENPS (the first M // 2
  columns source, the rest target), else M from the union of both candidate sets.
  A domain without candidates for class c leaves its columns masked.

Memory at paper scale (N = 128, K = 19, M = 1024, D = 256, float32): the gathered
negative keys are (N + 1) K x M x D = 2451 x 1024 x 256 x 4 B = 2.6 GB, also kept for the
backward pass (gradients reach queries only); everything else is O(pixels x D).
MSE needs no negatives and draws none.

A class contributes only if it has query pixels *and* a positive key ("present");
L_pull = sum_c w_c L_c / sum_c w_c over present classes, L_c the mean loss of its
queries, w_c = 1 or, with dynamic re-weighting (DRW), (1 - conf_c)^s normalised to mean
1 over present classes, conf_c the mean teacher confidence of target pixels
pseudo-labelled c (0 when there are none: such a class gets the largest weight)
[our reading of eq. 17-18, our choice for the empty case]. No present class: loss 0.

Ablation domains (paper Tab. 7). The loss takes whatever queries the step passes
(`steps.py` maps `pull.query_domain` to a student pass: 'pseudo_target' -> translated
source image with source labels; 'source' -> source image, source labels; 'target' ->
target image, teacher pseudo-labels). `key_domain` picks the
prototypes: 'source' -> teacher source features with source labels, 'target' -> teacher
target features with their pseudo-labels. Negatives are always drawn as above.

All label maps live on the stride-4 feature grid; `downsample_labels_nearest` brings
full-resolution maps there (nearest neighbour [our choice]). Labels outside [0, K)
(255 = ignore) are never candidates.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

LOSSES = ("infonce", "mse")
KEY_DOMAINS = ("source", "target")
_HIGHEST = jax.lax.Precision.HIGHEST


class QuerySample(NamedTuple):
    """Query slots: flat pixel index into the query grid (B*h*w), class, and whether the slot is used."""

    pixel: jax.Array  # (Q,) int32
    class_id: jax.Array  # (Q,) int32
    valid: jax.Array  # (Q,) bool


class NegativeSample(NamedTuple):
    """Per query slot M negatives: flat index into [source keys; target keys], and validity."""

    index: jax.Array  # (Q, M) int32; < B*h*w: source pixel, else target pixel (index - B*h*w)
    valid: jax.Array  # (Q, M) bool


class PullSamples(NamedTuple):
    queries: QuerySample
    negatives: NegativeSample | None  # None for the MSE loss
    unreliable_threshold: jax.Array  # () target confidence quantile; 0 without target data


class _ClassBlocks(NamedTuple):
    """Candidate pixels sorted by class: class c occupies order[start[c] : start[c] + count[c]]."""

    order: jax.Array  # (P,) int32 flat pixel indices, candidates first
    start: jax.Array  # (K,) int32
    count: jax.Array  # (K,) int32


def downsample_labels_nearest(labels: jax.Array, size_hw: tuple[int, int]) -> jax.Array:
    """(B, H, W) map -> (B, h, w) by nearest neighbour: cell (i, j) takes the pixel nearest its centre.

    Row i of the grid reads input row floor((i + 0.5) * H / h) (same for columns): the
    centre convention of `jax.image.resize(..., 'nearest')`, exact for integer labels.
    Works for any per-pixel map (pseudo-labels, confidences).
    """
    height, width = labels.shape[1:3]
    rows = np.minimum(((np.arange(size_hw[0]) + 0.5) * height / size_hw[0]).astype(np.int32), height - 1)
    cols = np.minimum(((np.arange(size_hw[1]) + 0.5) * width / size_hw[1]).astype(np.int32), width - 1)
    return labels[:, rows][:, :, cols]


def l2_normalize(features: jax.Array, eps: float = 1e-12) -> jax.Array:
    """float32 features / ||features|| along the last axis; zero vectors stay zero (finite gradient)."""
    features = features.astype(jnp.float32)
    squared = jnp.sum(features * features, axis=-1, keepdims=True)
    return features * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def _is_class(labels: jax.Array, num_classes: int) -> jax.Array:
    return (labels >= 0) & (labels < num_classes)


def _class_blocks(labels: jax.Array, candidate: jax.Array, num_classes: int) -> _ClassBlocks:
    """Sort the (P,) `labels` so candidates of each class are contiguous (non-candidates last)."""
    sort_key = jnp.where(candidate, labels, num_classes).astype(jnp.int32)
    order = jnp.argsort(sort_key, stable=True).astype(jnp.int32)
    count = jnp.bincount(sort_key, length=num_classes + 1)[:num_classes].astype(jnp.int32)
    return _ClassBlocks(order, jnp.cumsum(count) - count, count)


def _draw_in_class(key: jax.Array, blocks: _ClassBlocks, class_id: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A uniform candidate of class `class_id` (any int array): (pixel index, class has candidates)."""
    count = blocks.count[class_id]
    offset = jax.random.randint(key, class_id.shape, 0, jnp.maximum(count, 1))
    position = jnp.minimum(blocks.start[class_id] + offset, blocks.order.shape[0] - 1)
    return blocks.order[position], count > 0


def _outside_class_size(blocks: _ClassBlocks, class_id: jax.Array) -> jax.Array:
    return jnp.sum(blocks.count) - blocks.count[class_id]


def _outside_class_pixel(blocks: _ClassBlocks, class_id: jax.Array, offset: jax.Array) -> jax.Array:
    """The `offset`-th candidate not of class `class_id`: skip over class c's block."""
    position = offset + jnp.where(offset >= blocks.start[class_id], blocks.count[class_id], 0)
    return blocks.order[jnp.minimum(position, blocks.order.shape[0] - 1)]


def _draw_outside_class(
    key: jax.Array, blocks: _ClassBlocks, class_id: jax.Array, shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Uniform candidates of any class but `class_id` (broadcast to `shape`): (pixel, any candidate)."""
    class_id = jnp.broadcast_to(class_id, shape)
    size = _outside_class_size(blocks, class_id)
    offset = jax.random.randint(key, shape, 0, jnp.maximum(size, 1))
    return _outside_class_pixel(blocks, class_id, offset), size > 0


def query_budget(num_classes: int, num_queries: int, class_balanced: bool) -> int:
    """Static number of query slots: an upper bound of sum_c N_c (see the module docstring)."""
    return num_queries * num_classes + (num_classes if class_balanced else 0)


def queries_per_class(class_count: jax.Array, *, num_queries: int, class_balanced: bool) -> jax.Array:
    """(K,) N_c for the (K,) candidate pixel counts: CBQS ceil(N K_b rho_c), or N; 0 when absent."""
    present = class_count > 0
    if not class_balanced:
        return jnp.where(present, num_queries, 0).astype(jnp.int32)
    num_present = jnp.sum(present.astype(jnp.int32))
    total = jnp.maximum(jnp.sum(class_count), 1)
    # Exact integer ceil(N * K_b * count_c / total); int32 is safe while N K P < 2**31 (checked).
    numerator = num_queries * num_present * class_count
    return jnp.where(present, (numerator + total - 1) // total, 0).astype(jnp.int32)


def sample_queries(
    key: jax.Array,
    query_labels: jax.Array,
    has_positive: jax.Array,
    *,
    num_classes: int,
    num_queries: int,
    class_balanced: bool,
) -> QuerySample:
    """Query slots over the flat (P,) `query_labels`; only classes with a positive key are candidates."""
    if (num_queries * num_classes + 1) * query_labels.shape[0] >= 2**31:
        raise ValueError("pull.num_queries x classes x feature-grid pixels overflows int32 query counting")
    is_class = _is_class(query_labels, num_classes)
    candidate = is_class & has_positive[jnp.where(is_class, query_labels, 0)]
    blocks = _class_blocks(query_labels, candidate, num_classes)
    counts = queries_per_class(blocks.count, num_queries=num_queries, class_balanced=class_balanced)
    slots = jnp.arange(query_budget(num_classes, num_queries, class_balanced), dtype=jnp.int32)
    ends = jnp.cumsum(counts)
    # Slot j belongs to the first class whose cumulative count exceeds j (Q x K compares).
    class_id = jnp.searchsorted(ends, slots, side="right", method="compare_all")
    class_id = jnp.minimum(class_id, num_classes - 1).astype(jnp.int32)
    pixel, _ = _draw_in_class(key, blocks, class_id)
    return QuerySample(pixel, class_id, slots < ends[-1])


def unreliable_labels(
    pseudo_labels: jax.Array, confidence: jax.Array, *, unreliable_fraction: float, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Flat pseudo-labels kept where confidence < its `unreliable_fraction` quantile, else 255; and the threshold.

    The quantile is over the batch's valid target pixels, linearly interpolated like
    `np.percentile(C, 100 * alpha)` (paper eq. 14).
    """
    is_class = _is_class(pseudo_labels, num_classes)
    threshold = jnp.nanquantile(jnp.where(is_class, confidence, jnp.nan), unreliable_fraction)
    threshold = jnp.where(jnp.any(is_class), threshold, 0.0)
    unreliable = is_class & (confidence < threshold)
    return jnp.where(unreliable, pseudo_labels, 255), threshold


def sample_negatives(
    key: jax.Array,
    query_class: jax.Array,
    source_labels: jax.Array,
    target_negative_labels: jax.Array | None,
    *,
    num_classes: int,
    num_negatives: int,
    domain_equalised: bool,
) -> NegativeSample:
    """M negatives for each (Q,) query class from flat source labels and flat unreliable target labels.

    `target_negative_labels` (from `unreliable_labels`) is None without target data; then
    all M come from the source.
    """
    source_blocks = _class_blocks(source_labels, _is_class(source_labels, num_classes), num_classes)
    shape = (query_class.shape[0], num_negatives)
    query_class = query_class[:, None]
    if target_negative_labels is None:
        return NegativeSample(*_draw_outside_class(key, source_blocks, query_class, shape))
    num_source_pixels = source_labels.shape[0]
    target_blocks = _class_blocks(
        target_negative_labels, _is_class(target_negative_labels, num_classes), num_classes
    )
    if domain_equalised:
        source_key, target_key = jax.random.split(key)
        num_from_source = num_negatives // 2
        source_pixel, source_ok = _draw_outside_class(
            source_key, source_blocks, query_class, (shape[0], num_from_source)
        )
        target_pixel, target_ok = _draw_outside_class(
            target_key, target_blocks, query_class, (shape[0], num_negatives - num_from_source)
        )
        index = jnp.concatenate([source_pixel, num_source_pixels + target_pixel], axis=1)
        return NegativeSample(index, jnp.concatenate([source_ok, target_ok], axis=1))
    # One uniform draw over the union: offsets below the source count are source pixels.
    query_class = jnp.broadcast_to(query_class, shape)
    num_source = _outside_class_size(source_blocks, query_class)
    num_target = _outside_class_size(target_blocks, query_class)
    offset = jax.random.randint(key, shape, 0, jnp.maximum(num_source + num_target, 1))
    from_source = offset < num_source
    source_pixel = _outside_class_pixel(source_blocks, query_class, jnp.where(from_source, offset, 0))
    target_pixel = _outside_class_pixel(target_blocks, query_class, jnp.where(from_source, 0, offset - num_source))
    index = jnp.where(from_source, source_pixel, num_source_pixels + target_pixel)
    return NegativeSample(index, num_source + num_target > 0)


def class_prototypes(
    key_features: jax.Array, key_labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """(K, D) L2-normalised class means of the flat (P, D) L2-normalised keys, and (K,) has-pixels."""
    one_hot = jax.nn.one_hot(key_labels, num_classes, dtype=jnp.float32)  # labels >= K: zero rows
    count = jnp.sum(one_hot, axis=0)
    sums = jnp.einsum("pk,pd->kd", one_hot, key_features, precision=_HIGHEST)
    return l2_normalize(sums / jnp.maximum(count, 1.0)[:, None]), count > 0


def per_query_loss(
    queries: jax.Array,
    positives: jax.Array,
    negatives: jax.Array | None,
    negative_valid: jax.Array | None,
    *,
    loss: str,
    temperature: float,
) -> jax.Array:
    """(Q,) loss of L2-normalised (Q, D) queries against (Q, D) positives and (Q, M, D) negatives.

    'infonce': -log(exp(q.k+/tau) / (exp(q.k+/tau) + sum_valid exp(q.k-/tau))), computed as
    log(1 + sum_valid exp((q.k- - q.k+)/tau));
    'mse': ||q - k+||^2 (negatives unused).
    """
    if loss == "mse":
        return jnp.sum(jnp.square(queries - positives), axis=-1)
    # log(1 + sum_m exp((q.k-_m - q.k+) / tau)): exactly 0 for a query without valid negatives.
    positive_similarity = jnp.sum(queries * positives, axis=-1, keepdims=True)
    negative_similarity = jnp.einsum("qd,qmd->qm", queries, negatives, precision=_HIGHEST)
    margins = (negative_similarity - positive_similarity) / temperature
    any_negative = jnp.any(negative_valid, axis=1)
    # Rows without a valid negative get finite dummies so no -inf reaches logsumexp's gradient.
    margins = jnp.where(negative_valid, margins, jnp.where(any_negative[:, None], -jnp.inf, 0.0))
    return jnp.where(any_negative, jnp.logaddexp(0.0, jax.nn.logsumexp(margins, axis=1)), 0.0)


def class_weights(
    target_pseudo_labels: jax.Array,
    target_confidence: jax.Array,
    present: jax.Array,
    *,
    num_classes: int,
    scale: float,
) -> jax.Array:
    """DRW (K,) weights: (1 - conf_c)^s over flat target pixels, mean 1 over `present`, 0 elsewhere."""
    one_hot = jax.nn.one_hot(target_pseudo_labels, num_classes, dtype=jnp.float32)
    count = jnp.sum(one_hot, axis=0)
    confidence_sum = jnp.einsum("pk,p->k", one_hot, target_confidence.astype(jnp.float32), precision=_HIGHEST)
    mean_confidence = jnp.where(count > 0, confidence_sum / jnp.maximum(count, 1.0), 0.0)
    raw = jnp.where(present, jnp.clip(1.0 - mean_confidence, 0.0, 1.0) ** scale, 0.0)
    mean_raw = jnp.sum(raw) / jnp.maximum(jnp.sum(present), 1)
    # All present classes fully confident: every raw weight is 0, fall back to equal weights.
    weights = jnp.where(mean_raw > 0, raw / jnp.where(mean_raw > 0, mean_raw, 1.0), 1.0)
    return jnp.where(present, weights, 0.0)


def present_classes(query_class: jax.Array, query_valid: jax.Array, num_classes: int) -> jax.Array:
    """(K,) whether any used query slot has class c."""
    used_class = jnp.where(query_valid, query_class, num_classes)
    return jnp.bincount(used_class, length=num_classes + 1)[:num_classes] > 0


def combine(
    losses: jax.Array, query_class: jax.Array, query_valid: jax.Array, weights: jax.Array, num_classes: int
) -> jax.Array:
    """sum_c w_c L_c / sum_c w_c over present classes, L_c the mean of class c's (Q,) `losses`; 0 if none."""
    membership = jax.nn.one_hot(query_class, num_classes, dtype=jnp.float32) * query_valid[:, None]
    count = jnp.sum(membership, axis=0)
    class_loss = jnp.einsum("qk,q->k", membership, jnp.where(query_valid, losses, 0.0), precision=_HIGHEST)
    class_loss = class_loss / jnp.maximum(count, 1.0)
    weights = jnp.where(count > 0, weights, 0.0)
    total = jnp.sum(weights)
    return jnp.sum(weights * class_loss) / jnp.where(total > 0, total, 1.0)


def check_options(loss: str, key_domain: str, has_target: bool, domain_equalised: bool, reweighting: bool) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown pull.loss {loss!r}; expected one of {LOSSES}")
    if key_domain not in KEY_DOMAINS:
        raise ValueError(f"unknown pull.key_domain {key_domain!r}; expected one of {KEY_DOMAINS}")
    if not has_target:
        for name, on in (
            ("pull.domain_equalised_negatives", domain_equalised),
            ("pull.dynamic_reweighting", reweighting),
            ("pull.key_domain='target'", key_domain == "target"),
        ):
            if on:
                raise ValueError(f"{name} needs target data; switch it off for domain generalisation")


def draw_pull_samples(
    key: jax.Array,
    query_labels: jax.Array,
    source_labels: jax.Array,
    target_pseudo_labels: jax.Array | None,
    target_confidence: jax.Array | None,
    *,
    num_classes: int,
    num_queries: int,
    class_balanced_queries: bool,
    num_negatives: int,
    domain_equalised_negatives: bool,
    unreliable_fraction: float,
    loss: str,
    key_domain: str = "source",
) -> PullSamples:
    """All random draws of the pulling loss, from (B, h, w) label maps only (features are not needed)."""
    query_key, negative_key = jax.random.split(key)
    source_labels = source_labels.reshape(-1)
    has_target = target_pseudo_labels is not None
    if has_target:
        target_pseudo_labels = target_pseudo_labels.reshape(-1)
        target_confidence = jax.lax.stop_gradient(target_confidence).reshape(-1)
    positive_labels = target_pseudo_labels if key_domain == "target" else source_labels
    has_positive = jnp.bincount(
        jnp.where(_is_class(positive_labels, num_classes), positive_labels, num_classes), length=num_classes + 1
    )[:num_classes] > 0
    queries = sample_queries(
        query_key,
        query_labels.reshape(-1),
        has_positive,
        num_classes=num_classes,
        num_queries=num_queries,
        class_balanced=class_balanced_queries,
    )
    threshold = jnp.zeros((), jnp.float32)
    target_negative_labels = None
    if has_target:
        target_negative_labels, threshold = unreliable_labels(
            target_pseudo_labels, target_confidence, unreliable_fraction=unreliable_fraction, num_classes=num_classes
        )
    negatives = None
    if loss == "infonce":
        negatives = sample_negatives(
            negative_key,
            queries.class_id,
            source_labels,
            target_negative_labels,
            num_classes=num_classes,
            num_negatives=num_negatives,
            domain_equalised=domain_equalised_negatives,
        )
    return PullSamples(queries, negatives, threshold)


def pulling_loss(
    key: jax.Array,
    query_features: jax.Array,
    query_labels: jax.Array,
    source_key_features: jax.Array,
    source_labels: jax.Array,
    target_key_features: jax.Array | None,
    target_pseudo_labels: jax.Array | None,
    target_confidence: jax.Array | None,
    *,
    num_classes: int,
    num_queries: int,
    class_balanced_queries: bool,
    num_negatives: int,
    domain_equalised_negatives: bool,
    unreliable_fraction: float,
    dynamic_reweighting: bool,
    reweight_scale: float,
    loss: str,
    temperature: float,
    key_domain: str = "source",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_pull and logging scalars. Features (B, h, w, D), maps (B, h, w), all on one feature grid.

    Gradients reach `query_features` only. Without target data (domain generalisation)
    pass None for the three target inputs, with DENPS and DRW off.
    """
    has_target = target_key_features is not None
    check_options(loss, key_domain, has_target, domain_equalised_negatives, dynamic_reweighting)
    if query_features.shape[:-1] != query_labels.shape or source_key_features.shape[:-1] != source_labels.shape:
        raise ValueError(
            f"pulling_loss: features {query_features.shape} / {source_key_features.shape} do not match label "
            f"maps {query_labels.shape} / {source_labels.shape} (downsample labels to the feature grid)"
        )
    samples = draw_pull_samples(
        key,
        query_labels,
        source_labels,
        target_pseudo_labels,
        target_confidence,
        num_classes=num_classes,
        num_queries=num_queries,
        class_balanced_queries=class_balanced_queries,
        num_negatives=num_negatives,
        domain_equalised_negatives=domain_equalised_negatives,
        unreliable_fraction=unreliable_fraction,
        loss=loss,
        key_domain=key_domain,
    )
    dim = query_features.shape[-1]
    source_keys = l2_normalize(jax.lax.stop_gradient(source_key_features).reshape(-1, dim))
    source_labels = source_labels.reshape(-1)
    if has_target:
        target_keys = l2_normalize(jax.lax.stop_gradient(target_key_features).reshape(-1, dim))
        target_pseudo_labels = target_pseudo_labels.reshape(-1)
        target_confidence = jax.lax.stop_gradient(target_confidence).reshape(-1)
    if key_domain == "target":
        prototypes, _ = class_prototypes(target_keys, target_pseudo_labels, num_classes)
    else:
        prototypes, _ = class_prototypes(source_keys, source_labels, num_classes)

    queries = samples.queries
    query_vectors = l2_normalize(query_features.reshape(-1, dim)[queries.pixel])
    positives = prototypes[queries.class_id]
    negatives = negative_valid = None
    aux = {}
    if samples.negatives is not None:
        all_keys = jnp.concatenate([source_keys, target_keys], axis=0) if has_target else source_keys
        negatives = all_keys[samples.negatives.index]  # (Q, M, D): the one big gather
        negative_valid = samples.negatives.valid & queries.valid[:, None]
        negative_similarity = jnp.einsum("qd,qmd->qm", query_vectors, negatives, precision=_HIGHEST)
        aux["negative_similarity"] = jnp.sum(jnp.where(negative_valid, negative_similarity, 0.0)) / jnp.maximum(
            jnp.sum(negative_valid), 1
        )
    losses = per_query_loss(
        query_vectors, positives, negatives, negative_valid, loss=loss, temperature=temperature
    )

    present = present_classes(queries.class_id, queries.valid, num_classes)
    if dynamic_reweighting:
        weights = class_weights(
            target_pseudo_labels, target_confidence, present, num_classes=num_classes, scale=reweight_scale
        )
    else:
        weights = present.astype(jnp.float32)
    value = combine(losses, queries.class_id, queries.valid, weights, num_classes)

    num_valid = jnp.sum(queries.valid)
    positive_similarity = jnp.sum(jnp.where(queries.valid, jnp.sum(query_vectors * positives, axis=-1), 0.0))
    aux.update(
        classes_present=jnp.sum(present).astype(jnp.float32),
        num_queries=num_valid.astype(jnp.float32),
        positive_similarity=jax.lax.stop_gradient(positive_similarity / jnp.maximum(num_valid, 1)),
        unreliable_threshold=samples.unreliable_threshold,
    )
    aux = {name: jax.lax.stop_gradient(value_) for name, value_ in aux.items()}
    return value, aux


def pulling_loss_options(config: ml_collections.ConfigDict) -> dict:
    """Keyword arguments of `pulling_loss` from a run config (`config.pull`, `config.model.num_classes`)."""
    pull = config.pull
    return dict(
        num_classes=config.model.num_classes,
        num_queries=pull.num_queries,
        class_balanced_queries=pull.class_balanced_queries,
        num_negatives=pull.num_negatives,
        domain_equalised_negatives=pull.domain_equalised_negatives,
        unreliable_fraction=pull.unreliable_fraction,
        dynamic_reweighting=pull.dynamic_reweighting,
        reweight_scale=pull.reweight_scale,
        loss=pull.loss,
        temperature=pull.temperature,
        key_domain=pull.key_domain,
    )

