"""Per-file conversion of (image, label) pairs into stored examples, and its report.

Kept free of TensorFlow Datasets so the conversion workers (spawned processes) start fast.
Every pair yields one `Converted` record: an example to write, or the reason it was
skipped; the builder turns the records into TFDS examples and the conversion report.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import multiprocessing
from collections.abc import Callable, Iterable, Iterator

import cv2
import numpy as np
from PIL import Image

from t2s_jax.classes import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class LabelFormat:
    """How a dataset stores labels and how its raw ids map to train ids."""

    lookup: np.ndarray  # (65536,) uint8: raw id -> train id, 255 = ignore
    known_ids: frozenset[int]  # ids the dataset defines; any other id is reported as unknown
    sixteen_bit_first_channel: bool = False  # SYNTHIA: 16-bit RGB PNG, class in the first (R) channel


@dataclasses.dataclass(frozen=True)
class Pair:
    """One example to convert; a missing side is None (reported, never silently dropped)."""

    file_name: str  # path relative to the manual dir, the example's `file_name`
    image_path: str | None
    label_path: str | None
    label_kind: str = "default"  # key of the dataset's label formats (Cityscapes: train_ids | label_ids)


@dataclasses.dataclass
class Converted:
    file_name: str
    image_png: bytes | None = None  # encoded image (original bytes when already RGB PNG/JPEG)
    label_png: bytes | None = None  # 8-bit train ids
    skip_reason: str | None = None
    size_fix: tuple[tuple[int, int], tuple[int, int]] | None = None  # (label hw, image hw)
    unknown_ids: dict[int, int] = dataclasses.field(default_factory=dict)  # raw id -> pixels
    class_pixels: np.ndarray | None = None  # (256,) pixel count per stored label value


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_image(path: str) -> tuple[bytes, tuple[int, int]]:
    """Returns RGB image bytes for storage and the image's (H, W); raises on damaged files."""
    with Image.open(path) as image:
        image.load()  # decodes every row: a truncated file fails here, not at training time
        if image.mode == "RGB" and image.format in ("PNG", "JPEG"):
            with open(path, "rb") as f:
                return f.read(), (image.height, image.width)
        rgb = np.asarray(image.convert("RGB"))
    return encode_png(rgb), rgb.shape[:2]


def _read_raw_label(path: str, label_format: LabelFormat) -> np.ndarray:
    if label_format.sixteen_bit_first_channel:
        return _read_sixteen_bit_red(path)
    # 8-bit ids or palette indices: Pillow, as mmseg's LoadAnnotations (cv2 would expand palettes to BGR).
    with Image.open(path) as label:
        label.load()
        if label.mode not in ("L", "P", "I;16"):
            raise ValueError(f"expected a single-channel label PNG (ids or palette), got mode {label.mode}")
        return np.asarray(label)


def _read_sixteen_bit_red(path: str) -> np.ndarray:
    """The R channel of a 16-bit colour PNG, read as DAFormer's SYNTHIA conversion does
    (`cv2.imread(path, cv2.IMREAD_UNCHANGED)`, BGR(A) order; Pillow truncates 16-bit RGB)."""
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if label is None:
        raise ValueError("OpenCV cannot decode it")
    if label.ndim != 3 or label.shape[2] not in (3, 4):
        raise ValueError(f"expected a colour PNG with the class in the R channel, got shape {label.shape}")
    return label[..., 2]


def resize_nearest(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize with `cv2.INTER_NEAREST` (mmcv's label resize): output pixel i
    samples input floor(i * in / out)."""
    return cv2.resize(label, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


def convert_pair(pair: Pair, label_format: LabelFormat) -> Converted:
    """Reads, checks and maps one pair; bad input becomes a skip reason, never an exception."""
    record = Converted(pair.file_name)
    if pair.label_path is None:
        record.skip_reason = "image without label"
        return record
    if pair.image_path is None:
        record.skip_reason = "label without image"
        return record
    try:
        record.image_png, image_hw = _read_image(pair.image_path)
    except Exception as error:  # PIL raises many types for damaged files
        record.image_png = None
        record.skip_reason = f"unreadable image ({type(error).__name__}: {error})"
        return record
    try:
        raw = _read_raw_label(pair.label_path, label_format).astype(np.int64)
    except Exception as error:
        record.image_png = None
        record.skip_reason = f"unreadable label ({type(error).__name__}: {error})"
        return record
    raw_counts = np.bincount(raw.ravel(), minlength=1 << 16)
    record.unknown_ids = {
        int(i): int(raw_counts[i]) for i in np.flatnonzero(raw_counts) if int(i) not in label_format.known_ids
    }
    label = label_format.lookup[raw]
    if label.shape != image_hw:
        record.size_fix = (label.shape, image_hw)
        label = resize_nearest(label, image_hw)
    record.class_pixels = np.bincount(label.ravel(), minlength=256)
    record.label_png = encode_png(label)
    return record


def convert_all(pairs: list[Pair], formats: dict[str, LabelFormat], num_workers: int) -> Iterator[Converted]:
    """Converts pairs in order, in `num_workers` processes (0: in this one)."""
    convert = _BoundConvert(formats)
    if num_workers <= 0:
        yield from map(convert, pairs)
        return
    yield from ordered_parallel_map(convert, pairs, num_workers)


def ordered_parallel_map(fn: Callable, items: Iterable, num_workers: int) -> Iterator:
    """`map(fn, items)` over spawned processes, in order, holding a bounded number of results."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe once threads exist (JAX, TFDS)
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclasses.dataclass(frozen=True)
class _BoundConvert:
    """`convert_pair` with the dataset's label formats bound; picklable for worker processes."""

    formats: dict[str, LabelFormat]

    def __call__(self, pair: Pair) -> Converted:
        return convert_pair(pair, self.formats[pair.label_kind])


class SplitReport:
    """Accumulates what happened to every file of one split, and the class statistics."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.written = 0
        self.skipped: list[tuple[str, str]] = []
        self.size_fixes: list[tuple[str, list[int], list[int]]] = []
        self.unknown_ids: list[tuple[str, dict[str, int]]] = []
        self.class_pixels = np.zeros(num_classes, np.int64)
        self.ignore_pixels = 0
        # Rare class sampling: per class, (example index, pixels of the class) for every
        # example holding the class; the sampler applies its own minimum at read time.
        self.class_examples: list[list[list[int]]] = [[] for _ in range(num_classes)]

    def add(self, record: Converted) -> bool:
        """Records one file; True when it is written (as example number `self.written - 1`)."""
        if record.skip_reason is not None:
            self.skipped.append((record.file_name, record.skip_reason))
            return False
        if record.size_fix is not None:
            label_hw, image_hw = record.size_fix
            self.size_fixes.append((record.file_name, list(label_hw), list(image_hw)))
        if record.unknown_ids:
            self.unknown_ids.append((record.file_name, {str(k): v for k, v in record.unknown_ids.items()}))
        counts = record.class_pixels
        self.class_pixels += counts[: self.num_classes]
        self.ignore_pixels += int(counts[IGNORE_INDEX])
        for c in np.flatnonzero(counts[: self.num_classes]):
            self.class_examples[c].append([self.written, int(counts[c])])
        self.written += 1
        return True

    def to_json(self) -> dict:
        return dict(
            written=self.written,
            skipped=[list(item) for item in self.skipped],
            size_fixes=[list(item) for item in self.size_fixes],
            unknown_ids=[list(item) for item in self.unknown_ids],
            class_pixels=self.class_pixels.tolist(),
            ignore_pixels=self.ignore_pixels,
            class_examples=self.class_examples,
        )
