"""Offline preparation: every published layout, every bad case, every mapped pixel, the report."""

import glob
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import builders, prepare
from t2s_jax import data
from t2s_jax.training import loop
from t2s_jax.training.control import RunError
from t2s_jax.classes import CITYSCAPES_CLASSES, generate_palette

sys.path.insert(0, os.path.dirname(__file__))
import dataset_trees  # noqa: E402
import tiny  # noqa: E402

# method.md section 1, typed again here so the test does not share the code's tables.
GTA5_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
SYNTHIA_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12,
                    8: 13, 19: 15, 12: 17, 11: 18}  # fmt: skip


def expected_train_ids(raw: np.ndarray, table: dict) -> np.ndarray:
    out = np.full(raw.shape, 255, np.uint8)
    for (i, j), value in np.ndenumerate(raw):
        out[i, j] = table.get(int(value), 255)
    return out


def nearest(label: np.ndarray, hw) -> np.ndarray:
    """OpenCV's INTER_NEAREST (what mmcv resizes labels with): output i samples input floor(i * in / out)."""
    out = np.empty(hw, label.dtype)
    for i in range(hw[0]):
        for j in range(hw[1]):
            out[i, j] = label[i * label.shape[0] // hw[0], j * label.shape[1] // hw[1]]
    return out


def save_png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if mode == "P":
        image.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    image.save(path)


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_png_with_filters(array: np.ndarray) -> bytes:
    """Reference PNG writer (uint8 or uint16 samples, channels in the file's order: R, G, B[, A])
    that cycles through all 5 row filters."""
    height, width, channels = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = array.astype(">u2" if depth == 16 else np.uint8).tobytes()
    stride, bpp = width * channels * depth // 8, channels * depth // 8
    rows, previous = [], [0] * stride
    for r in range(height):
        current = list(raw[r * stride : (r + 1) * stride])
        kind = r % 5
        filtered = []
        for i, x in enumerate(current):
            a = current[i - bpp] if i >= bpp else 0
            b = previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            if kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                predictor = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            else:
                predictor = (0, a, b, (a + b) // 2)[kind]
            filtered.append((x - predictor) % 256)
        rows.append(bytes([kind] + filtered))
        previous = current

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))  # fmt: skip


def read_split(data_dir, dataset, split):
    builder = tfds.builder_from_directory(os.fspath(builders.prepared_dir(dataset, data_dir)))
    source = builder.as_data_source(split)
    return {source[i]["file_name"].decode(): source[i] for i in range(len(source))}, builder.info.metadata


# ------------------------------------------------------------------------ GTA5


def write_gta5_tree(root):
    rng = np.random.default_rng(0)
    ids = np.array(list(range(34)), np.uint8)
    truth = {}
    for i in range(3):  # good pairs, palette labels like the published ones
        image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        raw = rng.choice(ids, size=(6, 8)).astype(np.uint8)
        save_png(f"{root}/images/{i:05d}.png", image)
        save_png(f"{root}/labels/{i:05d}.png", raw, "P")
        truth[f"images/{i:05d}.png"] = (image, expected_train_ids(raw, GTA5_TO_TRAIN))
    save_png(f"{root}/images/00003.png", rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))  # no label
    save_png(f"{root}/labels/00004.png", np.zeros((6, 8), np.uint8))  # no image
    truncated = png_bytes(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    with open(f"{root}/images/00005.png", "wb") as f:
        f.write(truncated[: len(truncated) - 30])
    save_png(f"{root}/labels/00005.png", np.zeros((6, 8), np.uint8))
    save_png(f"{root}/images/00006.png", rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    with open(f"{root}/labels/00006.png", "wb") as f:
        f.write(b"not a png at all")
    image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # label of another size
    raw = rng.choice(ids, size=(3, 5)).astype(np.uint8)
    save_png(f"{root}/images/00007.png", image)
    save_png(f"{root}/labels/00007.png", raw, "P")
    truth["images/00007.png"] = (image, nearest(expected_train_ids(raw, GTA5_TO_TRAIN), (6, 8)))
    image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # unknown ids 40 and 200
    raw = np.full((6, 8), 7, np.uint8)
    raw[0, :6] = 40
    raw[5, 5:] = 200
    save_png(f"{root}/images/00008.png", image)
    save_png(f"{root}/labels/00008.png", raw)
    truth["images/00008.png"] = (image, expected_train_ids(raw, GTA5_TO_TRAIN))
    return truth


@pytest.fixture(scope="module")
def gta5(tmp_path_factory):
    root = tmp_path_factory.mktemp("gta5")
    truth = write_gta5_tree(f"{root}/manual")
    metadata = prepare.prepare("gta5", f"{root}/tfds", f"{root}/manual", num_workers=0)
    return root, truth, metadata


def test_gta5_every_pixel_mapped(gta5):
    root, truth, _ = gta5
    examples, _ = read_split(f"{root}/tfds", "gta5", "train")
    assert list(examples) == sorted(truth)  # sorted file order, bad files left out
    for name, (image, label) in truth.items():
        np.testing.assert_array_equal(examples[name]["image"], image, err_msg=name)
        np.testing.assert_array_equal(examples[name]["label"][..., 0], label, err_msg=name)


def test_gta5_report_lines(gta5):
    root, truth, metadata = gta5
    text = prepare.format_report("gta5", metadata).splitlines()
    assert text[:13] == [
        "gta5 [train]: 5 images written",
        "  skipped: 4",
        "    images/00003.png: image without label",
        "    labels/00004.png: label without image",
        text[4],
        text[5],
        "  label size fixed (nearest resize to the image): 1",
        "    images/00007.png: label 3x5 -> image 6x8",
        "  unknown label ids mapped to 255: 1",
        "    images/00008.png: id 40: 6 px, id 200: 3 px",
        "  label histogram (pixels, share):",
        text[11],
        text[12],
    ]
    assert text[4].startswith("    images/00005.png: unreadable image (OSError: image file is truncated")
    assert text[5].startswith(
        "    images/00006.png: unreadable label (UnidentifiedImageError: cannot identify"
    )
    labels = np.stack([label for _, label in truth.values()])
    counts = np.bincount(labels.ravel(), minlength=256)
    total = labels.size
    histogram = text[11:]
    assert len(histogram) == 20
    for line, name, count in zip(histogram, list(CITYSCAPES_CLASSES) + ["ignore (255)"],
                                 list(counts[:19]) + [counts[255]]):  # fmt: skip
        assert line == f"    {name:>16s} {count:>14d} {100 * count / total:7.3f} %"


def test_gta5_class_statistics_for_rare_class_sampling(gta5):
    root, truth, metadata = gta5
    split = metadata["splits"]["train"]
    labels = [label for _, (_, label) in sorted(truth.items())]
    for c in range(19):
        expected = [[i, int((label == c).sum())] for i, label in enumerate(labels) if (label == c).any()]
        assert split["class_examples"][c] == expected
        assert split["class_pixels"][c] == sum(n for _, n in expected)
    assert split["ignore_pixels"] == sum(int((label == 255).sum()) for label in labels)


def test_prepared_data_reads_with_plain_tfds(gta5):
    root, truth, _ = gta5
    source = tfds.data_source("gta5", data_dir=f"{root}/tfds", split="train")
    assert len(source) == len(truth)
    builder = tfds.builder_from_directory(os.fspath(builders.prepared_dir("gta5", f"{root}/tfds")))
    assert builder.info.features["label"].shape == (None, None, 1)
    assert builder.info.metadata["class_names"][0] == "road"
    assert builder.info.metadata["num_classes"] == 19
    assert builder.info.metadata["palette"][13] == [0, 0, 142]  # Cityscapes' car


def test_parallel_conversion_writes_the_same(gta5, tmp_path):
    root, _, metadata = gta5
    parallel = prepare.prepare("gta5", f"{tmp_path}/tfds", f"{root}/manual", num_workers=2)
    assert parallel == metadata
    first, _ = read_split(f"{root}/tfds", "gta5", "train")
    second, _ = read_split(f"{tmp_path}/tfds", "gta5", "train")
    for name in first:
        np.testing.assert_array_equal(first[name]["label"], second[name]["label"])


def test_prepare_command_line(gta5, tmp_path):
    root, _, _ = gta5
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.prepare", "--dataset=gta5", f"--manual_dir={root}/manual",
         f"--data_dir={tmp_path}", "--num_workers=0"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "gta5 [train]: 5 images written" in result.stdout
    assert "    labels/00004.png: label without image" in result.stdout
    assert f"prepared: {tmp_path}/gta5/1.0.0" in result.stdout


# ------------------------------------------------------------------------ SYNTHIA


def test_synthia_16bit_first_channel(tmp_path):
    rng = np.random.default_rng(1)
    truth = {}
    for i in range(2):
        image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
        gt = np.zeros((5, 7, 3), np.uint16)  # as published: R = class, G = instance id
        gt[..., 0] = rng.integers(0, 23, (5, 7))  # class
        gt[..., 1] = rng.integers(0, 4000, (5, 7))  # instance ids, above 255
        gt[..., 2] = rng.integers(0, 23, (5, 7))  # B: a decoy, had the reader OpenCV's BGR order wrong
        if i == 1:
            gt[0, 0, 0] = 300  # unknown 16-bit class id
        save_png(f"{tmp_path}/manual/RGB/{i:07d}.png", image)
        os.makedirs(f"{tmp_path}/manual/GT/LABELS", exist_ok=True)
        with open(f"{tmp_path}/manual/GT/LABELS/{i:07d}.png", "wb") as f:
            f.write(encode_png_with_filters(gt))
        truth[f"RGB/{i:07d}.png"] = (image, expected_train_ids(gt[..., 0], SYNTHIA_TO_TRAIN))
    metadata = prepare.prepare("synthia", f"{tmp_path}/tfds", f"{tmp_path}/manual")
    examples, _ = read_split(f"{tmp_path}/tfds", "synthia", "train")
    for name, (image, label) in truth.items():
        np.testing.assert_array_equal(examples[name]["image"], image)
        np.testing.assert_array_equal(examples[name]["label"][..., 0], label)
    assert metadata["splits"]["train"]["unknown_ids"] == [["RGB/0000001.png", {"300": 1}]]
    # SYNTHIA's terrain (16), truck (18) and train (20) are ignored.
    assert metadata["splits"]["train"]["class_pixels"][9] == 0


# ------------------------------------------------------------------------ Cityscapes


def test_cityscapes_train_ids_and_label_ids(tmp_path):
    rng = np.random.default_rng(2)
    root = f"{tmp_path}/manual"
    truth = {}

    def frame(folder, city, stem, kind):
        image = rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)
        save_png(f"{root}/leftImg8bit/{folder}/{city}/{stem}_leftImg8bit.png", image)
        save_png(f"{root}/gtFine/{folder}/{city}/{stem}_gtFine_color.png", image)  # ignored
        if kind == "train_ids":
            label = rng.choice(np.array(list(range(19)) + [255], np.uint8), size=(4, 8))
            save_png(f"{root}/gtFine/{folder}/{city}/{stem}_gtFine_labelTrainIds.png", label)
        else:
            raw = rng.integers(0, 34, (4, 8)).astype(np.uint8)
            save_png(f"{root}/gtFine/{folder}/{city}/{stem}_gtFine_labelIds.png", raw)
            label = expected_train_ids(raw, GTA5_TO_TRAIN)
        truth[f"leftImg8bit/{folder}/{city}/{stem}_leftImg8bit.png"] = (image, label)

    frame("train", "aachen", "aachen_000000_000019", "train_ids")
    frame("train", "bochum", "bochum_000000_000313", "label_ids")
    frame("val", "frankfurt", "frankfurt_000000_000294", "label_ids")
    # Both label files: the train ids win.
    frame("val", "lindau", "lindau_000000_000019", "train_ids")
    save_png(f"{root}/gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", np.zeros((4, 8), np.uint8))
    save_png(f"{root}/gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png", np.zeros((4, 8), np.uint8))

    metadata = prepare.prepare("cityscapes", f"{tmp_path}/tfds", root)
    for split, count in (("train", 2), ("validation", 2)):
        examples, _ = read_split(f"{tmp_path}/tfds", "cityscapes", split)
        assert len(examples) == count
        for name, example in examples.items():
            image, label = truth[name]
            np.testing.assert_array_equal(example["image"], image)
            np.testing.assert_array_equal(example["label"][..., 0], label)
    assert metadata["splits"]["validation"]["skipped"] == [
        ["gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png", "label without image"]
    ]


# ------------------------------------------------------------------------ image folder


def test_image_folder_with_jpeg_and_own_classes(tmp_path):
    root = f"{tmp_path}/manual"
    os.makedirs(root)
    with open(f"{root}/classes.txt", "w") as f:
        f.write("background\nfield\n\nrobot\n")
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    os.makedirs(f"{root}/images/train")
    Image.fromarray(image).save(f"{root}/images/train/a.jpg", quality=95)
    label = rng.choice(np.array([0, 1, 2, 255, 7], np.uint8), size=(8, 8))
    save_png(f"{root}/labels/train/a.png", label)
    save_png(f"{root}/images/val/b.png", image)
    save_png(f"{root}/labels/val/b.png", np.ones((8, 8), np.uint8))
    metadata = prepare.prepare("image_folder/robots", f"{tmp_path}/tfds", root)
    assert metadata["class_names"] == ["background", "field", "robot"]
    assert metadata["num_classes"] == 3
    assert metadata["palette"] == [[128, 0, 0], [0, 128, 0], [128, 128, 0]]  # VOC colours 1, 2, 3
    examples, _ = read_split(f"{tmp_path}/tfds", "image_folder/robots", "train")
    expected_label = np.where(label == 7, 255, label)
    np.testing.assert_array_equal(examples["images/train/a.jpg"]["label"][..., 0], expected_label)
    np.testing.assert_array_equal(
        examples["images/train/a.jpg"]["image"], np.asarray(Image.open(f"{root}/images/train/a.jpg"))
    )
    assert metadata["splits"]["train"]["unknown_ids"] == [
        ["images/train/a.jpg", {"7": int((label == 7).sum())}]
    ]
    assert set(metadata["splits"]) == {"train", "validation"}


def write_classes(root, text):
    os.makedirs(root, exist_ok=True)
    with open(f"{root}/classes.txt", "w") as f:
        f.write(text)


def test_classes_txt_colours_given_or_generated_distinct(tmp_path):
    write_classes(tmp_path, "traffic light 250 170 30\nroad\n\ncar 0 0 142\nclass 7\n")
    classes = builders.read_class_list(builders.epath.Path(tmp_path))
    assert classes.names == ("traffic light", "road", "car", "class 7")
    # Given colours kept; the others get the first VOC colours (1: 128 0 0, 2: 0 128 0).
    assert classes.palette.dtype == np.uint8
    assert classes.palette.tolist() == [[250, 170, 30], [128, 0, 0], [0, 0, 142], [0, 128, 0]]
    write_classes(tmp_path, "a 128 0 0\nb\n")  # a given colour is not generated again
    assert builders.read_class_list(builders.epath.Path(tmp_path)).palette.tolist() == [[128, 0, 0], [0, 128, 0]]
    palette = generate_palette(254)
    assert len({tuple(c) for c in palette}) == 254 and not (palette == 0).all(axis=1).any()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("car 0 0 300\n", "line 1: colour .*0, 0, 300.* not RGB 0..255"),
        ("car\nbus\ncar 1 2 3\n", "'car' more than once"),
    ],
)
def test_bad_classes_txt_names_the_line(tmp_path, text, expected):
    write_classes(tmp_path, text)
    with pytest.raises(builders.LayoutError, match=expected):
        builders.read_class_list(builders.epath.Path(tmp_path))


# ------------------------------------------------------------------------ wrong layouts fail at once


@pytest.mark.parametrize(
    "dataset, make, expected",
    [
        ("gta5", ["imgs/0.png"], r"missing images/, labels/; expected images/00001.png .*labels/00001.png"),
        ("synthia", ["RGB/0.png", "GT/COLOR/0.png"], r"missing GT/LABELS/; expected RGB/.*16-bit PNG"),
        ("cityscapes", ["leftImg8bit/train/x/a_leftImg8bit.png"], r"missing gtFine/; expected .*labelTrainIds"),
        ("cityscapes", ["leftImg8bit/test/x/a.png", "gtFine/test/x/a.png"], r"neither train/ nor val/; expected"),
        ("image_folder", ["images/train/a.png", "labels/train/a.png"], r"no classes.txt; expected .*'car 0 0 142'"),
        ("gta5", ["images/0.png", "labels/1.png"], r"no image of split 'train' has a label of the same name"),
    ],
)
def test_wrong_layout_names_the_expected_one(tmp_path, dataset, make, expected):
    for relative in make:
        save_png(f"{tmp_path}/manual/{relative}", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(builders.LayoutError, match=expected) as error:
        prepare.prepare(dataset, f"{tmp_path}/tfds", f"{tmp_path}/manual")
    assert "\n" not in str(error.value)
    assert not os.path.exists(f"{tmp_path}/tfds")


def test_missing_manual_dir_is_refused(tmp_path):
    with pytest.raises(builders.LayoutError, match="--manual_dir is required for gta5: the folder holding images/"):
        prepare.prepare("gta5", f"{tmp_path}/tfds", None)


def _tree(root) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for folders)."""
    found = {}
    for folder, _, files in os.walk(root):
        found[os.path.relpath(folder, root)] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return found


def _unconvertible(root):
    """Images and labels paired by name, none of them a PNG: found, but nothing converts."""
    for kind in ("images", "labels"):
        os.makedirs(f"{root}/{kind}")
        with open(f"{root}/{kind}/00001.png", "wb") as f:
            f.write(b"not a png at all")


BAD_SOURCES = {
    "no_flag": r"--manual_dir is required for gta5: the folder holding images/00001.png .*",
    "missing": r"--manual_dir=.*/absent is not a directory; expected images/00001.png .*",
    "empty": r"--manual_dir=.*/manual is empty; expected images/00001.png .*",
    "cityscapes_tree": r".*/manual is not a GTA5 directory: missing images/, labels/; expected images/00001.png .*",
    "unconvertible": r"gta5 train: no file could be converted; first skipped: .*images/00001.png.*",
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_prepare_refuses_a_bad_source_in_one_line_and_leaves_data_dir_as_it_was(tmp_path, case):
    manual = tmp_path / "manual"
    manual.mkdir()
    if case == "cityscapes_tree":
        dataset_trees.write_cityscapes(str(manual), num_train=1, num_val=0)
    elif case == "unconvertible":
        _unconvertible(manual)
    data_dir = tmp_path / "tfds"
    if case != "missing":  # a data_dir in use stays exactly as it was; a new one is not created
        dataset_trees.write_cityscapes(str(tmp_path / "other"), num_train=1, num_val=1)
        prepare.prepare("cityscapes", str(data_dir), str(tmp_path / "other"))
    before = _tree(data_dir)
    flags = {"no_flag": [], "missing": [f"--manual_dir={tmp_path / 'absent'}"]}.get(case, [f"--manual_dir={manual}"])
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.prepare", "--dataset=gta5", *flags, f"--data_dir={data_dir}",
         "--num_workers=0"],
        cwd=tiny.REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1, result.stderr[-3000:]
    assert re.fullmatch(f"error: {BAD_SOURCES[case]}", result.stderr.strip().splitlines()[-1])
    assert _tree(data_dir) == before


def test_overwrite_rebuilds_a_prepared_dataset(gta5, tmp_path):
    root, _, _ = gta5
    data_dir = f"{tmp_path}/tfds"
    prepare.prepare("gta5", data_dir, f"{root}/manual")
    (path,) = glob.glob(f"{builders.prepared_dir('gta5', data_dir)}/gta5-train.array_record-*")
    intact = open(path, "rb").read()
    open(path, "wb").write(intact[:100])
    prepare.prepare("gta5", data_dir, f"{root}/manual")  # prepared: left alone
    assert len(open(path, "rb").read()) == 100
    prepare.prepare("gta5", data_dir, f"{root}/manual", overwrite=True)
    examples = tfds.builder_from_directory(str(builders.prepared_dir("gta5", data_dir))).as_data_source("train")
    assert len(examples) == 5 and examples[0]["file_name"].decode() == "images/00000.png"


# ------------------------------------------------------------------------ own classes end to end

OWN_CLASSES = "floor 200 100 50\nwall\nrobot arm 10 220 30\ncable\nlamp 250 250 0\n"
OWN_NAMES = ["floor", "wall", "robot arm", "cable", "lamp"]
OWN_PALETTE = [(200, 100, 50), (128, 0, 0), (10, 220, 30), (0, 128, 0), (250, 250, 0)]


def write_own_class_tree(root, hw=(64, 128)):
    """A 5-class image folder in the documented layout: blocky labels, a colour per class."""
    write_classes(root, OWN_CLASSES)
    rng = np.random.default_rng(7)
    labels_by_split = {}
    for split, count in (("train", 4), ("val", 2)):
        labels_by_split[split] = []
        for i in range(count):
            blocks = rng.integers(0, 5, (hw[0] // 16, hw[1] // 16))
            label = np.kron(blocks, np.ones((16, 16), np.int64)).astype(np.uint8)
            label[:4, :4] = 255
            colours = np.array(OWN_PALETTE, np.uint8)[np.minimum(label, 4)] // 2
            image = (colours + rng.integers(0, 60, (*hw, 3))).astype(np.uint8)
            save_png(f"{root}/images/{split}/{i:03d}.png", image)
            save_png(f"{root}/labels/{split}/{i:03d}.png", label)
            labels_by_split[split].append(label)
    return labels_by_split


def test_own_classes_prepare_train_evaluate_report_and_draw(tmp_path):
    labels = write_own_class_tree(f"{tmp_path}/lab")
    data_dir = f"{tmp_path}/tfds"
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.prepare", "--dataset=image_folder/lab",
         f"--manual_dir={tmp_path}/lab", f"--data_dir={data_dir}", "--num_workers=0"],
        cwd=tiny.REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image_folder/lab [train]: 4 images written" in result.stdout

    run = {"data.source": "image_folder/lab", "data.target": "image_folder/lab",
           "data.eval_dataset": "image_folder/lab", "data.source_resize_hw": (64, 128),
           "data.target_resize_hw": (64, 128), "model.num_classes": 5, "uda.fd_weight": 0.0,
           "train.num_steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2}  # fmt: skip

    # A wrong class count stops before any model is built, naming the dataset and the key.
    wrong = tiny.tiny_config(data_dir, "t2s", **{**run, "model.num_classes": 19, "num_devices": 1})
    with pytest.raises(RunError, match=(
        r"^config.model.num_classes=19 but config.data.source='image_folder/lab' has 5 classes; "
        r"set --config.model.num_classes=5$"
    )):  # fmt: skip
        loop.train_and_evaluate(wrong, f"{tmp_path}/wrong")
    assert not os.path.exists(f"{tmp_path}/wrong/checkpoints")
    with pytest.raises(ValueError, match=r"fd_classes=\(6, 7, .*outside the 5 classes.*fd_weight=0"):
        data.check_classes(tiny.tiny_config(data_dir, "t2s", **{**run, "uda.fd_weight": 0.005}))

    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=tiny.xla_flags(1))
    result = subprocess.run(
        [sys.executable, "-m", "t2s_jax.main", f"--workdir={workdir}", *tiny.as_flags(data_dir, "t2s", **run)],
        cwd=tiny.REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "robot arm" in result.stderr  # the logged IoU table

    evaluation = json.loads((workdir / "eval" / "step_2.json").read_text())
    assert evaluation["class_names"] == OWN_NAMES
    assert len(evaluation["per_class_iou"]) == 5 and "miou16" not in evaluation
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    eval_record = next(r for r in records if "eval/miou" in r)
    per_class = sorted(k for k in eval_record if k.startswith("eval_iou/"))
    assert per_class == sorted(f"eval_iou/{name.replace(' ', '_')}" for name in OWN_NAMES)

    # The first validation image (split order): ground truth drawn in the folder's palette.
    picture = np.asarray(Image.open(workdir / "pictures" / "step_000002_00.png"))
    assert picture.shape == (64, 3 * 128, 3)
    palette = np.zeros((256, 3), np.uint8)
    palette[:5] = OWN_PALETTE
    np.testing.assert_array_equal(picture[:, 128:256], palette[labels["val"][0]])
    prediction_colours = {tuple(c) for c in picture[:, 256:].reshape(-1, 3)}
    assert prediction_colours <= set(OWN_PALETTE)
