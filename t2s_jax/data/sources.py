"""Prepared datasets: locating them, building the synthetic pair on demand, reading splits.

Dataset names are those of the configs and of `python -m data_pipelines.prepare`:
gta5, synthia, cityscapes, image_folder[/<name>], synthetic_city/{source,target}[_<H>x<W>],
stored under `data_dir` by the TFDS builders of `data_pipelines.builders`.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import builders
from t2s_jax.classes import CITYSCAPES, ClassList, generate_palette

# Split names accepted for one another ('val' is the folder name, 'validation' the TFDS one).
_SPLIT_ALIASES = {"val": "validation", "validation": "val"}


class DamagedDataError(Exception):
    """A prepared dataset whose files cannot be read back; the message names the dataset, the
    split and the command that rebuilds it."""


def prepare_command(name: str, data_dir: str, *, overwrite: bool = False) -> str:
    """The `python -m data_pipelines.prepare` command that builds (or rebuilds) `name`."""
    manual_dir = "" if name.partition("/")[0] == "synthetic_city" else f" --manual_dir=<the downloaded {name}>"
    return (f"python -m data_pipelines.prepare --dataset={name}{manual_dir} --data_dir={data_dir}"
            + (" --overwrite" if overwrite else ""))


def ensure_prepared(name: str, data_dir: str) -> str:
    """Path of the prepared `name`; generates synthetic_city/* when missing.

    Raises FileNotFoundError with the preparation command for a missing real dataset.
    Processes sharing a `data_dir` may call it at once: the synthetic data is deterministic
    and TFDS moves a finished dataset into place in one rename.
    """
    path = builders.prepared_dir(name, data_dir)
    if (path / "dataset_info.json").exists():
        return str(path)
    if name.partition("/")[0] == "synthetic_city":
        tfds.disable_progress_bar()
        try:
            builders.make_builder(name, data_dir).download_and_prepare()
        except OSError:
            # Another process on the same data_dir finished first (its rename won the race).
            if not (path / "dataset_info.json").exists():
                raise
        return str(path)
    raise FileNotFoundError(
        f"dataset {name!r} is not prepared under {data_dir!r} (no {path}). Prepare it once with:\n"
        f"  {prepare_command(name, data_dir)}"
    )


@functools.lru_cache(maxsize=32)
def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    return tfds.builder_from_directory(ensure_prepared(name, data_dir))


def _split_name(builder: tfds.core.DatasetBuilder, name: str, split: str) -> str:
    if split in builder.info.splits:
        return split
    if _SPLIT_ALIASES.get(split) in builder.info.splits:
        return _SPLIT_ALIASES[split]
    raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a prepared dataset: random access to its examples plus its statistics."""

    dataset: str  # the config / `prepare` name, e.g. 'gta5'
    split: str  # the stored split name, e.g. 'validation'
    data_dir: str
    source: tfds.data_sources.ArrayRecordDataSource  # [i] -> {'image', 'label', 'file_name'}
    class_names: tuple[str, ...]
    class_pixels: np.ndarray  # (K,) labelled pixels per class over the split
    class_examples: tuple[np.ndarray, ...]  # per class: (n, 2) [example index, pixels of the class]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Example `index`: {'image', 'label', 'file_name'}. Raises DamagedDataError for a
        record damaged on disk (array_record checks a hash of every chunk it reads)."""
        try:
            return self.source[index]
        except RuntimeError as error:  # "Corrupted Riegeli/records file: chunk data hash mismatch ..."
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DamagedDataError(
                f"dataset {self.dataset!r} split {self.split!r} under {self.data_dir!r} is damaged on disk "
                f"(example {index}: {first_line}); rebuild it with: "
                f"{prepare_command(self.dataset, self.data_dir, overwrite=True)}"
            ) from error


def open_split(name: str, split: str, data_dir: str) -> Split:
    builder = _builder(name, data_dir)
    split = _split_name(builder, name, split)
    stats = builder.info.metadata["splits"][split]
    return Split(
        dataset=name,
        split=split,
        data_dir=data_dir,
        source=builder.as_data_source(split),
        class_names=tuple(builder.info.metadata["class_names"]),
        class_pixels=np.asarray(stats["class_pixels"], np.int64),
        class_examples=tuple(np.asarray(e, np.int64).reshape(-1, 2) for e in stats["class_examples"]),
    )


def class_names(name: str, data_dir: str) -> tuple[str, ...]:
    """Class names of a prepared dataset, in train-id order."""
    return tuple(_builder(name, data_dir).info.metadata["class_names"])


def class_list(name: str, data_dir: str) -> ClassList:
    """Names and palette of a prepared dataset. Datasets prepared before palettes were
    stored get Cityscapes' for the Cityscapes classes, generated colours otherwise."""
    metadata = _builder(name, data_dir).info.metadata
    names = tuple(metadata["class_names"])
    if "palette" in metadata:
        return ClassList(names, np.asarray(metadata["palette"], np.uint8).reshape(len(names), 3))
    return CITYSCAPES if names == CITYSCAPES.names else ClassList(names, generate_palette(len(names)))


def check_classes(config: ml_collections.ConfigDict, *, training: bool = True) -> ClassList:
    """The class list a run evaluates, reports and draws with: the eval dataset's.

    Raises ValueError (one line: the dataset, its class count, the key to set) when
    `config.model.num_classes` differs from the class count of the eval dataset or, when
    `training`, of the source or target; and when `config.uda.fd_classes` (used with
    `uda.fd_weight > 0`) holds ids outside the classes. Call it before building anything.
    """
    num_classes, data_config = config.model.num_classes, config.data
    roles = {"eval_dataset": data_config.eval_dataset}
    if training:
        roles = {"source": data_config.source, "target": data_config.target, **roles}
    lists = {}
    for role, name in roles.items():
        if not name:
            continue
        lists[role] = class_list(name, data_config.data_dir)
        count = len(lists[role].names)
        if count != num_classes:
            raise ValueError(
                f"config.model.num_classes={num_classes} but config.data.{role}={name!r} has {count} "
                f"classes; set --config.model.num_classes={count}"
            )
    fd_classes = tuple(config.uda.fd_classes)
    if training and config.uda.fd_weight > 0 and any(not 0 <= c < num_classes for c in fd_classes):
        raise ValueError(
            f"config.uda.fd_classes={fd_classes} has ids outside the {num_classes} classes of "
            f"config.data.source={data_config.source!r}; set --config.uda.fd_classes to its thing-class ids "
            f"or --config.uda.fd_weight=0"
        )
    return lists["eval_dataset"]


def num_examples(name: str, split: str, data_dir: str) -> int:
    builder = _builder(name, data_dir)
    return builder.info.splits[_split_name(builder, name, split)].num_examples
