"""The T2S-DA pulling loss (method.md 5.2-5.7 and 5.9; paper sections 3.3-3.5).

Queries are student projector features of the pseudo-target image at pixels of class c
(labels: the source labels); each is pulled to its positive key, the source prototype
of class c (mean of the teacher's L2-normalised source features of class c,
re-normalised), and, for InfoNCE, pushed from M negatives: teacher source features of
other classes and *unreliable* teacher target features (confidence below the
alpha-quantile of the target confidence) pseudo-labelled as another class.

Sampling groups. The batch is split into G contiguous groups of b = B / G images along
its leading axis (`num_groups`; default one per device of the mesh's 'data' axis, 1
without a mesh). Each group draws its queries and negatives from its own pixels only,
with its own key (`fold_in(key, group)`; with G = 1 the key itself): CBQS over the
group's class shares with base ceil(N / G) queries (N * b / B rounded up, so the batch
holds about N K_b queries whatever G: N counts per batch, as on one device), M negatives
per query, the unreliable threshold the alpha-quantile of the group's own target
confidences (logged: the groups' mean). Only per-class statistics cross groups (`jax.lax.psum` over the group
axes): prototype sums and counts (K x D, K), DRW confidence sums and counts (K) and the
per-class loss sums and query counts (K), so prototypes, DRW weights and L_pull are those
of the whole batch. Why: drawing from the whole batch on a mesh makes every device sort
all label maps (all-gathers) and gather negatives from all devices (an all-reduce of the
gathered keys, 7.4x the gradient at paper scale); per group nothing but the K x D sums
moves. The group function runs under `jax.vmap(axis_name=GROUP_AXIS)` over the groups
of one device inside `jax.shard_map` over 'data', so 1 device with G = 8 computes what 8
devices compute. With G = 1 this is the whole-batch loss of the paper.

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
  (valid labels of classes that have a positive key in the batch: with the default
  domains, every valid source pixel). [our reading of eq. 16]
* Negatives: M per query slot, M/2 from each domain with DENPS (the first M // 2
  columns source, the rest target), else M from the union of both candidate sets.
  A domain without candidates for class c leaves its columns masked.

Memory at paper scale (N = 128, K = 19, M = 1024, D = 256, float32, B = 2, 128^2 grid):
the Q = (N + 1) K = 2451 query slots' negative keys would be Q x M x D x 4 B = 2.6 GB
(kept for the backward pass). They are never materialised: the InfoNCE terms are
computed over chunks of `QUERY_CHUNK` = 128 query slots (`jax.lax.map`, rematerialised
in the backward pass), 128 x M x D x 4 B = 134 MB at a time. Compiled loss + gradient on
CPU (temporaries + arguments + outputs): 2.61 GiB when gathered at once, 0.34 GiB
chunked, of which 0.13 GiB are the three 32 MiB feature maps and the 32 MiB gradient;
per device on 8 devices (B = 16, G = 8) 0.32 GiB. Gradients reach the queries only.
MSE needs no negatives and draws none.

A class contributes only if it has query slots *and* a positive key ("present");
L_pull = sum_c w_c L_c / sum_c w_c over present classes, L_c the mean loss of its
queries (all groups'), w_c = 1 or, with dynamic re-weighting (DRW), (1 - conf_c)^s
normalised to mean 1 over present classes, conf_c the mean teacher confidence of target
pixels pseudo-labelled c (0 when there are none: such a class gets the largest weight)
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

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec

from t2s_jax.classes import IGNORE_INDEX
from t2s_jax.parallel import DATA_AXIS

LOSSES = ("infonce", "mse")
KEY_DOMAINS = ("source", "target")
_HIGHEST = jax.lax.Precision.HIGHEST
GROUP_AXIS = "pull_groups"  # vmap axis of the sampling groups of one device
QUERY_CHUNK = 128  # query slots whose negatives are gathered at once, per device (memory vs loop steps)


class QuerySample(NamedTuple):
    """Query slots: flat pixel index into the group's query grid (b*h*w), class, and whether the slot is used."""

    pixel: jax.Array  # (Q,) int32
    class_id: jax.Array  # (Q,) int32
    valid: jax.Array  # (Q,) bool


class NegativeSample(NamedTuple):
    """Per query slot M negatives: flat index into [source keys; target keys], and validity."""

    index: jax.Array  # (Q, M) int32 into the group's pixels; < b*h*w: source, else target (index - b*h*w)
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

    The quantile is over the given (a sampling group's) valid target pixels, linearly interpolated like
    `np.percentile(C, 100 * alpha)` (paper eq. 14).
    """
    is_class = _is_class(pseudo_labels, num_classes)
    threshold = jnp.nanquantile(jnp.where(is_class, confidence, jnp.nan), unreliable_fraction)
    threshold = jnp.where(jnp.any(is_class), threshold, 0.0)
    unreliable = is_class & (confidence < threshold)
    return jnp.where(unreliable, pseudo_labels, IGNORE_INDEX), threshold


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


def check_options(loss: str, key_domain: str, has_target: bool, domain_equalised: bool, reweighting: bool) -> None:
    """A ValueError naming the pull.* option that is unknown or needs target data it does not have."""
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
    has_positive: jax.Array,
    *,
    num_classes: int,
    num_queries: int,
    class_balanced_queries: bool,
    num_negatives: int,
    domain_equalised_negatives: bool,
    unreliable_fraction: float,
    loss: str,
) -> PullSamples:
    """All random draws of one sampling group, from its (b, h, w) label maps only (features are not needed).

    `has_positive` (K,) says which classes have a positive key in the whole batch: only
    those are query candidates.
    """
    query_key, negative_key = jax.random.split(key)
    source_labels = source_labels.reshape(-1)
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
    if target_pseudo_labels is not None:
        target_negative_labels, threshold = unreliable_labels(
            target_pseudo_labels.reshape(-1),
            jax.lax.stop_gradient(target_confidence).reshape(-1),
            unreliable_fraction=unreliable_fraction,
            num_classes=num_classes,
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


def _psum(x, axis_names: tuple[str, ...]):
    for axis_name in axis_names:  # one at a time: a vmap axis and a shard_map axis do not mix in one psum
        x = jax.lax.psum(x, axis_name)
    return x


def _group_pulling_loss(
    key: jax.Array,
    arrays: dict[str, jax.Array],
    *,
    axis_names: tuple[str, ...],
    num_groups: int,
    num_classes: int,
    num_queries: int,
    num_negatives: int,
    class_balanced_queries: bool,
    domain_equalised_negatives: bool,
    unreliable_fraction: float,
    dynamic_reweighting: bool,
    reweight_scale: float,
    loss: str,
    temperature: float,
    key_domain: str,
    query_chunk_size: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of one sampling group; per-class statistics are summed over the groups on `axis_names`."""
    has_target = "target_key_features" in arrays
    dim = arrays["query_features"].shape[-1]
    source_keys = l2_normalize(jax.lax.stop_gradient(arrays["source_key_features"]).reshape(-1, dim))
    source_labels = arrays["source_labels"].reshape(-1)
    target_keys = target_labels = target_confidence = None
    if has_target:
        target_keys = l2_normalize(jax.lax.stop_gradient(arrays["target_key_features"]).reshape(-1, dim))
        target_labels = arrays["target_pseudo_labels"].reshape(-1)
        target_confidence = jax.lax.stop_gradient(arrays["target_confidence"]).reshape(-1)
    if key_domain == "target":
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
        num_queries=num_queries,
        class_balanced_queries=class_balanced_queries,
        num_negatives=num_negatives,
        domain_equalised_negatives=domain_equalised_negatives,
        unreliable_fraction=unreliable_fraction,
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
            query_vectors, positives, all_keys, negatives, temperature=temperature, chunk_size=query_chunk_size
        )
        sums["num_negatives"] = jnp.sum(negatives.valid).astype(jnp.float32)
    losses = jnp.where(queries.valid, losses, 0.0)
    used_class = jnp.where(queries.valid, queries.class_id, num_classes)  # unused slots: no class
    sums["class_loss"], sums["class_queries"] = class_sums(losses, used_class, num_classes)
    positive_similarity = jnp.sum(query_vectors * positives, axis=-1)
    sums["positive_similarity"] = jnp.sum(jnp.where(queries.valid, positive_similarity, 0.0))
    sums["unreliable_threshold"] = samples.unreliable_threshold
    if dynamic_reweighting:
        sums["confidence"], sums["target_pixels"] = class_sums(target_confidence, target_labels, num_classes)
    sums = _psum(sums, axis_names)

    present = sums["class_queries"] > 0
    if dynamic_reweighting:
        weights = drw_weights(sums["confidence"], sums["target_pixels"], present, scale=reweight_scale)
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


def _num_groups(batch_size: int, mesh: jax.sharding.Mesh | None, num_groups: int | None) -> tuple[int, int]:
    """(G, devices on 'data'); G defaults to one group per device."""
    num_devices = 1 if mesh is None else mesh.shape[DATA_AXIS]
    groups = num_devices if num_groups is None else num_groups
    if groups < 1 or batch_size % groups:
        raise ValueError(
            f"pull.num_groups={groups} must divide the batch of {batch_size} images (contiguous sampling groups)"
        )
    if groups > 1 and groups % num_devices:
        raise ValueError(
            f"pull.num_groups={groups} must be 1 or a multiple of the {num_devices} devices on the mesh's "
            f"'{DATA_AXIS}' axis (0 in the config: one group per device)"
        )
    return groups, num_devices


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
    mesh: jax.sharding.Mesh | None = None,
    num_groups: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_pull and logging scalars. Features (B, h, w, D), maps (B, h, w), all on one feature grid.

    Gradients reach `query_features` only. Without target data (domain generalisation)
    pass None for the three target inputs, with DENPS and DRW off. `num_groups` sampling
    groups (None: one per device of `mesh`'s 'data' axis; 1 without a mesh) draw from
    their own images; on `mesh` each device runs its groups (see the module docstring).
    """
    has_target = target_key_features is not None
    check_options(loss, key_domain, has_target, domain_equalised_negatives, dynamic_reweighting)
    if query_features.shape[:-1] != query_labels.shape or source_key_features.shape[:-1] != source_labels.shape:
        raise ValueError(
            f"pulling_loss: features {query_features.shape} / {source_key_features.shape} do not match label "
            f"maps {query_labels.shape} / {source_labels.shape} (downsample labels to the feature grid)"
        )
    arrays = dict(
        query_features=query_features,
        query_labels=query_labels,
        source_key_features=source_key_features,
        source_labels=source_labels,
        target_key_features=target_key_features,
        target_pseudo_labels=target_pseudo_labels,
        target_confidence=target_confidence,
    )
    arrays = {name: array for name, array in arrays.items() if array is not None}
    batch_size = query_labels.shape[0]
    if any(array.shape[0] != batch_size for array in arrays.values()):
        shapes = {name: array.shape for name, array in arrays.items()}
        raise ValueError(f"pulling_loss: every input needs the same batch (leading) size, got {shapes}")
    groups, num_devices = _num_groups(batch_size, mesh, num_groups)
    group_loss = functools.partial(
        _group_pulling_loss,
        num_groups=groups,
        num_classes=num_classes,
        num_queries=math.ceil(num_queries / groups),  # N b / B, rounded up
        num_negatives=num_negatives,
        class_balanced_queries=class_balanced_queries,
        domain_equalised_negatives=domain_equalised_negatives,
        unreliable_fraction=unreliable_fraction,
        dynamic_reweighting=dynamic_reweighting,
        reweight_scale=reweight_scale,
        loss=loss,
        temperature=temperature,
        key_domain=key_domain,
    )
    if groups == 1:  # the whole batch: the paper's sampling, today's draws
        return group_loss(key, arrays, axis_names=(), query_chunk_size=QUERY_CHUNK)
    local_groups = groups // num_devices
    on_mesh = num_devices > 1
    axis_names = (GROUP_AXIS, DATA_AXIS) if on_mesh else (GROUP_AXIS,)
    # The chunk bounds a device's gathered negatives: its groups' chunks are vmapped together.
    group_loss = functools.partial(
        group_loss, axis_names=axis_names, query_chunk_size=max(1, QUERY_CHUNK // local_groups)
    )

    def device_loss(key, arrays):
        first_group = jax.lax.axis_index(DATA_AXIS) * local_groups if on_mesh else 0
        group_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, first_group + jnp.arange(local_groups))
        by_group = jax.tree.map(lambda x: x.reshape(local_groups, x.shape[0] // local_groups, *x.shape[1:]), arrays)
        outputs = jax.vmap(group_loss, axis_name=GROUP_AXIS)(group_keys, by_group)
        return jax.tree.map(lambda x: x[0], outputs)  # summed over all groups: the same in each

    if not on_mesh:
        return device_loss(key, arrays)
    # check_vma=False: jax 0.10 cannot psum over a vmap axis inside a checked shard_map (an
    # assertion in pvary). The outputs are psums over every group, so replicated as declared.
    return jax.shard_map(
        device_loss,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
        out_specs=PartitionSpec(),
        check_vma=False,
    )(key, arrays)


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
        num_groups=pull.num_groups or None,
    )
