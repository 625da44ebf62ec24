"""Evaluation (method.md section 8): inference, a dataset-level confusion matrix, mIoU.

The student runs in inference mode (BN running statistics, no dropout) on whole images
or on a sliding window grid; logits are upsampled bilinearly to the label size and
arg-maxed. Confusion matrices (rows: ground truth, columns: prediction) are summed on
the device over the whole dataset; IoU_c = TP / (TP + FP + FN) from that sum, and mIoU
is the mean over classes with a non-empty union.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from t2s_jax import jsonio
from t2s_jax.classes import (
    CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX, SYNTHIA13_CLASS_IDS, SYNTHIA16_CLASS_IDS, colorize,
)  # fmt: skip
from t2s_jax.models.layers import resize_bilinear
from t2s_jax.parallel import data_sharded, global_batch, replicated, to_host
from t2s_jax.uda.normalize import normalize

# Per-batch confusions are int32 on the device; they are moved into an int64 host total
# before the pixels accumulated on the device could overflow a cell.
_MAX_DEVICE_PIXELS = np.iinfo(np.int32).max


# ------------------------------------------------------------------ confusion and IoU


def confusion_matrix(
    predictions: jax.Array,
    labels: jax.Array,
    num_classes: int,
    valid: jax.Array | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """(K, K) int32 counts, rows = ground-truth class, columns = predicted class.

    `predictions` and `labels` have the same shape; pixels labelled `ignore_index` (or
    anything outside 0..K-1) are not counted. `valid` masks whole examples (shape
    `labels.shape[:n]`, e.g. (B,) for padding examples of a last batch) or pixels.
    Fixed shapes: one scatter-add into K*K bins, so it jits and shards.
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    predictions = jnp.asarray(predictions).astype(jnp.int32)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    counted = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    counted &= (predictions >= 0) & (predictions < num_classes)
    if valid is not None:
        valid = jnp.asarray(valid, bool)
        counted &= valid.reshape(valid.shape + (1,) * (labels.ndim - valid.ndim))
    bins = jnp.where(counted, labels * num_classes + predictions, 0).reshape(-1)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[bins].add(counted.reshape(-1).astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); nan for classes absent from labels and predictions."""
    confusion = np.asarray(confusion, np.float64)
    true_positives = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positives
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positives / union, np.nan)


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():  # all-nan (an empty evaluation) is nan, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def summarize(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """'class_names', 'per_class_iou' (a list in class order, nan = absent), 'miou' over
    all classes, 'pixel_accuracy', 'num_pixels'; for the Cityscapes class list also
    'miou19' (= 'miou') and the SYNTHIA subsets 'miou16' and 'miou13' (other lists of 19
    classes have no such subsets)."""
    confusion = np.asarray(confusion, np.int64)
    if confusion.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {confusion.shape} does not match {len(class_names)} class names")
    iou = iou_from_confusion(confusion)
    total = confusion.sum()
    summary = {
        "class_names": list(class_names),
        "per_class_iou": [float(value) for value in iou],
        "miou": _nanmean(iou),
        "pixel_accuracy": float(np.trace(confusion) / total) if total else math.nan,
        "num_pixels": int(total),
    }
    if tuple(class_names) == CITYSCAPES_CLASSES:
        summary["miou19"] = summary["miou"]
        summary["miou16"] = _nanmean(iou[list(SYNTHIA16_CLASS_IDS)])
        summary["miou13"] = _nanmean(iou[list(SYNTHIA13_CLASS_IDS)])
    return summary


# ------------------------------------------------------------------ inference


def slide_windows(
    image_hw: tuple[int, int], crop_hw: tuple[int, int], stride_hw: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's sliding-window grid: windows step by the stride and the
    last row/column is shifted back to end at the image border. All windows have the
    size min(crop, image)."""
    (height, width), (crop_h, crop_w), (stride_h, stride_w) = image_hw, crop_hw, stride_hw
    if min(crop_h, crop_w, stride_h, stride_w) <= 0:
        raise ValueError(f"slide crop {crop_hw} and stride {stride_hw} must be positive")
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def predict_logits(
    apply_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    *,
    mode: str = "whole",
    crop_hw: tuple[int, int] = (512, 512),
    stride_hw: tuple[int, int] = (341, 341),
) -> jax.Array:
    """(B, H, W, 3) normalised images -> (B, H, W, K) float32 logits at the input size.

    `apply_fn` maps images to stride-4 logits. 'whole': one pass, upsampled. 'slide':
    mmseg's `slide_inference`: every window's logits are upsampled to the window, summed
    into place and divided by how many windows cover each pixel. All windows go through
    `apply_fn` as one batch (window-major within each example, so a batch sharded on
    its leading axis stays sharded); shapes are static, so this jits.
    """
    image_hw = images.shape[1:3]
    if mode == "whole":
        return resize_bilinear(apply_fn(images).astype(jnp.float32), image_hw)
    if mode != "slide":
        raise ValueError(f"unknown inference mode {mode!r}; expected 'whole' or 'slide'")
    windows = slide_windows(image_hw, crop_hw, stride_hw)
    batch, num_windows = images.shape[0], len(windows)
    crops = jnp.stack([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows], axis=1)
    window_hw = crops.shape[2:4]
    crop_logits = apply_fn(crops.reshape(batch * num_windows, *crops.shape[2:])).astype(jnp.float32)
    crop_logits = resize_bilinear(crop_logits, window_hw)
    crop_logits = crop_logits.reshape(batch, num_windows, *crop_logits.shape[1:])
    summed = jnp.zeros((batch, *image_hw, crop_logits.shape[-1]), jnp.float32)
    coverage = np.zeros(image_hw, np.float32)
    for index, (y1, y2, x1, x2) in enumerate(windows):
        summed = summed.at[:, y1:y2, x1:x2].add(crop_logits[:, index])
        coverage[y1:y2, x1:x2] += 1
    return summed / coverage[None, :, :, None]


def _segmentor_logits(model: nnx.Module, images: jax.Array) -> jax.Array:
    return model(images, train=False)


def make_eval_step(
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    eval_config: ml_collections.ConfigDict,
    num_classes: int,
    model_logits: Callable[[nnx.Module, jax.Array], jax.Array] = _segmentor_logits,
) -> Callable[[tuple[nnx.State, ...], dict[str, jax.Array]], dict[str, jax.Array]]:
    """The jitted evaluation of one global batch.

    `eval_step(variables, batch)`: `variables` are the states to `nnx.merge` with
    `graphdef`, e.g. `(params, batch_stats)`; `batch` holds 'image' uint8 (B, h, w, 3),
    'label' uint8 (B, H, W) and 'valid' bool (B,) (False for padding examples). Returns
    'confusion' (K, K) int32 summed over the global batch (replicated), 'num_examples'
    (valid ones) and 'prediction' uint8 (B, H, W) at the label size (data sharded, for
    pictures). `eval_config` is `config.eval` (mode, slide_crop_hw, slide_stride_hw).
    `model_logits(model, images)`: stride-4 logits of one window (the run's host's `eval_logits`).
    """
    batch_sharding = data_sharded(mesh)
    mode, crop_hw, stride_hw = eval_config.mode, tuple(eval_config.slide_crop_hw), tuple(eval_config.slide_stride_hw)

    def eval_step(variables, batch):
        variables = variables if isinstance(variables, (tuple, list)) else (variables,)
        model = nnx.merge(graphdef, *variables)
        images = jax.lax.with_sharding_constraint(normalize(batch["image"]), batch_sharding)
        logits = predict_logits(
            lambda x: model_logits(model, x), images, mode=mode, crop_hw=crop_hw, stride_hw=stride_hw
        )
        logits = resize_bilinear(logits, batch["label"].shape[1:3])
        predictions = jnp.argmax(logits, axis=-1)
        per_example = jax.vmap(lambda prediction, label, valid: confusion_matrix(prediction, label, num_classes, valid))
        confusion = per_example(predictions, batch["label"], batch["valid"])  # then one cross-device sum
        return {
            "confusion": confusion.sum(axis=0),
            "num_examples": jnp.sum(batch["valid"].astype(jnp.int32)),
            "prediction": predictions.astype(jnp.uint8),
        }

    return jax.jit(
        eval_step,
        out_shardings={"confusion": replicated(mesh), "num_examples": replicated(mesh), "prediction": batch_sharding},
    )


class Pictures(NamedTuple):
    """The first examples of an evaluation: images (N, h, w, 3) uint8 at the network
    input size, labels and predictions (N, H, W) uint8 at the label size."""

    images: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray


def evaluate(
    eval_step: Callable,
    variables: tuple[nnx.State, ...],
    eval_iterator: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh,
    class_names: Sequence[str],
    num_pictures: int = 4,
) -> dict[str, Any]:
    """Runs `eval_step` over every host batch of `eval_iterator` and summarises.

    The confusion is accumulated on the device (no host round trip per batch). Returns
    `summarize(...)` plus 'num_examples' and 'pictures': the first `num_pictures` valid
    examples as `Pictures(images, labels, predictions)` (NumPy), ready for
    `save_prediction_pictures(directory, step, *summary["pictures"])`. Every process
    must call this (the batches are global arrays).
    """
    total = np.zeros((len(class_names), len(class_names)), np.int64)
    device_total, device_pixels, num_examples, num_batches = None, 0, 0, 0
    pictures = {"image": [], "label": [], "prediction": []}
    for host_batch in eval_iterator:
        batch = global_batch(host_batch, mesh)
        for key in ("image", "label", "valid"):
            if key not in batch:
                raise KeyError(f"evaluation batch lacks {key!r}; it has {sorted(host_batch)}")
        if device_total is not None and device_pixels + batch["label"].size > _MAX_DEVICE_PIXELS:
            total += to_host(device_total)
            device_total, device_pixels = None, 0
        outputs = eval_step(variables, batch)
        device_total = outputs["confusion"] if device_total is None else device_total + outputs["confusion"]
        device_pixels += batch["label"].size
        num_examples = num_examples + outputs["num_examples"]
        num_batches += 1
        if len(pictures["image"]) < num_pictures:
            keep = to_host(batch["valid"])
            wanted = num_pictures - len(pictures["image"])
            shown = {"image": batch["image"], "label": batch["label"], "prediction": outputs["prediction"]}
            for key, value in shown.items():
                pictures[key].extend(to_host(value)[keep][:wanted])
    if num_batches == 0:
        raise ValueError("the evaluation iterator yielded no batches")
    total += to_host(device_total)
    summary = summarize(total, class_names)
    summary["num_examples"] = int(to_host(num_examples))
    summary["pictures"] = Pictures(*(np.stack(pictures[key]) if pictures[key] else np.zeros((0,)) for key in pictures))
    return summary


# ------------------------------------------------------------------ reporting


def format_iou_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table (IoU in %) for the log."""

    def percent(value: float) -> str:
        return f"{100 * value:6.2f}" if math.isfinite(value) else "   n/a"

    names = list(summary["class_names"])
    width = max(len(name) for name in names + ["pixel accuracy"]) + 2
    lines = [f"{'class':<{width}}   IoU", "-" * (width + 6)]
    lines += [f"{name:<{width}}{percent(value)}" for name, value in zip(names, summary["per_class_iou"])]
    lines.append("-" * (width + 6))
    lines.append(f"{f'mIoU ({len(names)})':<{width}}{percent(summary['miou'])}")
    for key, label in (("miou16", "mIoU16"), ("miou13", "mIoU13")):
        if key in summary:
            lines.append(f"{label:<{width}}{percent(summary[key])}")
    lines.append(f"{'pixel accuracy':<{width}}{percent(summary['pixel_accuracy'])}")
    return "\n".join(lines)


def write_eval_json(path: str, summary: Mapping[str, Any]) -> None:
    """Writes the summary (without pictures) as JSON, atomically; nan IoUs become null."""
    jsonio.write(path, {key: value for key, value in summary.items() if key != "pictures"})


def _nearest(label_map: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if label_map.shape == tuple(size_hw):
        return label_map
    return np.asarray(Image.fromarray(label_map.astype(np.uint8)).resize(size_hw[::-1], Image.NEAREST))


def save_prediction_pictures(
    directory: str,
    step: int,
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    palette: np.ndarray = CITYSCAPES_PALETTE,
) -> list[str]:
    """One PNG per example: image | ground truth | prediction, in `palette` ((K, 3) uint8,
    the dataset's `ClassList.palette`; ignore is black), at the image's size. Returns the
    paths written."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for index, (image, label, prediction) in enumerate(zip(images, labels, predictions)):
        image_hw = image.shape[:2]
        panels = [np.asarray(image, np.uint8), colorize(_nearest(label, image_hw), palette)]
        panels.append(colorize(_nearest(prediction, image_hw), palette))
        path = os.path.join(directory, f"step_{step:06d}_{index:02d}.png")
        Image.fromarray(np.concatenate(panels, axis=1)).save(path)
        paths.append(path)
    return paths
