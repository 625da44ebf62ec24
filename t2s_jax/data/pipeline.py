"""The grain input pipeline: paired source/target training batches and evaluation batches.

Training, per domain: a `MapDataset` of example indices, shuffled (a new permutation
every epoch), sliced to this process's shard and repeated forever; or, for the source with rare
class sampling, an endless stream of (class, file) draws over the whole set. A random map
reads each example and applies the host transforms (resize to fit, crop, flip). The
domains are zipped, batched, and read with threads, optionally in worker processes.
Every random choice comes from grain's per-element generator, seeded from (seed,
process, domain), so batches are a pure function of the seed and the position: the
iterator state is that position, and `set_state` resumes at exactly the next batch.
"""

from __future__ import annotations

import dataclasses

import grain
import ml_collections
import numpy as np

from t2s_jax.classes import IGNORE_INDEX
from t2s_jax.data import transforms
from t2s_jax.data.rcs import RareClassSampler, make_rare_class_sampler
from t2s_jax.data.sources import Split, num_examples, open_split

# Threads per process (the main one, or each worker) that compute batches ahead, and how
# many finished batches they may hold. OpenCV decoding and resizing release the GIL.
_READ_THREADS = 2
_PREFETCH_BATCHES = 4


def _stream_seed(seed: int, process_index: int, stream: int) -> int:
    """A 32-bit seed per (run seed, process, stream): processes draw independent crops."""
    return int(np.random.SeedSequence([seed, process_index, stream]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class _TrainTransform:
    """Index (ignored under RCS) + rng -> {'image': (h, w, 3), 'label': (h, w)} crop."""

    split: Split
    resize_hw: tuple[int, int]
    crop_hw: tuple[int, int]
    cat_max_ratio: float  # 1.0 = plain random crop
    retries: int
    flip_prob: float
    rare_classes: RareClassSampler | None = None
    min_crop_pixels: int = 0

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rare_class = None
        if self.rare_classes is not None:
            rare_class, index = self.rare_classes.draw(rng)
        example = self.split.source[int(index)]
        image, label = example["image"], example["label"][..., 0]
        hw = transforms.fit_size(label.shape, self.resize_hw)
        image, label = transforms.resize_image(image, hw), transforms.resize_label(label, hw)
        image, label = transforms.pad_to(image, label, self.crop_hw)
        if rare_class is None:
            offset = transforms.cat_max_ratio_offset(
                rng, label, self.crop_hw, self.cat_max_ratio, self.retries
            )
        else:
            offset = transforms.rare_class_offset(
                rng, label, self.crop_hw, rare_class, self.min_crop_pixels, self.cat_max_ratio, self.retries
            )
        image, label = transforms.crop_and_flip(rng, image, label, offset, self.crop_hw, self.flip_prob)
        return {"image": image, "label": label}


def _domain_dataset(
    transform: _TrainTransform, *, seed: int, stream: int, process_index: int, process_count: int
) -> grain.MapDataset:
    positions = grain.MapDataset.range(len(transform.split))
    if transform.rare_classes is None:
        # One permutation per epoch, shared by the processes, each taking every n-th entry:
        # disjoint shards that together cover the split once per epoch.
        positions = positions.shuffle(seed=_stream_seed(seed, 0, stream))
    positions = positions[process_index::process_count].repeat()
    return positions.random_map(transform, seed=_stream_seed(seed, process_index + 1, stream))


@dataclasses.dataclass(frozen=True)
class _NameDomains:
    domains: tuple[str, ...]

    def __call__(self, examples) -> dict[str, np.ndarray]:
        return {f"{d}_{k}": v for d, example in zip(self.domains, examples) for k, v in example.items()}


def _per_process(global_batch: int, process_count: int, key: str) -> int:
    if global_batch % process_count:
        raise ValueError(f"data_config.{key}={global_batch} is not divisible by {process_count} processes")
    return global_batch // process_count


def _read(dataset: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    )
    if num_workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter_dataset


def make_train_dataset(
    data_config: ml_collections.ConfigDict, *, seed: int, process_index: int, process_count: int
) -> grain.IterDataset:
    """Batches of this process: source_image (b, h, w, 3) uint8, source_label (b, h, w)
    uint8 and, with a target, target_image / target_label; b = batch_size // process_count."""
    batch = _per_process(data_config.batch_size, process_count, "batch_size")
    crop_hw = tuple(data_config.crop_hw)
    source = open_split(data_config.source, data_config.source_split, data_config.data_dir)
    rare_classes = None
    if data_config.rcs.enabled:
        rcs = data_config.rcs
        rare_classes = make_rare_class_sampler(
            source.class_pixels, source.class_examples, rcs.temperature, rcs.min_pixels
        )
    transform = _TrainTransform(
        source,
        resize_hw=tuple(data_config.source_resize_hw),
        crop_hw=crop_hw,
        cat_max_ratio=data_config.cat_max_ratio,
        retries=data_config.crop_retries,
        flip_prob=data_config.flip_prob,
        rare_classes=rare_classes,
        min_crop_pixels=data_config.rcs.min_crop_pixels,
    )
    shard = dict(seed=seed, process_index=process_index, process_count=process_count)
    domains = {"source": _domain_dataset(transform, stream=0, **shard)}
    if data_config.target:
        target = open_split(data_config.target, data_config.target_split, data_config.data_dir)
        transform = _TrainTransform(
            target,
            resize_hw=tuple(data_config.target_resize_hw),
            crop_hw=crop_hw,
            cat_max_ratio=1.0,  # method.md: only source crops are redrawn
            retries=data_config.crop_retries,
            flip_prob=data_config.flip_prob,
        )
        domains["target"] = _domain_dataset(transform, stream=1, **shard)
    paired = grain.experimental.ZipMapDataset(list(domains.values())).map(_NameDomains(tuple(domains)))
    return _read(paired.batch(batch, drop_remainder=True), data_config.num_workers)


def make_train_iterator(
    data_config: ml_collections.ConfigDict, *, seed: int, process_index: int, process_count: int
) -> grain.DatasetIterator:
    """Endless iterator of training batches (see `make_train_dataset`) with
    get_state() / set_state() to resume at exactly the next batch."""
    return iter(
        make_train_dataset(data_config, seed=seed, process_index=process_index, process_count=process_count)
    )


def num_eval_examples(data_config: ml_collections.ConfigDict) -> int:
    """Images the evaluation scores: the eval split, cut to max_eval_examples when > 0."""
    total = num_examples(data_config.eval_dataset, data_config.eval_split, data_config.data_dir)
    return min(total, data_config.max_eval_examples) if data_config.max_eval_examples > 0 else total


@dataclasses.dataclass(frozen=True)
class _EvalLoad:
    """Slot j of this process -> example process_index + j * process_count, or padding."""

    split: Split
    num_examples: int
    process_index: int
    process_count: int
    resize_hw: tuple[int, int]

    def __call__(self, slot: int) -> dict[str, np.ndarray]:
        index = self.process_index + slot * self.process_count
        valid = index < self.num_examples
        example = self.split.source[index if valid else index % self.num_examples]
        image, label = example["image"], example["label"][..., 0]
        image = transforms.resize_image(image, transforms.fit_size(image.shape[:2], self.resize_hw))
        if not valid:  # a stand-in with the shapes of a real image, scored nowhere
            label = np.full_like(label, IGNORE_INDEX)
        return {"image": image, "label": label, "valid": np.bool_(valid)}


def make_eval_iterator(
    data_config: ml_collections.ConfigDict, *, process_index: int, process_count: int
) -> grain.DatasetIterator:
    """Evaluation batches of this process: image (b, h, w, 3) uint8 fit to eval_resize_hw,
    label (b, H, W) uint8 at full resolution, valid (b,) bool; b = max(eval_batch_size //
    process_count, 1). Each image appears exactly once over all processes, and every
    process yields the same number of batches (padded with valid=False)."""
    split = open_split(data_config.eval_dataset, data_config.eval_split, data_config.data_dir)
    total = num_eval_examples(data_config)
    batch = max(data_config.eval_batch_size // process_count, 1)
    per_process = -(-total // process_count)
    num_batches = -(-per_process // batch)
    load = _EvalLoad(split, total, process_index, process_count, tuple(data_config.eval_resize_hw))
    slots = grain.MapDataset.range(num_batches * batch).map(load).batch(batch)
    return iter(_read(slots, num_workers=0))
