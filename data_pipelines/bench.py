r"""Input pipeline throughput at GTA5 size: how many host cores one accelerator needs.

  python -m data_pipelines.bench --workers=0,2,4 --batches=40 --step_ms=70

Writes `--num_files` GTA5-layout PNG pairs (1914x1052 synthetic street scenes in the
photographic target style, labels as Cityscapes label ids) into a temporary manual dir,
prepares them with the gta5 builder (timed), then runs the training pipeline's source
stream as `configs` set it for GTA5 (fit into 720x1280 -> 704x1280, rare class sampling,
cat_max_ratio 512x512 crops, flip) with each worker count and prints examples/s. Real
GTA5 frames are JPEG-like photographs saved as PNG; their decode cost is similar.

From the in-process run (`--workers` must include 0) it also prints the host cores that keep
one accelerator fed at `--step_ms` per step: `--examples_per_step` examples (a T2S-DA step
reads B = 2 source + 2 target) each costing the measured GTA5 CPU time, an upper bound for
the cheaper Cityscapes target crops.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from data_pipelines import builders, convert, labels, synthetic_city
from t2s_jax.config import default_config

_WORKERS = flags.DEFINE_list("workers", ["0", "2", "4"], "grain worker processes to compare")
_BATCHES = flags.DEFINE_integer("batches", 40, "batches timed per setting")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "source images per batch")
_NUM_FILES = flags.DEFINE_integer("num_files", 48, "GTA5-size files written")
_NUM_SCENES = flags.DEFINE_integer("num_scenes", 6, "distinct scenes rendered (files repeat them)")
_STEP_MS = flags.DEFINE_float("step_ms", 70.0, "accelerator step time the host must keep up with")
_EXAMPLES_PER_STEP = flags.DEFINE_integer("examples_per_step", 4, "examples a step consumes (all domains)")
_GTA5_HW = (1052, 1914)
_WARMUP_BATCHES = 5


def write_gta5_tree(manual_dir: str, num_files: int, num_scenes: int) -> None:
    """GTA5 layout: images/00000.png (RGB) and labels/00000.png (Cityscapes label ids)."""
    train_to_label_id = np.zeros(256, np.uint8)  # ignore -> 0 'unlabeled'
    for label_id, train_id in labels.CITYSCAPES_LABEL_ID_TO_TRAIN_ID.items():
        train_to_label_id[train_id] = label_id
    os.makedirs(os.path.join(manual_dir, "images"))
    os.makedirs(os.path.join(manual_dir, "labels"))
    scenes = []
    for i in range(num_scenes):
        image, label = synthetic_city.generate_example(0, "target", "train", i, _GTA5_HW)
        scenes.append((convert.encode_png(image), convert.encode_png(train_to_label_id[label])))
    for i in range(num_files):
        image_png, label_png = scenes[i % num_scenes]
        with open(os.path.join(manual_dir, "images", f"{i:05d}.png"), "wb") as f:
            f.write(image_png)
        with open(os.path.join(manual_dir, "labels", f"{i:05d}.png"), "wb") as f:
            f.write(label_png)


def pipeline_throughput(
    data_dir: str, num_workers: int, num_batches: int, batch_size: int
) -> tuple[float, float]:
    """(source examples per second, CPU seconds of this process per example) of the GTA5
    training stream after warm-up; the CPU time excludes worker processes."""
    from t2s_jax import data  # noqa: PLC0415 - keeps `--help` fast

    config = default_config().data
    config.data_dir = data_dir
    config.source, config.target = "gta5", ""
    config.batch_size = batch_size
    config.num_workers = num_workers
    iterator = data.make_train_iterator(config, seed=0, process_index=0, process_count=1)
    for _ in range(_WARMUP_BATCHES):  # worker start-up; then the read-ahead buffers are drained
        next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(iterator)
    examples = num_batches * batch_size
    return examples / (time.perf_counter() - start), (time.process_time() - cpu_start) / examples


def host_cores_needed(cpu_s_per_example: float, examples_per_step: int, step_ms: float) -> float:
    """Host cores that feed one accelerator: the CPU time of a step's examples / the step time."""
    return cpu_s_per_example * examples_per_step / (step_ms / 1000.0)


def main(argv):
    del argv
    root = tempfile.mkdtemp(prefix="t2s_bench_")
    try:
        manual_dir, data_dir = os.path.join(root, "gta5"), os.path.join(root, "tfds")
        start = time.perf_counter()
        write_gta5_tree(manual_dir, _NUM_FILES.value, _NUM_SCENES.value)
        print(f"wrote {_NUM_FILES.value} GTA5-size pairs in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        builder = builders.make_builder("gta5", data_dir, num_workers=os.cpu_count() or 1)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        elapsed = time.perf_counter() - start
        print(f"prepared with {os.cpu_count()} processes: {_NUM_FILES.value / elapsed:.1f} images/s")
        rows = []
        for workers in map(int, _WORKERS.value):
            rate, cpu = pipeline_throughput(data_dir, workers, _BATCHES.value, _BATCH_SIZE.value)
            rows.append((workers, rate))
            print(f"workers={workers}: {rate:.2f} examples/s", flush=True)
            if workers == 0:
                cores = host_cores_needed(cpu, _EXAMPLES_PER_STEP.value, _STEP_MS.value)
                print(
                    f"  CPU per example in-process: {1000 * cpu:.0f} ms (one core: {1 / cpu:.1f} examples/s)\n"
                    f"  host cores per accelerator at {_STEP_MS.value:g} ms/step and "
                    f"{_EXAMPLES_PER_STEP.value} examples/step: {cores:.1f}"
                )
        print(
            f"\nhost: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
            "1914x1052 PNG -> 1280x704 -> RCS + cat_max_ratio 512x512 crop + flip"
        )
        print("| workers | source examples/s |\n|---|---|")
        for workers, rate in rows:
            print(f"| {workers} | {rate:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
