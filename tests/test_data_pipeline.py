"""The grain pipeline: determinism, sharding, resuming, aligned crops, rare class sampling, evaluation."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import prepare
from t2s_jax import data
from t2s_jax.config import default_config
from t2s_jax.classes import CITYSCAPES_PALETTE
from t2s_jax.data import pipeline, rcs, sources, transforms

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

HW = (40, 56)
NUM_TRAIN, NUM_VAL = 12, 7


def coordinate_example(index: int):
    """Pixels encode (row, column, example index); the label is a function of all three."""
    rows, cols = np.mgrid[0 : HW[0], 0 : HW[1]]
    image = np.stack([rows, cols, np.full(HW, index)], -1).astype(np.uint8)
    return image, label_of(image)


def label_of(image: np.ndarray) -> np.ndarray:
    rows, cols, index = (image[..., k].astype(np.int64) for k in range(3))
    return ((rows // 8 + cols // 8 + index) % 19).astype(np.uint8)


def write_folder(root, classes, splits):
    """An image_folder manual dir: splits = {split: [(image, label), ...]}."""
    os.makedirs(root)
    with open(f"{root}/classes.txt", "w") as f:
        f.write("\n".join(classes))
    for split, examples in splits.items():
        for kind in ("images", "labels"):
            os.makedirs(f"{root}/{kind}/{split}")
        for i, (image, label) in enumerate(examples):
            Image.fromarray(image).save(f"{root}/images/{split}/{i:03d}.png")
            Image.fromarray(label).save(f"{root}/labels/{split}/{i:03d}.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    classes = [f"class{c}" for c in range(19)]
    write_folder(f"{root}/coords", classes, {
        "train": [coordinate_example(i) for i in range(NUM_TRAIN)],
        "val": [coordinate_example(100 + i) for i in range(NUM_VAL)],
    })  # fmt: skip
    # Class 0 everywhere, class 1 in the right half; class 2 (rare) only as an 8x8 block in 2 of 20.
    rare = []
    for i in range(20):
        label = np.zeros((32, 32), np.uint8)
        label[:, 16:] = 1
        if i in (4, 13):
            label[20:28, 4:12] = 2
        rare.append((np.full((32, 32, 3), i, np.uint8), label))
    write_folder(f"{root}/rare", classes[:3], {"train": rare})
    for name in ("coords", "rare"):
        prepare.prepare(f"image_folder/{name}", f"{root}/tfds", f"{root}/{name}")
    return f"{root}/tfds"


def config_for(data_dir, **overrides):
    config = default_config().data
    config.data_dir = data_dir
    config.source = config.target = config.eval_dataset = "image_folder/coords"
    config.eval_split = "val"
    config.source_resize_hw = config.target_resize_hw = HW
    config.crop_hw = (24, 32)
    config.rcs.enabled = False
    config.batch_size = 4
    config.num_workers = 0
    for key, value in overrides.items():
        config[key] = value
    return config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_contract(data_dir):
    batch = next(data.make_train_iterator(config_for(data_dir), seed=0, process_index=0, process_count=2))
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "source_image": ((2, 24, 32, 3), np.uint8), "source_label": ((2, 24, 32), np.uint8),
        "target_image": ((2, 24, 32, 3), np.uint8), "target_label": ((2, 24, 32), np.uint8),
    }  # fmt: skip
    no_target = config_for(data_dir, target="")
    assert set(next(data.make_train_iterator(no_target, seed=0, process_index=0, process_count=1))) == {
        "source_image",
        "source_label",
    }
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by 3"):
        data.make_train_iterator(config_for(data_dir), seed=0, process_index=0, process_count=3)


def test_same_seed_same_batches(data_dir):
    config = config_for(data_dir)
    first = take(data.make_train_iterator(config, seed=3, process_index=0, process_count=1), 4)
    assert_same_batches(
        first, take(data.make_train_iterator(config, seed=3, process_index=0, process_count=1), 4)
    )
    other = take(data.make_train_iterator(config, seed=4, process_index=0, process_count=1), 4)
    assert any(not np.array_equal(a["source_image"], b["source_image"]) for a, b in zip(first, other))


def global_batches(config, seed, process_count, num_batches, states=None):
    """Batches 0..n-1 (or from `states`, one per process) of every process, stacked in
    process order as `jax.make_array_from_process_local_data` assembles them; and each
    process's iterator state after them."""
    iterators = [
        data.make_train_iterator(config, seed=seed, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    if states is not None:
        for iterator, state in zip(iterators, states):
            iterator.set_state(state)
    per_process = [take(iterator, num_batches) for iterator in iterators]
    stacked = [
        {key: np.concatenate([batches[k][key] for batches in per_process]) for key in per_process[0][k]}
        for k in range(num_batches)
    ]
    return stacked, [iterator.get_state() for iterator in iterators]


@pytest.mark.parametrize("rare_class_sampling", [False, True])
def test_global_batches_do_not_depend_on_the_process_count(data_dir, rare_class_sampling):
    config = config_for(data_dir, flip_prob=0.5, cat_max_ratio=0.75)
    config.rcs.enabled = rare_class_sampling
    config.rcs.min_pixels, config.rcs.min_crop_pixels = 10, 5
    reference, _ = global_batches(config, seed=5, process_count=1, num_batches=7)
    for process_count in (2, 4):
        first, states = global_batches(config, seed=5, process_count=process_count, num_batches=4)
        assert_same_batches(first, reference[:4])
        # Resumed in fresh iterators from each process's saved state: the next batches.
        resumed, _ = global_batches(config, seed=5, process_count=process_count, num_batches=3, states=states)
        assert_same_batches(resumed, reference[4:])
    ids = [int(image[0, 0, 2]) for batch in reference for image in batch["source_image"]]
    assert len(set(ids)) > 4  # a real stream, not one example repeated


def test_each_epoch_is_a_new_permutation_of_the_split(data_dir):
    batches, _ = global_batches(config_for(data_dir), seed=0, process_count=2, num_batches=6)
    for domain in ("source", "target"):
        ids = [int(image[0, 0, 2]) for batch in batches for image in batch[f"{domain}_image"]]
        first, second = ids[:NUM_TRAIN], ids[NUM_TRAIN:]
        assert sorted(first) == sorted(second) == list(range(NUM_TRAIN))  # every example once per epoch
        assert first != sorted(first) and first != second  # shuffled, and reshuffled per epoch


def test_a_process_transforms_only_its_own_examples(data_dir, monkeypatch):
    crops = []
    crop_and_flip = transforms.crop_and_flip
    monkeypatch.setattr(transforms, "crop_and_flip", lambda *args: crops.append(1) or crop_and_flip(*args))
    config = config_for(data_dir)
    take(data.make_train_iterator(config, seed=0, process_index=1, process_count=4), 8)
    # 2 domains x 1 example per batch, plus what the read threads computed ahead (how far
    # ahead depends on thread timing: up to twice the nominal); every process's examples
    # would be 4x as many.
    read_ahead = pipeline._PREFETCH_BATCHES + pipeline._READ_THREADS
    assert 16 <= len(crops) <= 2 * (8 + 2 * read_ahead) < 2 * 4 * 8


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_continues_exactly(data_dir, workers):
    config = config_for(data_dir, num_workers=workers)
    iterator = data.make_train_iterator(config, seed=1, process_index=0, process_count=1)
    take(iterator, 5)
    state = iterator.get_state()
    expected = take(iterator, 4)
    restored = data.make_train_iterator(config, seed=1, process_index=0, process_count=1)
    restored.set_state(state)
    assert_same_batches(take(restored, 4), expected)
    if workers:  # workers only change where batches are computed, not what they hold
        in_process = data.make_train_iterator(config_for(data_dir), seed=1, process_index=0, process_count=1)
        take(in_process, 5)
        assert_same_batches(take(in_process, 4), expected)


def test_crops_stay_aligned_and_flip_together(data_dir):
    config = config_for(data_dir, flip_prob=0.5, cat_max_ratio=0.75)
    flips = 0
    for batch in take(data.make_train_iterator(config, seed=2, process_index=0, process_count=1), 10):
        for domain in ("source", "target"):
            for image, label in zip(batch[f"{domain}_image"], batch[f"{domain}_label"]):
                np.testing.assert_array_equal(label, label_of(image))
                rows, cols = image[..., 0].astype(int), image[..., 1].astype(int)
                assert (np.diff(rows, axis=0) == 1).all() and (np.diff(rows, axis=1) == 0).all()
                step = np.diff(cols, axis=1)
                assert (step == 1).all() or (step == -1).all()
                flips += int(step[0, 0] == -1)
    assert 0 < flips < 80


def test_rare_class_sampling_raises_the_share_of_rare_crops(data_dir):
    def rare_share(enabled):
        config = config_for(data_dir, crop_hw=(16, 16), batch_size=8, target="")
        config.source = "image_folder/rare"
        config.source_resize_hw = (32, 32)
        config.rcs.enabled = enabled
        config.rcs.min_pixels = 10
        config.rcs.min_crop_pixels = 5
        batches = take(data.make_train_iterator(config, seed=0, process_index=0, process_count=1), 8)
        labels = np.concatenate([b["source_label"] for b in batches])
        return np.mean([(label == 2).any() for label in labels])

    uniform, rare = rare_share(False), rare_share(True)
    assert uniform < 0.2
    assert rare > 0.8


def test_rare_class_probabilities_follow_the_softmax():
    class_pixels = np.array([900, 90, 10, 0])
    examples = (
        np.array([[0, 500], [1, 400]]),
        np.array([[0, 90]]),
        np.array([[1, 6], [2, 4]]),
        np.zeros((0, 2), int),
    )
    sampler = rcs.make_rare_class_sampler(class_pixels, examples, temperature=0.05, min_pixels=5)
    frequency = class_pixels[:3] / 1000
    expected = np.exp((1 - frequency) / 0.05) / np.exp((1 - frequency) / 0.05).sum()
    np.testing.assert_array_equal(sampler.classes, [0, 1, 2])
    np.testing.assert_allclose(sampler.probabilities, expected)
    np.testing.assert_array_equal(sampler.candidates[2], [1])  # 4 pixels are not > 5
    draws = [sampler.draw(np.random.default_rng(i)) for i in range(400)]
    assert all(index == 1 for cls, index in draws if cls == 2)
    np.testing.assert_allclose(np.bincount([c for c, _ in draws], minlength=3) / 400, expected, atol=0.06)


@pytest.mark.parametrize("max_examples, expected", [(0, NUM_VAL), (5, 5)])
def test_eval_covers_each_image_once_in_split_order_on_any_process_count(data_dir, max_examples, expected):
    config = config_for(data_dir, eval_batch_size=4, eval_resize_hw=(20, 40), max_eval_examples=max_examples)
    assert data.num_eval_examples(config) == expected
    for process_count in (1, 2, 3, 4):
        per_process = [
            list(data.make_eval_iterator(config, process_index=p, process_count=process_count))
            for p in range(process_count)
        ]
        rows = max(4 // process_count, 1)
        global_size = rows * process_count
        assert all(len(batches) == -(-expected // global_size) for batches in per_process)
        ids = []
        for step in range(len(per_process[0])):
            blocks = [batches[step] for batches in per_process]
            for batch in blocks:
                assert batch["image"].shape == (rows, 20, 28, 3)  # 40x56 fit into 20x40 keeps the ratio
                assert batch["label"].shape == (rows, *HW) and batch["valid"].dtype == bool
            # The global batch: the blocks in process order, as the batch sharding assembles them.
            images, labels, valid = (np.concatenate([b[key] for b in blocks]) for key in ("image", "label", "valid"))
            for position, (image, label, is_valid) in enumerate(zip(images, labels, valid), step * global_size):
                assert is_valid == (position < expected)
                if is_valid:
                    ids.append(int(image[0, 0, 2]) - 100)
                    np.testing.assert_array_equal(label, coordinate_example(ids[-1] + 100)[1])
                else:
                    assert (label == 255).all()
        assert ids == list(range(expected)), process_count  # split order, whatever the process count


def test_class_names_come_from_the_dataset(data_dir):
    assert data.class_names("image_folder/rare", data_dir) == ("class0", "class1", "class2")
    classes = data.class_list("image_folder/rare", data_dir)
    assert classes.names == ("class0", "class1", "class2") and not classes.is_cityscapes
    np.testing.assert_array_equal(classes.palette, [(128, 0, 0), (0, 128, 0), (128, 128, 0)])


def test_the_class_count_is_checked_against_every_dataset_of_the_run(data_dir):
    config = default_config()
    config.data = config_for(data_dir, source="image_folder/rare")
    with pytest.raises(ValueError, match=(
        r"^config.model.num_classes=19 but config.data.source='image_folder/rare' has 3 classes; "
        r"set --config.model.num_classes=3$"
    )):  # fmt: skip
        data.check_classes(config)
    # Evaluation alone needs only the eval dataset (coords: 19 classes) to agree.
    assert data.check_classes(config, training=False).names == tuple(f"class{c}" for c in range(19))
    config.model.num_classes = 3
    config.data.target = config.data.eval_dataset = "image_folder/rare"
    config.uda.fd_classes = (1, 2)
    assert data.check_classes(config).names == ("class0", "class1", "class2")
    config.uda.fd_classes = (2, 3)
    with pytest.raises(ValueError, match=r"fd_classes=\(2, 3\) has ids outside the 3 classes"):
        data.check_classes(config)


# ------------------------------------------------------------------------ host transforms


@pytest.mark.parametrize(
    "hw, max_hw, expected",
    [((1052, 1914), (720, 1280), (704, 1280)), ((1024, 2048), (512, 1024), (512, 1024)),
     ((760, 1280), (760, 1280), (760, 1280)), ((100, 50), (64, 64), (64, 32)),
     # HRDA's high-resolution configs: GTA5 into 1440x2560, SYNTHIA into 1520x2560, Cityscapes kept.
     ((1052, 1914), (1440, 2560), (1407, 2560)), ((760, 1280), (1520, 2560), (1520, 2560)),
     ((1024, 2048), (1024, 2048), (1024, 2048))],
)  # fmt: skip
def test_fit_size_keeps_the_ratio_with_mmcv_rounding(hw, max_hw, expected):
    assert transforms.fit_size(hw, max_hw) == expected


def _mmcv_rescale_size(w, h, scale):
    """mmcv.rescale_size((w, h), scale) for a tuple scale, typed from mmcv 1.x."""
    max_long_edge, max_short_edge = max(scale), min(scale)
    scale_factor = min(max_long_edge / max(h, w), max_short_edge / min(h, w))
    return int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)


def test_fit_size_is_mmcv_rescale_size():
    rng = np.random.default_rng(0)
    for h, w, bound_h, bound_w in rng.integers(20, 3000, (500, 4)):  # both orientations
        expected_w, expected_h = _mmcv_rescale_size(int(w), int(h), (int(bound_w), int(bound_h)))
        assert transforms.fit_size((int(h), int(w)), (int(bound_h), int(bound_w))) == (expected_h, expected_w)
    assert transforms.fit_size((1914, 1052), (720, 1280)) == (1280, 704)  # portrait: the long bound is 1280


def test_image_resize_is_opencv_bilinear_without_antialiasing():
    # A 2x shrink with half-pixel centres samples between 2x2 pixels: their mean (uint8 rounding).
    image = np.random.default_rng(1).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    box_mean = image.reshape(4, 2, 5, 2, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_allclose(transforms.resize_image(image, (4, 5)), box_mean, atol=1)
    assert transforms.resize_image(image, (8, 10)) is image


def test_label_resize_is_nearest():
    label = np.random.default_rng(2).choice(np.array([0, 3, 7, 255], np.uint8), size=(9, 13))
    for hw in ((4, 6), (5, 7), (20, 31), (9, 13)):
        out = transforms.resize_label(label, hw)
        assert out.shape == hw and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 3, 7, 255}
    np.testing.assert_array_equal(transforms.resize_label(label[:8, :12], (4, 6)), label[:8:2, :12:2])


def test_cat_max_ratio_redraws_until_the_crop_is_mixed():
    label = np.zeros((10, 100), np.uint8)
    label[:, 90:] = 1  # only crops reaching column 90 hold two classes
    crop = (10, 20)

    def good(offset):
        counts = np.bincount(label[:, offset[1] : offset[1] + 20].ravel(), minlength=2)
        return counts.min() > 0 and counts.max() / counts.sum() < 0.75

    rng_draws = [
        transforms.cat_max_ratio_offset(np.random.default_rng(s), label, crop, 0.75, 50) for s in range(20)
    ]
    assert all(good(offset) for offset in rng_draws)
    first = [
        transforms.cat_max_ratio_offset(np.random.default_rng(s), label, crop, 0.75, 0) for s in range(20)
    ]
    assert not all(good(offset) for offset in first)  # no retries: the first draw is kept


def test_small_images_are_padded_with_ignore():
    image, label = np.ones((3, 4, 3), np.uint8), np.zeros((3, 4), np.uint8)
    padded_image, padded_label = transforms.pad_to(image, label, (5, 4))
    assert padded_image.shape == (5, 4, 3) and (padded_image[3:] == 0).all()
    assert (padded_label[3:] == 255).all() and (padded_label[:3] == 0).all()


# ------------------------------------------------------------------------ preparation on demand


def test_ensure_prepared_builds_synthetic_and_names_the_command_for_real_data(tmp_path):
    path = data.ensure_prepared("synthetic_city/source_16x32", str(tmp_path))
    assert os.path.exists(f"{path}/dataset_info.json")
    assert data.class_names("synthetic_city/source_16x32", str(tmp_path))[10] == "sky"
    classes = data.class_list("synthetic_city/source_16x32", str(tmp_path))
    assert classes.is_cityscapes
    np.testing.assert_array_equal(classes.palette, CITYSCAPES_PALETTE)
    # Prepared before palettes were stored: the Cityscapes classes still get their palette.
    metadata_path = f"{path}/metadata.json"
    with open(metadata_path) as f:
        metadata = json.load(f)
    del metadata["palette"]
    with open(metadata_path, "w") as f:
        json.dump(metadata, f)
    sources._builder.cache_clear()
    old = data.class_list("synthetic_city/source_16x32", str(tmp_path))
    np.testing.assert_array_equal(old.palette, CITYSCAPES_PALETTE)
    with pytest.raises(
        FileNotFoundError, match="python -m data_pipelines.prepare --dataset=gta5 --manual_dir="
    ):
        data.ensure_prepared("gta5", str(tmp_path))


# ------------------------------------------------------------------------ damaged prepared data


def damaged_copy(data_dir: str, destination: str) -> str:
    """A copy of `data_dir` in which every image_folder/coords train record is damaged."""
    shutil.copytree(data_dir, destination)
    (path,) = glob.glob(f"{destination}/segmentation_folder/coords/*/segmentation_folder-train.array_record-*")
    content = bytearray(open(path, "rb").read())
    # Half of every 128 bytes: even a record of a few hundred bytes is hit, whichever is read first.
    for start in range(128, len(content) - 64, 128):
        content[start : start + 64] = bytes(b ^ 0xFF for b in content[start : start + 64])
    open(path, "wb").write(content)
    sources._builder.cache_clear()
    split = sources.open_split("image_folder/coords", "train", destination)
    for index in range(len(split)):
        with pytest.raises(data.DamagedDataError):
            split[index]
    return destination


DAMAGED = (
    r"dataset 'image_folder/coords' split 'train' under '{data_dir}' is damaged on disk \(example \d+: "
    r"Corrupted Riegeli/records file: .*\); rebuild it with: python -m data_pipelines.prepare "
    r"--dataset=image_folder/coords --manual_dir=<the downloaded image_folder/coords> --data_dir={data_dir} --overwrite"
)


def test_a_damaged_record_names_the_dataset_and_the_command_even_from_a_worker(data_dir, tmp_path):
    damaged = damaged_copy(data_dir, str(tmp_path / "tfds"))
    config = config_for(damaged, num_workers=1)  # read in a grain worker process
    iterator = data.make_train_iterator(config, seed=0, process_index=0, process_count=1)
    with pytest.raises(data.DamagedDataError) as error:
        next(iterator)
    assert re.fullmatch(DAMAGED.format(data_dir=re.escape(damaged)), str(error.value))


def test_a_run_on_damaged_data_stops_in_one_line(data_dir, tmp_path):
    damaged = damaged_copy(data_dir, str(tmp_path / "tfds"))
    overrides = {"data.source": "image_folder/coords", "data.target": "image_folder/coords",
                 "data.eval_dataset": "image_folder/coords", "data.source_resize_hw": HW,
                 "data.target_resize_hw": HW, "data.eval_resize_hw": HW, "data.crop_hw": (32, 32),
                 "train.num_steps": 2}  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=tiny.xla_flags(1))
    result = subprocess.run(
        [sys.executable, "-m", "t2s_jax.main", f"--workdir={tmp_path / 'run'}",
         *tiny.as_flags(damaged, "source_only", **overrides)],
        cwd=tiny.REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch("error: " + DAMAGED.format(data_dir=re.escape(damaged)), last), result.stderr[-3000:]
