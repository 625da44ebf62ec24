r"""Prepares one dataset as TFDS array_record files, then prints the conversion report.

  python -m data_pipelines.prepare --dataset=gta5 --manual_dir=/data/gta5 --data_dir=data/tfds
  python -m data_pipelines.prepare --dataset=cityscapes --manual_dir=/data/cityscapes --data_dir=data/tfds
  python -m data_pipelines.prepare --dataset=synthetic_city/target --data_dir=data/tfds

Datasets: gta5, synthia, cityscapes, image_folder[/<name>] (from --manual_dir) and
synthetic_city/{source,target}[_<H>x<W>] (generated). The report lists per split the
images written, every skipped file with its reason, every label resized to its image,
every file with unknown label ids (mapped to 255), and the label histogram. It is also
kept in the dataset's metadata.json, so preparing an existing dataset prints it again;
`--overwrite` rebuilds it instead (e.g. after its files were damaged on disk).

A missing, empty or wrongly laid-out --manual_dir is refused in one line naming the layout
expected, before anything is written (exit 2); a preparation that fails later removes what
it wrote, so `data_dir` stays as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from data_pipelines import builders

_DATASET = flags.DEFINE_string(
    "dataset", None, "gta5 | synthia | cityscapes | image_folder[/<name>] | synthetic_city/<config>"
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "the dataset as downloaded (not needed for synthetic_city)"
)
_DATA_DIR = flags.DEFINE_string("data_dir", "data/tfds", "where the prepared datasets live")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "conversion processes (0: none)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "rebuild the dataset even if it is prepared")
_MAX_LISTED = flags.DEFINE_integer(
    "max_listed", 50, "file names listed per report category (all are in metadata.json)"
)


def prepare(
    dataset: str, data_dir: str, manual_dir: str | None, num_workers: int = 0, *, overwrite: bool = False
) -> dict:
    """Builds `dataset` under `data_dir` unless it exists (or always, with `overwrite`); returns
    its metadata (the report). Raises ValueError (`builders.LayoutError` for the source) in one
    line; `data_dir` is then as it was."""
    builder = builders.make_builder(dataset, data_dir, num_workers=num_workers)
    if isinstance(builder, builders.ManualSegmentationBuilder):
        if not manual_dir:
            raise builders.LayoutError(
                f"--manual_dir is required for {dataset}: the folder holding {builder.EXPECTED}"
            )
        builder.find_sources(manual_dir)
    modes = tfds.download.GenerateMode
    mode = modes.REUSE_CACHE_IF_EXISTS if overwrite else modes.REUSE_DATASET_IF_EXISTS
    tfds.disable_progress_bar()  # our own per-file bar is in the builder
    with _removing_new_entries_on_failure(data_dir, [builder.name, "downloads"]):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
        )
    return dict(builder.info.metadata)


@contextlib.contextmanager
def _removing_new_entries_on_failure(data_dir: str, names: list[str]):
    """On an exception, removes what appeared under `data_dir`/<name> for `names` (and
    `data_dir` itself, if this created it): TFDS leaves its folders behind."""
    existed = os.path.isdir(data_dir)
    before = {name: _entries(os.path.join(data_dir, name)) for name in names}
    try:
        yield
    except BaseException:
        for name in names:
            for path in sorted(_entries(os.path.join(data_dir, name)) - before[name], reverse=True):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.lexists(path):
                    os.remove(path)
        if not existed and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)
        raise


def _entries(root: str) -> set[str]:
    """`root` and every path below it (empty when it does not exist)."""
    if not os.path.lexists(root):
        return set()
    found = {root}
    for folder, subfolders, files in os.walk(root):
        found.update(os.path.join(folder, name) for name in subfolders + files)
    return found


def format_report(dataset: str, metadata: dict, max_listed: int = 50) -> str:
    """The conversion report as text: one block per split."""
    class_names = metadata["class_names"]
    lines = []
    for split, report in metadata["splits"].items():
        lines.append(f"{dataset} [{split}]: {report['written']} images written")

        def listing(title, items, describe):
            lines.append(f"  {title}: {len(items)}")
            for item in items[:max_listed]:
                lines.append(f"    {item[0]}: {describe(item)}")
            if len(items) > max_listed:
                lines.append(f"    ... {len(items) - max_listed} more in metadata.json")

        listing("skipped", report["skipped"], lambda item: item[1])
        listing(
            "label size fixed (nearest resize to the image)",
            report["size_fixes"],
            lambda item: f"label {item[1][0]}x{item[1][1]} -> image {item[2][0]}x{item[2][1]}",
        )
        listing(
            "unknown label ids mapped to 255",
            report["unknown_ids"],
            lambda item: ", ".join(
                f"id {k}: {v} px" for k, v in sorted(item[1].items(), key=lambda kv: int(kv[0]))
            ),
        )
        pixels = np.array(report["class_pixels"] + [report["ignore_pixels"]], np.float64)
        total = max(pixels.sum(), 1.0)
        lines.append("  label histogram (pixels, share):")
        for name, count in zip(list(class_names) + ["ignore (255)"], pixels):
            lines.append(f"    {name:>16s} {int(count):>14d} {100 * count / total:7.3f} %")
    return "\n".join(lines)


def main(argv):
    del argv
    try:
        metadata = prepare(
            _DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value, _NUM_WORKERS.value, overwrite=_OVERWRITE.value
        )
    except ValueError as error:  # an unknown dataset name, a missing, empty or wrongly laid-out source
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_report(_DATASET.value, metadata, _MAX_LISTED.value))
    print(f"prepared: {builders.prepared_dir(_DATASET.value, _DATA_DIR.value)}")


if __name__ == "__main__":
    flags.mark_flag_as_required("dataset")
    app.run(main)
