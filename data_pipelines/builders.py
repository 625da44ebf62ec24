"""TensorFlow Datasets builders (array_record, no TensorFlow) for the datasets of the project.

Every example has `image` (H x W x 3 uint8, PNG or the original JPEG bytes), `label`
(H x W x 1 uint8 Cityscapes train ids or a folder's own ids, 255 = ignore) and
`file_name` (the image path relative to the manual dir). Records keep the order of the
sorted file names (`disable_shuffling`), so example indices are stable.

The dataset's classes are stored in its `metadata.json` (`builder.info.metadata`):
`class_names`, `num_classes` and `palette` (an RGB triple per class, for pictures). Each
split's conversion report and class statistics are stored there too
(`builder.info.metadata["splits"][split]`):
`written`, `skipped` [file, reason], `size_fixes` [file, label hw, image hw],
`unknown_ids` [file, {id: pixels}], `class_pixels` (per class), `ignore_pixels`, and
`class_examples`: per class the [example index, pixels] of every example holding it,
what rare class sampling draws from without rescanning the labels.

The CLI names map to registered TFDS names (TFDS ships its own `cityscapes`):
gta5 -> gta5, synthia -> synthia, cityscapes -> cityscapes_fine,
image_folder[/<name>] -> segmentation_folder/<name>, synthetic_city/<config> ->
synthetic_city/<config>.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import re
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath

from data_pipelines import convert, labels, synthetic_city
from t2s_jax.classes import CITYSCAPES, IGNORE_INDEX, ClassList, generate_palette


class LayoutError(ValueError):
    """The manual dir does not have the published layout of the dataset."""


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "file_name": tfds.features.Text(),
        }
    )


class _SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared writing path: records -> examples, conversion report and class statistics."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    DESCRIPTION = ""
    # No download checksums to look up. (TFDS's lookup of this path for a class in a package
    # needs `importlib_resources`, which tensorflow-datasets does not declare.)
    code_path = None

    def __init__(self, *, num_workers: int = 0, **kwargs):
        self._num_workers = num_workers  # conversion processes; 0 converts in this process
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=_features(),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _classes(self) -> ClassList:
        return CITYSCAPES

    def _write_split(self, split: str, records: Iterator[convert.Converted], total: int):
        classes = self._classes()
        report = convert.SplitReport(len(classes.names))
        name = f"{self.name}/{self.builder_config.name}" if self.builder_config else self.name
        for record in tqdm.tqdm(records, total=total, desc=f"{name} {split}", unit="image"):
            index = report.written
            if report.add(record):
                yield (
                    index,
                    {"image": record.image_png, "label": record.label_png, "file_name": record.file_name},
                )
        if report.written == 0:
            raise LayoutError(
                f"{name} {split}: no file could be converted; first skipped: {report.skipped[:3]}"
            )
        self.info.metadata.setdefault("splits", {})[split] = report.to_json()
        self.info.metadata["class_names"] = list(classes.names)
        self.info.metadata["num_classes"] = len(classes.names)
        self.info.metadata["palette"] = classes.palette.tolist()


class ManualSegmentationBuilder(_SegmentationBuilder, skip_registration=True):
    """A dataset the user downloaded by hand, converted from (image, label) file pairs."""

    EXPECTED = ""  # the published layout in one line, for error messages

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._sources: dict | None = None

    def find_sources(self, manual_dir: str | os.PathLike):
        """Split -> (pairs, label formats) of `manual_dir`, found once (`download_and_prepare`
        reuses them). Raises LayoutError in one line before anything is written."""
        if self._sources is None:
            path = epath.Path(manual_dir)
            if not path.is_dir():
                raise LayoutError(f"--manual_dir={manual_dir} is not a directory; expected {self.EXPECTED}")
            if not any(path.iterdir()):
                raise LayoutError(f"--manual_dir={manual_dir} is empty; expected {self.EXPECTED}")
            sources = self._find_pairs(path)
            for split, (pairs, _) in sources.items():
                if not any(pair.image_path and pair.label_path for pair in pairs):
                    names = ", ".join(pair.file_name for pair in pairs[:2])
                    raise LayoutError(
                        f"--manual_dir={manual_dir}: no image of split {split!r} has a label of the same "
                        f"name ({names}, ...); expected {self.EXPECTED}"
                    )
            self._sources = sources
        return self._sources

    @abc.abstractmethod
    def _find_pairs(
        self, manual_dir: epath.Path
    ) -> dict[str, tuple[list[convert.Pair], dict[str, convert.LabelFormat]]]:
        """Split -> (pairs, label formats by `Pair.label_kind`); raises LayoutError."""

    def _split_generators(self, dl_manager):
        splits = self.find_sources(dl_manager.manual_dir)
        return {
            split: self._generate_examples(split=split, pairs=pairs, formats=formats)
            for split, (pairs, formats) in splits.items()
        }

    def _generate_examples(self, split, pairs, formats):
        records = convert.convert_all(pairs, formats, self._num_workers)
        return self._write_split(split, records, len(pairs))


def _files(
    directory: epath.Path, suffixes: tuple[str, ...], recursive: bool = False
) -> dict[str, epath.Path]:
    """Path relative to `directory` (posix) -> path, for the files whose name ends in `suffixes`."""
    found, suffixes = {}, tuple(s.lower() for s in suffixes)
    for folder, subfolders, names in os.walk(os.fspath(directory)):
        if not recursive:
            subfolders.clear()
        for name in names:
            if name.lower().endswith(suffixes):
                path = epath.Path(folder) / name
                found[path.relative_to(directory).as_posix()] = path
    return found


def _require_dirs(manual_dir: epath.Path, dataset: str, expected: str, *names: str):
    missing = [n for n in names if not (manual_dir / n).is_dir()]
    if missing:
        raise LayoutError(
            f"{manual_dir} is not a {dataset} directory: missing {', '.join(n + '/' for n in missing)}; "
            f"expected {expected}"
        )


def _strip(files: dict[str, epath.Path], suffix: str) -> dict[str, epath.Path]:
    """Keys without `suffix`: the part image and label file names share."""
    return {k[: -len(suffix)]: p for k, p in files.items()}


def _pair_up(
    images: dict[str, epath.Path],
    label_files: dict[str, epath.Path],
    names: dict[str, str],
    kinds: dict[str, str] | None = None,
) -> list[convert.Pair]:
    """Pairs by key (sorted); a key on one side only becomes a pair with a None side.

    `names` gives each key's example file name (the image's path, or the label's when
    alone); `kinds` each key's label format (default: "default").
    """
    return [
        convert.Pair(
            file_name=names[key],
            image_path=os.fspath(images[key]) if key in images else None,
            label_path=os.fspath(label_files[key]) if key in label_files else None,
            label_kind=(kinds or {}).get(key, "default"),
        )
        for key in sorted(set(images) | set(label_files))
    ]


# ------------------------------------------------------------------------ GTA5

GTA5_LAYOUT = """  <manual_dir>/images/00001.png ...   RGB frames (1914x1052)
  <manual_dir>/labels/00001.png ...   Cityscapes label ids, same file names"""
GTA5_EXPECTED = "images/00001.png ... (RGB frames) and labels/00001.png ... (Cityscapes label ids, same names)"


class Gta5(ManualSegmentationBuilder):
    """GTA5 (Richter et al. 2016): 24 966 frames with Cityscapes label ids."""

    DESCRIPTION = "GTA5 frames with labels mapped to the 19 Cityscapes train ids."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Download and extract GTA5 images and labels as:\n" + GTA5_LAYOUT
    EXPECTED = GTA5_EXPECTED

    def _find_pairs(self, manual_dir):
        _require_dirs(manual_dir, "GTA5", self.EXPECTED, "images", "labels")
        images = _files(manual_dir / "images", (".png",))
        label_files = _files(manual_dir / "labels", (".png",))
        if not images:
            raise LayoutError(f"{manual_dir}/images holds no .png files; expected {self.EXPECTED}")
        names = {k: f"labels/{k}" for k in label_files} | {k: f"images/{k}" for k in images}
        label_format = convert.LabelFormat(
            labels.train_id_lookup(labels.CITYSCAPES_LABEL_ID_TO_TRAIN_ID), labels.CITYSCAPES_LABEL_IDS
        )
        return {"train": (_pair_up(images, label_files, names), {"default": label_format})}


# ------------------------------------------------------------------------ SYNTHIA

SYNTHIA_LAYOUT = """  <manual_dir>/RGB/0000000.png ...         RGB frames (1280x760)
  <manual_dir>/GT/LABELS/0000000.png ...   16-bit PNG, class id in the first channel"""
SYNTHIA_EXPECTED = (
    "RGB/0000000.png ... (RGB frames) and GT/LABELS/0000000.png ... (16-bit PNG, class id in the first channel)"
)


class Synthia(ManualSegmentationBuilder):
    """SYNTHIA-RAND-CITYSCAPES (Ros et al. 2016): 9 400 frames, 16-bit class labels."""

    DESCRIPTION = "SYNTHIA-RAND-CITYSCAPES with labels mapped to Cityscapes train ids (16 classes used)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Download and extract SYNTHIA-RAND-CITYSCAPES as:\n" + SYNTHIA_LAYOUT
    EXPECTED = SYNTHIA_EXPECTED

    def _find_pairs(self, manual_dir):
        _require_dirs(manual_dir, "SYNTHIA-RAND-CITYSCAPES", self.EXPECTED, "RGB", "GT/LABELS")
        images = _files(manual_dir / "RGB", (".png",))
        label_files = _files(manual_dir / "GT" / "LABELS", (".png",))
        if not images:
            raise LayoutError(f"{manual_dir}/RGB holds no .png files; expected {self.EXPECTED}")
        names = {k: f"GT/LABELS/{k}" for k in label_files} | {k: f"RGB/{k}" for k in images}
        label_format = convert.LabelFormat(
            labels.train_id_lookup(labels.SYNTHIA_ID_TO_TRAIN_ID),
            labels.SYNTHIA_IDS,
            sixteen_bit_first_channel=True,
        )
        return {"train": (_pair_up(images, label_files, names), {"default": label_format})}


# ------------------------------------------------------------------------ Cityscapes

CITYSCAPES_LAYOUT = """  <manual_dir>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  <manual_dir>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png
      (or ..._gtFine_labelIds.png, mapped with the official table)"""
CITYSCAPES_EXPECTED = (
    "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png "
    "(or *_gtFine_labelIds.png)"
)
_CITYSCAPES_SPLITS = {"train": "train", "val": "validation"}  # folder -> TFDS split
_CS_IMAGE = "_leftImg8bit.png"
_CS_LABELS = {"train_ids": "_gtFine_labelTrainIds.png", "label_ids": "_gtFine_labelIds.png"}


class CityscapesFine(ManualSegmentationBuilder):
    """Cityscapes gtFine (Cordts et al. 2016): train (2 975) and validation (500) splits."""

    name = "cityscapes_fine"
    DESCRIPTION = "Cityscapes leftImg8bit with gtFine labels as the 19 train ids."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Download and extract leftImg8bit and gtFine as:\n" + CITYSCAPES_LAYOUT
    EXPECTED = CITYSCAPES_EXPECTED

    def _find_pairs(self, manual_dir):
        _require_dirs(manual_dir, "Cityscapes", self.EXPECTED, "leftImg8bit", "gtFine")
        present = [f for f in _CITYSCAPES_SPLITS if (manual_dir / "leftImg8bit" / f).is_dir()]
        if not present:
            raise LayoutError(
                f"{manual_dir}/leftImg8bit has neither train/ nor val/; expected {self.EXPECTED}"
            )
        formats = {
            "train_ids": convert.LabelFormat(
                labels.train_id_lookup(labels.identity_mapping(19)), frozenset(range(19)) | {IGNORE_INDEX}
            ),
            "label_ids": convert.LabelFormat(
                labels.train_id_lookup(labels.CITYSCAPES_LABEL_ID_TO_TRAIN_ID), labels.CITYSCAPES_LABEL_IDS
            ),
        }
        splits = {}
        for folder in present:
            image_dir, label_dir = manual_dir / "leftImg8bit" / folder, manual_dir / "gtFine" / folder
            images = _strip(_files(image_dir, (_CS_IMAGE,), recursive=True), _CS_IMAGE)
            if not images:
                raise LayoutError(f"{image_dir} holds no *{_CS_IMAGE}; expected {self.EXPECTED}")
            found = {
                kind: _strip(_files(label_dir, (suffix,), recursive=True), suffix)
                if label_dir.is_dir()
                else {}
                for kind, suffix in _CS_LABELS.items()
            }
            label_files = found["label_ids"] | found["train_ids"]  # train ids win when both exist
            kinds = {k: "train_ids" if k in found["train_ids"] else "label_ids" for k in label_files}
            names = {k: f"gtFine/{folder}/{k}{_CS_LABELS[kinds[k]]}" for k in label_files}
            names |= {k: f"leftImg8bit/{folder}/{k}{_CS_IMAGE}" for k in images}
            splits[_CITYSCAPES_SPLITS[folder]] = (_pair_up(images, label_files, names, kinds), formats)
        return splits


# ------------------------------------------------------------------------ a user's image folder

FOLDER_LAYOUT = """  <manual_dir>/classes.txt                  one class per line, in train-id order:
                                            a name, optionally its picture colour R G B
                                            (e.g. 'car 0 0 142'; others get distinct ones)
  <manual_dir>/images/<split>/<name>.png|.jpg
  <manual_dir>/labels/<split>/<name>.png    8-bit train ids, 255 = ignore
  (split folders: any name; 'val' is stored as 'validation')"""
FOLDER_EXPECTED = (
    "classes.txt (one class per line, in train-id order, optionally its colour: 'car 0 0 142'), "
    "images/<split>/<name>.png|.jpg and labels/<split>/<name>.png (8-bit train ids, 255 = ignore)"
)


def _parse_class_line(path: epath.Path, number: int, line: str) -> tuple[str, tuple[int, int, int] | None]:
    """'traffic light' -> (name, None); 'car 0 0 142' -> ('car', (0, 0, 142))."""
    words = line.split()
    if len(words) < 4 or not all(w.isdigit() for w in words[-3:]):
        return " ".join(words), None
    colour = tuple(int(w) for w in words[-3:])
    if max(colour) > 255:
        raise LayoutError(f"{path} line {number}: colour {colour} of {line!r} is not RGB 0..255")
    return " ".join(words[:-3]), colour


def read_class_list(manual_dir: epath.Path) -> ClassList:
    """classes.txt of an image folder: names in train-id order, palette from the colours
    given there; classes without one get distinct generated colours (none black)."""
    path = manual_dir / "classes.txt"
    if not path.is_file():
        raise LayoutError(f"{manual_dir} has no classes.txt; expected {FOLDER_EXPECTED}")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    parsed = [_parse_class_line(path, n, line) for n, line in lines]
    names = tuple(name for name, _ in parsed)
    if not 0 < len(names) < IGNORE_INDEX:
        raise LayoutError(f"{path} names {len(names)} classes; expected 1 to {IGNORE_INDEX - 1}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise LayoutError(f"{path} names {', '.join(map(repr, repeated))} more than once")
    given = [colour for _, colour in parsed if colour is not None]
    generated = iter(generate_palette(len(names) - len(given), taken=given).tolist())
    palette = [colour if colour is not None else next(generated) for _, colour in parsed]
    return ClassList(names, np.array(palette, np.uint8))


class SegmentationFolder(ManualSegmentationBuilder):
    """A user's own data: images and train-id label PNGs per split, classes from classes.txt."""

    name = "segmentation_folder"
    DESCRIPTION = "Images with train-id label PNGs from a folder, classes from classes.txt."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Arrange the images and labels as:\n" + FOLDER_LAYOUT
    EXPECTED = FOLDER_EXPECTED
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="default", description="The folder given at preparation.")
    ]

    def _classes(self):
        return self._class_list

    def _find_pairs(self, manual_dir):
        _require_dirs(manual_dir, "image folder", self.EXPECTED, "images", "labels")
        self._class_list = read_class_list(manual_dir)
        num_classes = len(self._class_list.names)
        folders = sorted(p.name for p in (manual_dir / "images").iterdir() if p.is_dir())
        if not folders:
            raise LayoutError(f"{manual_dir}/images has no split folders; expected {self.EXPECTED}")
        label_format = convert.LabelFormat(
            labels.train_id_lookup(labels.identity_mapping(num_classes)),
            frozenset(range(num_classes)) | {IGNORE_INDEX},
        )
        splits = {}
        for folder in folders:
            image_files = _files(manual_dir / "images" / folder, (".png", ".jpg", ".jpeg"))
            images = {k.rsplit(".", 1)[0]: p for k, p in image_files.items()}
            label_files = {}
            if (manual_dir / "labels" / folder).is_dir():
                label_files = _strip(_files(manual_dir / "labels" / folder, (".png",)), ".png")
            names = {k: f"labels/{folder}/{p.name}" for k, p in label_files.items()}
            names |= {k: f"images/{folder}/{p.name}" for k, p in images.items()}
            split = "validation" if folder == "val" else folder
            splits[split] = (_pair_up(images, label_files, names), {"default": label_format})
        return splits


# ------------------------------------------------------------------------ synthetic_city


@dataclasses.dataclass
class SyntheticCityConfig(tfds.core.BuilderConfig):
    domain: str = "source"  # 'source' (rendered look) | 'target' (photographed look)
    image_hw: tuple[int, int] = synthetic_city.DEFAULT_IMAGE_HW
    num_train: int = 400
    num_validation: int = 100
    seed: int = 0


def synthetic_city_config(name: str) -> SyntheticCityConfig:
    """'source' / 'target' (128x256) or e.g. 'target_256x512' for another image size."""
    match = re.fullmatch(r"(source|target)(?:_(\d+)x(\d+))?", name)
    if match is None:
        raise ValueError(
            f"unknown synthetic_city config {name!r}: expected source, target or e.g. source_256x512"
        )
    domain, height, width = match.groups()
    image_hw = (int(height), int(width)) if height else synthetic_city.DEFAULT_IMAGE_HW
    return SyntheticCityConfig(
        name=name,
        domain=domain,
        image_hw=image_hw,
        description=f"{domain} domain, {image_hw[0]}x{image_hw[1]} images",
    )


class SyntheticCity(_SegmentationBuilder):
    """The built-in domain pair (see data_pipelines/synthetic_city.py for the generator)."""

    DESCRIPTION = "Procedural street scenes; source rendered flat, target with a photographic appearance gap."
    BUILDER_CONFIGS = [synthetic_city_config("source"), synthetic_city_config("target")]

    def _split_generators(self, dl_manager):
        sizes = {"train": self.builder_config.num_train, "validation": self.builder_config.num_validation}
        return {split: self._generate_examples(split=split, size=size) for split, size in sizes.items()}

    def _generate_examples(self, split, size):
        config = self.builder_config

        def records():
            for index in range(size):
                image, label = synthetic_city.generate_example(
                    config.seed, config.domain, split, index, config.image_hw
                )
                yield convert.Converted(
                    file_name=f"{config.domain}/{split}/{index:05d}.png",
                    image_png=convert.encode_png(image),
                    label_png=convert.encode_png(label),
                    class_pixels=np.bincount(label.ravel(), minlength=256),
                )

        return self._write_split(split, records(), size)


# ------------------------------------------------------------------------ CLI names

_BUILDERS = {"gta5": Gta5, "synthia": Synthia, "cityscapes": CityscapesFine,
             "image_folder": SegmentationFolder, "synthetic_city": SyntheticCity}  # fmt: skip
MANUAL_DATASETS = ("gta5", "synthia", "cityscapes", "image_folder")


def _resolve(dataset: str) -> tuple[type[_SegmentationBuilder], tfds.core.BuilderConfig | None]:
    family, _, config_name = dataset.partition("/")
    if family not in _BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_BUILDERS)}")
    if family == "synthetic_city":
        return SyntheticCity, synthetic_city_config(config_name or "source")
    if family == "image_folder":
        return SegmentationFolder, tfds.core.BuilderConfig(name=config_name or "default")
    if config_name:
        raise ValueError(f"dataset {family!r} has no configs, got {dataset!r}")
    return _BUILDERS[family], None


def make_builder(dataset: str, data_dir: str, num_workers: int = 0) -> _SegmentationBuilder:
    """Builder of a CLI / config dataset name: gta5, synthia, cityscapes, image_folder[/<name>],
    synthetic_city/<config>."""
    builder_cls, config = _resolve(dataset)
    if config is not None and config.name in {c.name for c in builder_cls.BUILDER_CONFIGS}:
        config = config.name  # TFDS refuses a custom config named like a registered one
    return builder_cls(config=config, data_dir=data_dir, file_format="array_record", num_workers=num_workers)


def prepared_dir(dataset: str, data_dir: str) -> epath.Path:
    """Where `dataset` is (or would be) stored under `data_dir`, without building anything."""
    builder_cls, config = _resolve(dataset)
    path = epath.Path(data_dir) / builder_cls.name
    return (path / config.name if config else path) / str(builder_cls.VERSION)
