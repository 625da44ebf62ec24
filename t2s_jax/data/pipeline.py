"""The grain input pipeline: paired source/target training batches and evaluation batches.

Training: one GLOBAL stream of examples per domain, the same on any number of processes.
Per domain, a `MapDataset` of example indices, shuffled with a new permutation every epoch
and repeated forever (or, for the source with rare class sampling, an endless stream of
(class, file) draws over the whole set); a random map reads each example and applies the
host transforms (resize to fit, crop, flip) with the generator grain derives from (seed,
domain, global element index). The domains are zipped and cut into blocks of b =
batch_size / process_count elements; global batch k is blocks k*P .. k*P + P - 1, and
process p reads only block k*P + p: global examples [p*b, (p+1)*b) of each batch, the
contiguous rows `jax.make_array_from_process_local_data` places on its devices. So a global
batch is a function of the seed and the step alone, the iterator state is the position,
and `set_state` resumes at exactly the next batch.
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


def _stream_seed(seed: int, stream: int, use: int) -> int:
    """A 32-bit seed per (run seed, domain stream, use): 0 shuffles, 1 draws the transforms.
    No process index: every process derives the same global stream."""
    return int(np.random.SeedSequence([seed, stream, use]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class _TrainTransform:
    """Index (ignored under RCS) + rng -> {'image': (h, w, 3), 'label': (h, w)} crop, and
    'valid': (h, w) uint8 with `pseudo_margins` (HRDA's v2 pseudo-label validity)."""

    split: Split
    resize_hw: tuple[int, int]
    crop_hw: tuple[int, int]
    cat_max_ratio: float  # 1.0 = plain random crop
    retries: int
    flip_prob: float
    rare_classes: RareClassSampler | None = None
    min_crop_pixels: int = 0
    pseudo_margins: tuple[int, ...] = ()  # () = no validity map

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rare_class = None
        if self.rare_classes is not None:
            rare_class, index = self.rare_classes.draw(rng)
        example = self.split[int(index)]
        image, label = example["image"], example["label"][..., 0]
        stored_hw = label.shape
        hw = transforms.fit_size(stored_hw, self.resize_hw)
        image, label = transforms.resize_image(image, hw), transforms.resize_label(label, hw)
        image, label = transforms.pad_to(image, label, self.crop_hw)
        maps = (image, label)
        if self.pseudo_margins:
            # Built at the stored size, then carried exactly as the label (HRDA carries it as a
            # segmentation field): nearest resize, padding (with 0: not valid), crop and flip.
            valid = transforms.resize_label(transforms.validity_map(stored_hw, self.pseudo_margins), hw)
            maps += (transforms.pad_map(valid, self.crop_hw, 0),)
        if rare_class is None:
            offset = transforms.cat_max_ratio_offset(
                rng, label, self.crop_hw, self.cat_max_ratio, self.retries
            )
        else:
            offset = transforms.rare_class_offset(
                rng, label, self.crop_hw, rare_class, self.min_crop_pixels, self.cat_max_ratio, self.retries
            )
        crops = transforms.crop_and_flip(rng, maps, offset, self.crop_hw, self.flip_prob)
        return dict(zip(("image", "label", "valid"), crops))


def _domain_dataset(transform: _TrainTransform, *, seed: int, stream: int) -> grain.MapDataset:
    """The global, endless stream of one domain's transformed examples."""
    positions = grain.MapDataset.range(len(transform.split))
    if transform.rare_classes is None:
        # Repeat after shuffle: grain's shuffle seeds epoch e with seed + e, a new permutation.
        positions = positions.shuffle(seed=_stream_seed(seed, stream, 0))
    # The element index (global position) seeds each element's generator.
    return positions.repeat().random_map(transform, seed=_stream_seed(seed, stream, 1))


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
    uint8 and, with a target, target_image / target_label, plus target_valid (b, h, w) uint8
    (1 = the pseudo-label may count) when data_config.pseudo_margins is set; b = batch_size //
    process_count.
    Batch k of process p is rows [p*b, (p+1)*b) of global batch k, which does not depend
    on process_count."""
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
    domains = {"source": _domain_dataset(transform, seed=seed, stream=0)}
    if data_config.target:
        target = open_split(data_config.target, data_config.target_split, data_config.data_dir)
        transform = _TrainTransform(
            target,
            resize_hw=tuple(data_config.target_resize_hw),
            crop_hw=crop_hw,
            cat_max_ratio=1.0,  # method.md: only source crops are redrawn
            retries=data_config.crop_retries,
            flip_prob=data_config.flip_prob,
            pseudo_margins=tuple(data_config.pseudo_margins),
        )
        domains["target"] = _domain_dataset(transform, seed=seed, stream=1)
    paired = grain.experimental.ZipMapDataset(list(domains.values())).map(_NameDomains(tuple(domains)))
    # Lazy: slicing the blocks means this process reads and transforms only its own examples.
    blocks = paired.batch(batch, drop_remainder=True)[process_index::process_count]
    return _read(blocks, data_config.num_workers)


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
    """Slot j of this process -> global position (j // b) * b * P + p * b + j % b: batch
    j // b of this process is rows [p*b, (p+1)*b) of the global batch, which holds the
    examples in split order. Positions past the last example are padding."""

    split: Split
    num_examples: int
    process_index: int
    process_count: int
    batch: int  # b, examples per process per batch
    resize_hw: tuple[int, int]

    def __call__(self, slot: int) -> dict[str, np.ndarray]:
        batch_index, row = divmod(slot, self.batch)
        index = (batch_index * self.process_count + self.process_index) * self.batch + row
        valid = index < self.num_examples
        example = self.split[index if valid else index % self.num_examples]
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
    process_count, 1). Global batch t (the processes' batches t stacked in process order)
    holds examples [t*B, (t+1)*B) in split order, B = b * process_count; each image
    appears exactly once, and every process yields the same number of batches (the last
    padded with valid=False)."""
    split = open_split(data_config.eval_dataset, data_config.eval_split, data_config.data_dir)
    total = num_eval_examples(data_config)
    batch = max(data_config.eval_batch_size // process_count, 1)
    num_batches = -(-total // (batch * process_count))
    load = _EvalLoad(split, total, process_index, process_count, batch, tuple(data_config.eval_resize_hw))
    slots = grain.MapDataset.range(num_batches * batch).map(load).batch(batch)
    return iter(_read(slots, num_workers=0))
