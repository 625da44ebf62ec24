"""The pulling loss's random draws: query slots and negatives, fixed-size, from label maps only
(see the package docstring for the candidate blocks and the slot budget)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from t2s_jax.classes import IGNORE_INDEX


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
