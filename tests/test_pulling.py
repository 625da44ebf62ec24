"""The pulling loss against a plain loop-over-queries NumPy reference, and its sampling formulas."""
import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2s_jax import config as config_lib, parallel
from t2s_jax.uda import pulling

B, H, W, D, K = 2, 8, 8, 16, 5
P = B * H * W
KNOBS = dict(
    num_classes=K,
    num_queries=8,
    class_balanced_queries=True,
    num_negatives=16,
    domain_equalised_negatives=True,
    unreliable_fraction=0.5,
    dynamic_reweighting=True,
    reweight_scale=0.5,
    loss="infonce",
    temperature=0.2,
)
# One compile per set of knobs (op-by-op dispatch of the loss is slower than compiling it).
_jitted_loss = jax.jit(pulling.pulling_loss, static_argnames=("options", "mesh"))


def _pulling_loss(key, *arrays, mesh=None, **knobs):
    return _jitted_loss(pulling.PullOptions(**knobs), key, *arrays, mesh=mesh)
SAMPLE_KNOBS = (
    "num_classes",
    "num_queries",
    "class_balanced_queries",
    "num_negatives",
    "domain_equalised_negatives",
    "unreliable_fraction",
    "loss",
)


def _inputs(seed, source_classes=(0, 1, 2, 3), target_classes=(0, 1, 2, 3, 4), ignore=0.1, batch=B):
    """Random features; unbalanced source labels with some 255; target pseudo-labels and confidences."""
    rng = np.random.default_rng(seed)
    grid = (batch, H, W)
    weights = np.linspace(3.0, 1.0, len(source_classes))
    source_labels = rng.choice(source_classes, size=grid, p=weights / weights.sum())
    source_labels = np.where(rng.random(grid) < ignore, 255, source_labels).astype(np.int32)
    return dict(
        query_features=rng.normal(size=(*grid, D)).astype(np.float32),
        query_labels=source_labels,
        source_key_features=rng.normal(size=(*grid, D)).astype(np.float32),
        source_labels=source_labels,
        target_key_features=rng.normal(size=(*grid, D)).astype(np.float32),
        target_pseudo_labels=rng.choice(target_classes, size=grid).astype(np.int32),
        target_confidence=rng.uniform(0.2, 1.0, size=grid).astype(np.float32),
    )


_draw_pull_samples = jax.jit(pulling.draw_pull_samples, static_argnames=SAMPLE_KNOBS)


def _has_positive(inputs, knobs):
    """Classes with a positive key anywhere in the batch (NumPy)."""
    key_labels = inputs["target_pseudo_labels"] if knobs.get("key_domain") == "target" else inputs["source_labels"]
    return np.isin(np.arange(K), key_labels)


def _draw(key, inputs, knobs, images=slice(None), num_queries=None):
    """The samples of the group holding `images`, with base `num_queries` (default: knobs')."""
    group = {name: None if value is None else value[images] for name, value in inputs.items()}
    knobs = {**knobs, "num_queries": knobs["num_queries"] if num_queries is None else num_queries}
    return _draw_pull_samples(
        key,
        group["query_labels"],
        group["source_labels"],
        group["target_pseudo_labels"],
        group["target_confidence"],
        _has_positive(inputs, knobs),
        **{name: knobs[name] for name in SAMPLE_KNOBS if name in knobs},
    )


def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _reference_weights(classes, pseudo_labels, confidence, scale):
    raw = {}
    for c in classes:
        pixels = pseudo_labels == c
        raw[c] = (1.0 - (confidence[pixels].mean() if pixels.any() else 0.0)) ** scale
    mean = np.mean(list(raw.values()))
    return {c: value / mean for c, value in raw.items()}


def _reference_loss(groups, inputs, knobs):
    """float64, one query at a time, from the same sampled indices.

    `groups`: (samples, images) per sampling group; a group's indices point into the
    pixels of its `images` (a slice of the batch). Prototypes and DRW use the whole batch.
    """
    images_of = lambda name, images: np.asarray(inputs[name][images], np.float64).reshape(-1, D)
    has_target = inputs["target_key_features"] is not None
    source_labels = inputs["source_labels"].reshape(-1)
    if has_target:
        pseudo = inputs["target_pseudo_labels"].reshape(-1)
        confidence = inputs["target_confidence"].reshape(-1).astype(np.float64)
    if knobs.get("key_domain", "source") == "target":
        key_features, key_labels = _normalize(images_of("target_key_features", slice(None))), pseudo
    else:
        key_features, key_labels = _normalize(images_of("source_key_features", slice(None))), source_labels
    prototypes = {c: _normalize(key_features[key_labels == c].mean(0)) for c in range(K) if (key_labels == c).any()}
    per_class = collections.defaultdict(list)
    for samples, images in groups:
        query_features = images_of("query_features", images)
        all_keys = _normalize(images_of("source_key_features", images))
        if has_target:
            all_keys = np.concatenate([all_keys, _normalize(images_of("target_key_features", images))])
        queries = samples.queries
        for j in range(queries.pixel.shape[0]):
            if not queries.valid[j]:
                continue
            c = int(queries.class_id[j])
            query = _normalize(query_features[int(queries.pixel[j])])
            positive = prototypes[c]
            if knobs["loss"] == "mse":
                loss = np.sum((query - positive) ** 2)
            else:
                negatives = [all_keys[i] for i, ok in zip(samples.negatives.index[j], samples.negatives.valid[j]) if ok]
                logits = np.array([query @ positive] + [query @ key for key in negatives]) / knobs["temperature"]
                loss = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[0]
            per_class[c].append(loss)
    if not per_class:
        return 0.0
    classes = sorted(per_class)
    if knobs["dynamic_reweighting"]:
        weights = _reference_weights(classes, pseudo, confidence, knobs["reweight_scale"])
    else:
        weights = {c: 1.0 for c in classes}
    return sum(weights[c] * np.mean(per_class[c]) for c in classes) / sum(weights[c] for c in classes)


CASES = {
    "paper_default": {},
    "mse": dict(loss="mse"),
    "switches_off": dict(class_balanced_queries=False, domain_equalised_negatives=False, dynamic_reweighting=False),
    "target_keys": dict(key_domain="target", unreliable_fraction=0.3),
    "no_target": dict(domain_equalised_negatives=False, dynamic_reweighting=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_loop_reference(case):
    knobs = {**KNOBS, **CASES[case]}
    inputs = _inputs(1)
    if case == "no_target":
        inputs.update(target_key_features=None, target_pseudo_labels=None, target_confidence=None)
    key = jax.random.key(3)
    loss, aux = _pulling_loss(key, *inputs.values(), **knobs)
    samples = jax.tree.map(np.asarray, _draw(key, inputs, knobs))
    reference = _reference_loss([(samples, slice(None))], inputs, knobs)
    np.testing.assert_allclose(float(loss), reference, rtol=2e-5)
    assert reference > 0.01
    assert int(aux["classes_present"]) == len(set(samples.queries.class_id[samples.queries.valid]))
    assert int(aux["num_queries"]) == samples.queries.valid.sum()


def _numpy_cbqs(labels, num_queries):
    counts = np.array([(labels == c).sum() for c in range(K)])
    present = counts > 0
    return np.where(present, np.ceil(num_queries * present.sum() * counts / counts.sum() - 1e-9), 0).astype(int)


@pytest.mark.parametrize("class_balanced", [True, False])
def test_query_counts_follow_cbqs_and_labels(class_balanced):
    inputs = _inputs(2)
    knobs = {**KNOBS, "class_balanced_queries": class_balanced}
    queries = jax.tree.map(np.asarray, _draw(jax.random.key(0), inputs, knobs).queries)
    labels = inputs["query_labels"].reshape(-1)
    expected = _numpy_cbqs(labels, 8) if class_balanced else np.where(np.isin(range(K), labels), 8, 0)
    counts = np.bincount(queries.class_id[queries.valid], minlength=K)
    np.testing.assert_array_equal(counts, expected)
    assert expected[4] == 0 and len(set(expected[:4])) > 1 if class_balanced else True
    assert queries.valid.shape[0] == pulling.query_budget(K, 8, class_balanced) >= expected.sum()
    np.testing.assert_array_equal(labels[queries.pixel[queries.valid]], queries.class_id[queries.valid])


def test_queries_cover_each_class_uniformly():
    inputs = _inputs(3)
    knobs = {**KNOBS, "class_balanced_queries": False, "num_queries": 512, "loss": "mse"}
    queries = jax.tree.map(np.asarray, _draw(jax.random.key(1), inputs, knobs).queries)
    labels = inputs["query_labels"].reshape(-1)
    for c in range(4):
        drawn = queries.pixel[queries.valid & (queries.class_id == c)]
        assert set(drawn) == set(np.flatnonzero(labels == c))


@pytest.mark.parametrize("domain_equalised", [True, False])
def test_negatives_come_from_the_right_candidates(domain_equalised):
    inputs = _inputs(4)
    knobs = {**KNOBS, "domain_equalised_negatives": domain_equalised, "num_negatives": 512}
    samples = jax.tree.map(np.asarray, _draw(jax.random.key(2), inputs, knobs))
    source_labels = inputs["source_labels"].reshape(-1)
    pseudo = inputs["target_pseudo_labels"].reshape(-1)
    confidence = inputs["target_confidence"].reshape(-1)
    threshold = np.percentile(confidence, 50)
    np.testing.assert_allclose(samples.unreliable_threshold, threshold, rtol=1e-6)
    queries, negatives = samples.queries, samples.negatives
    assert negatives.valid[queries.valid].all()
    for c in range(4):
        rows = negatives.index[queries.valid & (queries.class_id == c)]
        source_candidates = set(np.flatnonzero((source_labels != c) & (source_labels != 255)))
        target_candidates = set(P + np.flatnonzero((pseudo != c) & (confidence < threshold)))
        if domain_equalised:  # DENPS: M/2 source columns, then M/2 target columns
            assert set(rows[:, :256].ravel()) == source_candidates
            assert set(rows[:, 256:].ravel()) == target_candidates
        else:  # the union, each domain drawn in proportion to its candidate count
            assert set(rows.ravel()) == source_candidates | target_candidates
            share = np.mean(rows < P)
            expected = len(source_candidates) / (len(source_candidates) + len(target_candidates))
            assert abs(share - expected) < 0.05


def test_drw_weights_follow_formula():
    rng = np.random.default_rng(5)
    pseudo = rng.choice([0, 1, 2, 4], size=P).astype(np.int32)  # class 3 never predicted
    confidence = rng.uniform(0.3, 1.0, size=P).astype(np.float32)
    present = np.array([True, True, False, True, True])
    confidence_sum, count = pulling.class_sums(confidence, pseudo, K)
    np.testing.assert_array_equal(count, np.bincount(pseudo, minlength=K))
    weights = np.asarray(pulling.drw_weights(confidence_sum, count, present, scale=0.5))
    expected = _reference_weights([0, 1, 3, 4], pseudo, confidence.astype(np.float64), 0.5)
    np.testing.assert_allclose(weights, [expected[0], expected[1], 0.0, expected[3], expected[4]], rtol=1e-5)
    np.testing.assert_allclose(weights[present].mean(), 1.0, rtol=1e-6)
    assert weights[3] == weights.max()  # no target pixel of class 3: confidence 0, the largest weight


def test_class_without_positive_or_candidates_contributes_zero():
    # Class 4 is in the query labels but not the (source) key labels: it has no positive key.
    inputs = _inputs(6)
    query_labels = inputs["query_labels"].copy()
    query_labels[0, :2] = 4
    inputs["query_labels"] = query_labels
    key = jax.random.key(4)
    loss, aux = _pulling_loss(key, *inputs.values(), **KNOBS)
    samples = jax.tree.map(np.asarray, _draw(key, inputs, KNOBS))
    assert not (samples.queries.valid & (samples.queries.class_id == 4)).any()
    assert int(aux["classes_present"]) == 4
    np.testing.assert_allclose(float(loss), _reference_loss([(samples, slice(None))], inputs, KNOBS), rtol=2e-5)


def _loss_and_grads(inputs, knobs, key=jax.random.key(0)):
    def loss_fn(query_features, source_key_features, target_key_features):
        args = dict(inputs, query_features=query_features, source_key_features=source_key_features)
        args["target_key_features"] = target_key_features
        return _pulling_loss(key, *args.values(), **knobs)[0]

    features = (inputs["query_features"], inputs["source_key_features"], inputs["target_key_features"])
    return jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(*features)


def test_no_candidates_anywhere_gives_exact_zero_and_finite_gradients():
    inputs = _inputs(7)
    inputs["query_labels"] = np.full((B, H, W), 255, np.int32)
    loss, grads = _loss_and_grads(inputs, KNOBS)
    assert float(loss) == 0.0
    for grad in grads:
        assert np.all(np.asarray(grad) == 0.0)
    # One class everywhere and all unreliable target pixels of it: no negatives, InfoNCE is exactly 0.
    inputs = _inputs(7, source_classes=(2,), target_classes=(2,), ignore=0.0)
    loss, grads = _loss_and_grads(inputs, KNOBS)
    assert float(loss) == 0.0 and all(np.isfinite(np.asarray(grad)).all() for grad in grads)


@pytest.mark.parametrize("loss_name", ["infonce", "mse"])
def test_gradients_reach_queries_only(loss_name):
    inputs = _inputs(8)
    knobs = {**KNOBS, "loss": loss_name}
    _, (query_grad, source_grad, target_grad) = _loss_and_grads(inputs, knobs)
    assert np.all(np.asarray(source_grad) == 0.0) and np.all(np.asarray(target_grad) == 0.0)
    query_grad = np.asarray(query_grad).reshape(P, D)
    assert np.isfinite(query_grad).all() and np.abs(query_grad).max() > 0
    queries = _draw(jax.random.key(0), inputs, knobs).queries
    sampled = np.zeros(P, bool)
    sampled[np.asarray(queries.pixel)[np.asarray(queries.valid)]] = True
    assert np.all(query_grad[~sampled] == 0.0) and np.all(np.abs(query_grad[sampled]).sum(-1) > 0)


def test_compiles_once_whatever_classes_are_present():
    traces = []

    def loss_fn(key, *arrays):
        traces.append(1)  # runs once per trace
        return pulling.pulling_loss(pulling.PullOptions(**KNOBS), key, *arrays)

    jitted = jax.jit(loss_fn)
    batches = [
        _inputs(9),
        _inputs(10, source_classes=(3,), target_classes=(0, 1)),
        _inputs(11, source_classes=(0, 4), ignore=0.9),
        {**_inputs(12), "query_labels": np.full((B, H, W), 255, np.int32)},
    ]
    values = [jitted(jax.random.key(i), *batch.values()) for i, batch in enumerate(batches)]
    assert len(traces) == 1
    present = [len(set(batch["query_labels"].ravel()) - {255}) for batch in batches]
    assert [int(aux["classes_present"]) for _, aux in values] == present and present[-1] == 0
    assert all(np.isfinite(float(loss)) for loss, _ in values)


def test_downsample_labels_nearest():
    labels = np.arange(2 * 8 * 12).reshape(2, 8, 12)
    out = np.asarray(pulling.downsample_labels_nearest(jnp.asarray(labels), (2, 3)))
    np.testing.assert_array_equal(out, labels[:, [2, 6]][:, :, [2, 6, 10]])  # the pixel right of each cell centre
    np.testing.assert_array_equal(np.asarray(pulling.downsample_labels_nearest(jnp.asarray(labels), (8, 12))), labels)
    odd = np.asarray(pulling.downsample_labels_nearest(jnp.asarray(labels), (3, 5)))
    expected = jax.image.resize(jnp.asarray(labels, jnp.float32), (2, 3, 5), "nearest")
    np.testing.assert_array_equal(odd, np.asarray(expected).astype(int))


def test_options_and_errors():
    config = config_lib.default_config()
    options = pulling.PullOptions.from_config(config)
    from_pull = {field.name for field in dataclasses.fields(options)} - {"num_classes", "num_groups"}
    assert all(getattr(options, name) == config.pull[name] for name in from_pull)
    assert (options.num_classes, options.num_groups) == (config.model.num_classes, None)  # pull.num_groups=0
    with pytest.raises(ValueError, match="domain_equalised_negatives needs target data"):
        pulling.PullOptions(**KNOBS).check(has_target=False)
    with pytest.raises(ValueError, match="unknown pull.loss"):
        pulling.PullOptions(**{**KNOBS, "loss": "l1"}).check(has_target=True)
    with pytest.raises(ValueError, match="pull.num_groups=3 must divide the batch of 2 images"):
        _pulling_loss(jax.random.key(0), *_inputs(13).values(), **KNOBS, num_groups=3)


@pytest.mark.parametrize("case", ["paper_default", "no_target"])
def test_sampling_groups_match_numpy_reference(case):
    """G = 2 groups of one image on one device: each draws from its own image with base
    ceil(N / G) queries and key fold_in(key, g); prototypes, DRW and L_c are the batch's."""
    knobs = {**KNOBS, **CASES[case]}
    inputs = _inputs(14)
    if case == "no_target":
        inputs.update(target_key_features=None, target_pseudo_labels=None, target_confidence=None)
    key = jax.random.key(5)
    loss, aux = _pulling_loss(key, *inputs.values(), **knobs, num_groups=2)
    images = [slice(g, g + 1) for g in range(2)]
    groups = [
        (jax.tree.map(np.asarray, _draw(jax.random.fold_in(key, g), inputs, knobs, images[g], 4)), images[g])
        for g in range(2)
    ]
    reference = _reference_loss(groups, inputs, knobs)
    np.testing.assert_allclose(float(loss), reference, rtol=2e-5)
    whole_batch = _reference_loss([(jax.tree.map(np.asarray, _draw(key, inputs, knobs)), slice(None))], inputs, knobs)
    assert abs(reference - whole_batch) > 1e-3  # other draws: the groups are not the whole-batch sampling
    assert int(aux["num_queries"]) == sum(samples.queries.valid.sum() for samples, _ in groups)
    if case == "paper_default":  # the mean of the groups' own confidence quantiles
        thresholds = [np.percentile(inputs["target_confidence"][g], 50) for g in range(2)]
        np.testing.assert_allclose(float(aux["unreliable_threshold"]), np.mean(thresholds), rtol=1e-6)


def test_eight_devices_equal_one_device_with_eight_groups():
    """G = 8: vmapped groups on 1 device = shard_map on 8 devices = 2 vmapped groups on each of 4."""
    inputs = _inputs(15, batch=8)
    key = jax.random.key(6)

    def loss_and_grad(mesh, num_groups):
        def loss_fn(query_features, *rest):
            options = pulling.PullOptions(**KNOBS, num_groups=num_groups)
            return pulling.pulling_loss(options, key, query_features, *rest, mesh=mesh)

        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(*inputs.values())

    (loss_1, aux_1), grad_1 = loss_and_grad(None, 8)
    for mesh in (parallel.make_mesh(8), parallel.make_mesh(4)):
        (loss_n, aux_n), grad_n = loss_and_grad(mesh, None if mesh.size == 8 else 8)
        np.testing.assert_allclose(float(loss_n), float(loss_1), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(grad_n), np.asarray(grad_1), rtol=1e-4, atol=1e-8)
        for name in aux_1:
            np.testing.assert_allclose(float(aux_n[name]), float(aux_1[name]), rtol=1e-6, err_msg=name)
    assert float(loss_1) > 0.01 and np.abs(np.asarray(grad_1)).max() > 0


def test_infonce_chunks_match_formula():
    """Chunks of 7 query slots (the last one padded) against a float64 loop; same gradient as one chunk."""
    rng = np.random.default_rng(16)
    num_queries, num_negatives, num_keys = 45, 12, 64
    queries = _normalize(rng.normal(size=(num_queries, D))).astype(np.float32)
    positives = _normalize(rng.normal(size=(num_queries, D))).astype(np.float32)
    keys = jnp.asarray(_normalize(rng.normal(size=(num_keys, D))), jnp.float32)
    index = rng.integers(0, num_keys, size=(num_queries, num_negatives)).astype(np.int32)
    valid = rng.random((num_queries, num_negatives)) < 0.7
    valid[3] = False  # a query without negatives: loss exactly 0
    negatives = pulling.NegativeSample(index, valid)

    def losses_fn(query_vectors, chunk_size):
        return pulling.infonce_losses(
            query_vectors, positives, keys, negatives, temperature=0.2, chunk_size=chunk_size
        )

    losses, similarity_sum = jax.jit(losses_fn, static_argnums=1)(queries, 7)
    q64, k64, p64 = (np.asarray(x, np.float64) for x in (queries, keys, positives))
    for j in range(num_queries):
        logits = np.concatenate([[q64[j] @ p64[j]], k64[index[j][valid[j]]] @ q64[j]]) / 0.2
        expected = np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[0]
        np.testing.assert_allclose(float(losses[j]), expected if valid[j].any() else 0.0, rtol=1e-5, atol=1e-6)
    assert float(losses[3]) == 0.0
    expected_sum = np.sum(np.where(valid, np.einsum("qd,qmd->qm", q64, k64[index]), 0.0))
    np.testing.assert_allclose(float(similarity_sum), expected_sum, rtol=1e-5)
    grads = [jax.jit(jax.grad(lambda q, c: jnp.sum(losses_fn(q, c)[0])), static_argnums=1)(queries, c) for c in (7, 45)]
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=1e-5, atol=1e-8)
