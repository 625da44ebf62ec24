"""HRDA's pseudo-label validity (v2, `data.pseudo_margins`): a map built on each stored target
image and carried through its resize, padding, crop and flip; exclusive with DAFormer's rows."""

import os
import sys

import numpy as np
import pytest

from data_pipelines import prepare
from t2s_jax import config as schema
from t2s_jax import data, main
from t2s_jax.config import default_config
from t2s_jax.data import transforms

sys.path.insert(0, os.path.dirname(__file__))
from test_data_pipeline import assert_same_batches, global_batches, take, write_folder  # noqa: E402

# Stored widths and heights: row * width + column < 240 fits a label, so every pixel of a
# label names its stored coordinates, whatever nearest resize, crop and flip it went through.
STORED_HEIGHT = {20: 12, 16: 15}
MARGINS = (2, 3, 1, 4)  # top, bottom, left, right
NUM_TRAIN = 8


def cells_example(hw):
    """Image (row, column, stored width); label row * width + column."""
    rows, cols = np.mgrid[0 : hw[0], 0 : hw[1]]
    image = np.stack([rows, cols, np.full(hw, hw[1])], -1).astype(np.uint8)
    return image, (rows * hw[1] + cols).astype(np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("margins")
    examples = [cells_example((12, 20) if i % 2 else (15, 16)) for i in range(NUM_TRAIN)]
    write_folder(f"{root}/cells", [f"cell{c}" for c in range(240)], {"train": examples})
    prepare.prepare("image_folder/cells", f"{root}/tfds", f"{root}/cells")
    return f"{root}/tfds"


def config_for(data_dir, resize_hw, crop_hw, margins=MARGINS):
    config = default_config().data
    config.data_dir = data_dir
    config.source = config.target = "image_folder/cells"
    config.source_resize_hw = config.target_resize_hw = resize_hw
    config.crop_hw = crop_hw
    config.rcs.enabled = False
    config.batch_size = 4
    config.num_workers = 0
    config.pseudo_margins = margins
    return config


def batches(config, num_batches, seed=0):
    return take(data.make_train_iterator(config, seed=seed, process_index=0, process_count=1), num_batches)


def inside_margins(rows, cols, height, width):
    top, bottom, left, right = MARGINS
    return (rows >= top) & (rows < height - bottom) & (cols >= left) & (cols < width - right)


# (target_resize_hw, crop_hw): 12x20 kept, 15x16 shrunk to 12x13; 18x30 (x1.5) and 18x19
# (x1.2); 9x15 and 9x10, padded to the 14-wide crop; both padded to a 14x24 crop.
RESIZES = [((12, 20), (8, 12)), ((18, 30), (10, 16)), ((9, 15), (8, 14)), ((12, 20), (14, 24))]


@pytest.mark.parametrize("resize_hw, crop_hw", RESIZES)
def test_validity_follows_the_resize_crop_and_flip_of_its_image(data_dir, resize_hw, crop_hw):
    flips = margin_crops = 0
    for batch in batches(config_for(data_dir, resize_hw, crop_hw), 6):
        assert batch["target_valid"].shape == (4, *crop_hw) and batch["target_valid"].dtype == np.uint8
        assert "source_valid" not in batch
        for image, label, valid in zip(batch["target_image"], batch["target_label"], batch["target_valid"]):
            width = int(image[..., 2].max())  # padding is 0
            rows, cols = np.divmod(label.astype(int), width)
            stored = label != 255  # not padding
            expected = stored & inside_margins(rows, cols, STORED_HEIGHT[width], width)
            np.testing.assert_array_equal(valid, expected.astype(np.uint8))
            if width == 20 and resize_hw == (12, 20):  # the stored size: the image's own coordinates
                image_rows, image_cols = image[..., 0].astype(int), image[..., 1].astype(int)
                image_inside = stored & inside_margins(image_rows, image_cols, 12, 20)
                np.testing.assert_array_equal(valid, image_inside.astype(np.uint8))
            first_row = cols[0][stored[0]]
            flips += int(first_row[0] > first_row[-1])
            margin_crops += int((valid[stored] == 0).any())
    assert 0 < flips < 24 and margin_crops > 0


def test_without_margins_the_batches_are_unchanged(data_dir):
    """() adds no key and draws nothing: every other field is the same with and without."""
    without = batches(config_for(data_dir, (18, 30), (10, 16), margins=()), 4, seed=3)
    with_margins = batches(config_for(data_dir, (18, 30), (10, 16)), 4, seed=3)
    assert all(set(b) == {"source_image", "source_label", "target_image", "target_label"} for b in without)
    assert_same_batches(without, [{k: v for k, v in b.items() if k != "target_valid"} for b in with_margins])


def test_validity_batches_do_not_depend_on_the_process_count_and_resume_exactly(data_dir):
    config = config_for(data_dir, (18, 30), (10, 16))
    reference, _ = global_batches(config, seed=5, process_count=1, num_batches=5)
    first, states = global_batches(config, seed=5, process_count=2, num_batches=3)
    assert_same_batches(first, reference[:3])
    resumed, _ = global_batches(config, seed=5, process_count=2, num_batches=2, states=states)
    assert_same_batches(resumed, reference[3:])
    assert "target_valid" in resumed[0]


def test_margins_that_leave_no_pixel_are_refused(data_dir):
    assert transforms.validity_map((12, 20), (5, 6, 9, 10)).sum() == 1  # one pixel left
    no_pixel = (
        r"^config.data.pseudo_margins=\({}\) \(top, bottom, left, right\) leave no valid pixel of a {} target image"
    )
    for margins in ((6, 6, 0, 0), (0, 0, 10, 10), (12, 0, 0, 0)):
        with pytest.raises(ValueError, match=no_pixel.format(", ".join(map(str, margins)), "12x20")):
            transforms.validity_map((12, 20), margins)
    # Each example's own stored size: 8 + 8 columns leave 4 of a 12x20 image, none of a 15x16 one.
    with pytest.raises(ValueError, match=no_pixel.format("0, 0, 8, 8", "15x16")):
        batches(config_for(data_dir, (12, 20), (8, 12), margins=(0, 0, 8, 8)), 2)


def test_margins_and_daformer_rows_are_exclusive(tmp_path, capsys):
    config = default_config()
    config.data.pseudo_margins = (30, 240, 30, 30)
    assert schema.check(config) == [
        "config.data.pseudo_margins=(30, 240, 30, 30) replaces the crop rows of config.uda.pseudo_ignore_top=15 "
        "and config.uda.pseudo_ignore_bottom=120; set those to 0 or config.data.pseudo_margins=()"
    ]
    config.uda.pseudo_ignore_top = 0
    assert schema.check(config) == [
        "config.data.pseudo_margins=(30, 240, 30, 30) replaces the crop rows of config.uda.pseudo_ignore_bottom=120; "
        "set those to 0 or config.data.pseudo_margins=()"
    ]
    # The command stops in that line before reading anything (the data dir does not exist).
    config.data.data_dir = str(tmp_path / "nothing")
    with pytest.raises(SystemExit) as stop:
        main.run(config, str(tmp_path / "run"))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: config.data.pseudo_margins=")
    assert not os.path.exists(tmp_path / "run")
    config.uda.pseudo_ignore_bottom = 0
    assert schema.check(config) == []
