"""Evaluation: confusion, mIoU against cityscapesscripts' own evaluation, whole / slide inference,
the sharded eval step, the evaluation loop and its outputs."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cityscapes_eval
from cityscapesscripts.helpers.labels import trainId2label
from flax import nnx
from PIL import Image

from t2s_jax import evaluate, parallel
from t2s_jax.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from t2s_jax.models.layers import resize_bilinear

K = 19
# method.md section 2, written out here rather than imported: the eval step must normalise like this.
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


def _numpy_confusion(predictions, labels, num_classes, valid=None):
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for index in range(labels.shape[0]):
        if valid is not None and not valid[index]:
            continue
        for label, prediction in zip(labels[index].ravel(), predictions[index].ravel()):
            if label < num_classes:  # 255 and any other out-of-range id are ignored
                confusion[label, prediction] += 1
    return confusion


def _cityscapes_scripts_iou(directory, predictions, labels):
    """Per-class IoU in train-id order, by cityscapesscripts' own pixel-level evaluation
    (`evaluatePair` on label-id PNGs, then `getIouScoreForLabel`) of train-id maps."""
    to_label_id = np.zeros(256, np.uint8)  # 255 -> 0, 'unlabeled': ignored in the evaluation
    to_label_id[:K] = [trainId2label[train_id].id for train_id in range(K)]
    args = cityscapes_eval.CArgs()  # its own settings object, not the module's global one
    args.evalInstLevelScore, args.evalPixelAccuracy = False, False
    confusion = cityscapes_eval.generateMatrix(args)
    for index, (prediction, label) in enumerate(zip(predictions, labels)):
        prediction_path = str(directory / f"{index}_prediction.png")
        label_path = str(directory / f"{index}_gtFine_labelIds.png")
        Image.fromarray(to_label_id[prediction]).save(prediction_path)
        Image.fromarray(to_label_id[label]).save(label_path)
        cityscapes_eval.evaluatePair(prediction_path, label_path, confusion, {}, {}, args)
    return [cityscapes_eval.getIouScoreForLabel(trainId2label[c].id, confusion, args) for c in range(K)]


def _cityscapes_scripts_mean(scores, class_ids):
    """cityscapesscripts' average over the classes with a score (nan left out)."""
    return cityscapes_eval.getScoreAverage({c: scores[c] for c in class_ids}, None)


def _random_dataset(seed, num_images=3, size=(12, 16)):
    """Labels never contain classes 3, 9 and 16; predictions contain 3 (IoU 0) but never 9 (nan)."""
    rng = np.random.default_rng(seed)
    label_classes = [c for c in range(K) if c not in (3, 9, 16)] + [255]
    labels = rng.choice(label_classes, (num_images, *size)).astype(np.uint8)
    predictions = rng.choice([c for c in range(K) if c != 9], (num_images, *size))
    # Mostly right, so IoUs are not all tiny.
    right = rng.random(labels.shape) < 0.6
    predictions = np.where(right & (labels != 255), labels, predictions).astype(np.int32)
    return predictions, labels


def test_confusion_on_device_equals_numpy():
    predictions, labels = _random_dataset(0)
    labels[0, 0, :4] = 200  # an out-of-range id is ignored like 255
    valid = np.array([True, False, True])
    confusion = jax.jit(lambda p, l, v: evaluate.confusion_matrix(p, l, K, valid=v))(predictions, labels, valid)
    assert confusion.dtype == jnp.int32 and confusion.shape == (K, K)
    np.testing.assert_array_equal(confusion, _numpy_confusion(predictions, labels, K, valid))


def test_miou_agrees_with_cityscapes_scripts(tmp_path):
    predictions, labels = _random_dataset(1)
    confusion = evaluate.confusion_matrix(jnp.asarray(predictions), jnp.asarray(labels), K)
    summary = evaluate.summarize(np.asarray(confusion), CITYSCAPES_CLASSES)
    reference = _cityscapes_scripts_iou(tmp_path, predictions, labels)

    iou = np.array(summary["per_class_iou"])
    assert summary["class_names"] == list(CITYSCAPES_CLASSES)
    np.testing.assert_allclose(iou, reference, rtol=1e-12, equal_nan=True)
    assert summary["per_class_iou"][3] == 0.0  # predicted, never in the ground truth
    assert np.isnan(summary["per_class_iou"][9])  # in neither: left out of the means
    assert summary["miou"] == summary["miou19"] == pytest.approx(_cityscapes_scripts_mean(reference, range(K)))
    synthia16 = [c for c in range(K) if c not in (9, 14, 16)]
    synthia13 = [c for c in synthia16 if c not in (3, 4, 5)]
    assert summary["miou16"] == pytest.approx(_cityscapes_scripts_mean(reference, synthia16))
    assert summary["miou13"] == pytest.approx(_cityscapes_scripts_mean(reference, synthia13))
    evaluated = labels != 255
    assert summary["pixel_accuracy"] == pytest.approx(np.mean(predictions[evaluated] == labels[evaluated]))


def test_summary_of_fewer_classes_has_no_synthia_subsets():
    summary = evaluate.summarize(np.array([[3, 1], [0, 0]]), ("a", "b"))
    assert summary["miou"] == pytest.approx((0.75 + 0.0) / 2)
    assert "miou16" not in summary and "miou19" not in summary


def test_only_the_cityscapes_class_list_gets_synthia_subsets():
    own = tuple(f"part{c}" for c in range(K))  # 19 classes, but not Cityscapes'
    summary = evaluate.summarize(np.eye(K, dtype=np.int64), own)
    assert summary["class_names"] == list(own) and summary["miou"] == 1.0
    assert "miou16" not in summary and "miou13" not in summary and "miou19" not in summary


# ------------------------------------------------------------------ inference


def _stride4_linear_model(weights):
    """A 'segmentor': 4x4 average pooling, then a per-pixel linear map to K logits."""

    def apply_fn(images):
        b, h, w, c = images.shape
        pooled = images.reshape(b, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))
        return pooled @ weights

    return apply_fn


def _mmseg_slide_inference(images, weights, crop_hw, stride_hw):
    """mmseg EncoderDecoder.slide_inference in PyTorch (NCHW), with the same linear model."""
    img = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    weight = torch.from_numpy(np.asarray(weights))
    h_stride, w_stride = stride_hw
    h_crop, w_crop = crop_hw
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, weight.shape[1], h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            pooled = F.avg_pool2d(crop_img, 4)
            crop_logit = torch.einsum("bchw,ck->bkhw", pooled, weight)
            crop_logit = F.interpolate(crop_logit, size=crop_img.shape[2:], mode="bilinear", align_corners=False)
            preds += F.pad(crop_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    return (preds / count_mat).permute(0, 2, 3, 1).numpy()


@pytest.fixture
def images_and_weights():
    rng = np.random.default_rng(2)
    return rng.normal(size=(2, 24, 40, 3)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)


def test_slide_matches_mmseg_slide_inference(images_and_weights):
    images, weights = images_and_weights
    crop_hw, stride_hw = (16, 16), (12, 10)  # overlapping windows; the last ones are shifted back
    logits = jax.jit(
        lambda x: evaluate.predict_logits(
            _stride4_linear_model(weights), x, mode="slide", crop_hw=crop_hw, stride_hw=stride_hw
        )
    )(images)
    reference = _mmseg_slide_inference(images, weights, crop_hw, stride_hw)
    np.testing.assert_allclose(logits, reference, atol=1e-5)


def test_whole_matches_pytorch_bilinear_upsampling(images_and_weights):
    images, weights = images_and_weights
    logits = evaluate.predict_logits(_stride4_linear_model(weights), jnp.asarray(images), mode="whole")
    pooled = F.avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2), 4)
    reference = F.interpolate(
        torch.einsum("bchw,ck->bkhw", pooled, torch.from_numpy(weights)), size=(24, 40), mode="bilinear",
        align_corners=False,
    ).permute(0, 2, 3, 1)  # fmt: skip
    np.testing.assert_allclose(logits, reference.numpy(), atol=1e-5)


@pytest.mark.parametrize("crop_hw", [(24, 40), (32, 48)])
def test_slide_with_a_crop_covering_the_image_equals_whole(images_and_weights, crop_hw):
    images, weights = images_and_weights
    model = _stride4_linear_model(weights)
    whole = evaluate.predict_logits(model, images, mode="whole")
    slide = evaluate.predict_logits(model, images, mode="slide", crop_hw=crop_hw, stride_hw=(8, 8))
    np.testing.assert_allclose(slide, whole, atol=1e-6)


def test_slide_equals_whole_for_a_per_pixel_linear_model(images_and_weights):
    images, weights = images_and_weights
    model = lambda x: x @ weights  # noqa: E731  full-resolution logits: every window agrees with the whole
    whole = evaluate.predict_logits(model, images, mode="whole")
    slide = evaluate.predict_logits(model, images, mode="slide", crop_hw=(10, 12), stride_hw=(7, 9))
    assert len(evaluate.slide_windows((24, 40), (10, 12), (7, 9))) == 3 * 5
    np.testing.assert_allclose(slide, whole, atol=1e-5)


def test_unknown_mode_is_rejected(images_and_weights):
    images, weights = images_and_weights
    with pytest.raises(ValueError, match="'sliding'"):
        evaluate.predict_logits(_stride4_linear_model(weights), images, mode="sliding")


# ------------------------------------------------------------------ the eval step on 8 devices


class _TinySegmentor(nnx.Module):
    """Stride-4 conv -> BatchNorm -> dropout: inference must use running stats and no dropout."""

    def __init__(self, num_classes, rngs):
        self.conv = nnx.Conv(3, num_classes, kernel_size=(4, 4), strides=(4, 4), rngs=rngs)
        self.norm = nnx.BatchNorm(num_classes, rngs=rngs)
        self.dropout = nnx.Dropout(0.9)

    def __call__(self, images, train=False, dropout_key=None):
        x = self.norm(self.conv(images), use_running_average=not train)
        return self.dropout(x, deterministic=not train, rngs=nnx.Rngs(dropout=dropout_key) if train else None)


def _tiny_model():
    model = _TinySegmentor(K, nnx.Rngs(0))
    rng = np.random.default_rng(3)  # non-trivial running statistics
    model.norm.mean[...] = jnp.asarray(rng.normal(size=K), jnp.float32)
    model.norm.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=K), jnp.float32)
    return model


def _reference_predictions(model, images, label_hw):
    def tensor(variable):
        return torch.from_numpy(np.array(variable[...]))

    x = torch.from_numpy((images.astype(np.float32) - MEAN) / STD).permute(0, 3, 1, 2)
    y = F.conv2d(x, tensor(model.conv.kernel).permute(3, 2, 0, 1), tensor(model.conv.bias), stride=4)
    norm = model.norm
    y = F.batch_norm(y, tensor(norm.mean), tensor(norm.var), tensor(norm.scale), tensor(norm.bias), eps=1e-5)
    y = F.interpolate(y, size=images.shape[1:3], mode="bilinear", align_corners=False)
    y = F.interpolate(y, size=label_hw, mode="bilinear", align_corners=False)
    return y.argmax(dim=1).numpy()


def _eval_data(num_examples=16, image_hw=(16, 24), label_hw=(32, 48), seed=4):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, *image_hw, 3), dtype=np.uint8)
    labels = rng.choice(list(range(K)) + [255], (num_examples, *label_hw)).astype(np.uint8)
    valid = np.ones(num_examples, bool)
    valid[-3:] = False  # padding examples of a last batch
    return images, labels, valid


def _eval_config(mode):
    return ml_collections.ConfigDict(dict(mode=mode, slide_crop_hw=(8, 16), slide_stride_hw=(8, 8)))


def test_eval_step_on_8_devices_matches_a_pytorch_reference():
    model = _tiny_model()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    mesh = parallel.make_mesh()
    images, labels, valid = _eval_data(num_examples=8)
    eval_step = evaluate.make_eval_step(graphdef, mesh, _eval_config("whole"), K)
    batch = parallel.global_batch(dict(image=images, label=labels, valid=valid), mesh)
    outputs = eval_step((params, batch_stats), batch)

    predictions = _reference_predictions(model, images, labels.shape[1:])
    np.testing.assert_array_equal(outputs["confusion"], _numpy_confusion(predictions, labels, K, valid))
    assert outputs["confusion"].sharding.is_fully_replicated
    assert int(outputs["num_examples"]) == 5
    np.testing.assert_array_equal(parallel.to_host(outputs["prediction"]), predictions)


def test_sharded_slide_eval_step_equals_single_device_slide_inference():
    model = _tiny_model()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    images, labels, valid = _eval_data(num_examples=8)
    mesh = parallel.make_mesh()
    eval_step = evaluate.make_eval_step(graphdef, mesh, _eval_config("slide"), K)
    batch = parallel.global_batch(dict(image=images, label=labels, valid=valid), mesh)
    outputs = eval_step((params, batch_stats), batch)

    normalized = (images.astype(np.float32) - MEAN) / STD
    logits = evaluate.predict_logits(
        lambda x: model(x, train=False), jnp.asarray(normalized), mode="slide", crop_hw=(8, 16), stride_hw=(8, 8)
    )
    predictions = np.asarray(jnp.argmax(resize_bilinear(logits, labels.shape[1:]), -1))
    np.testing.assert_array_equal(outputs["confusion"], _numpy_confusion(predictions, labels, K, valid))


@pytest.mark.parametrize("max_device_pixels", [None, 8 * 32 * 48])
def test_evaluate_accumulates_over_batches(monkeypatch, max_device_pixels):
    if max_device_pixels:  # a host flush of the int32 device total before every later batch
        monkeypatch.setattr(evaluate, "_MAX_DEVICE_PIXELS", max_device_pixels)
    model = _tiny_model()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    mesh = parallel.make_mesh()
    images, labels, valid = _eval_data(num_examples=24)
    valid[:2] = False  # the first pictures must skip invalid examples
    batches = [dict(image=images[i : i + 8], label=labels[i : i + 8], valid=valid[i : i + 8], name=np.array(["x"] * 8))
               for i in range(0, 24, 8)]  # fmt: skip
    eval_step = evaluate.make_eval_step(graphdef, mesh, _eval_config("whole"), K)
    summary = evaluate.evaluate(
        eval_step, (params, batch_stats), iter(batches), mesh, CITYSCAPES_CLASSES, num_pictures=3
    )

    predictions = _reference_predictions(model, images, labels.shape[1:])
    expected = evaluate.summarize(_numpy_confusion(predictions, labels, K, valid), CITYSCAPES_CLASSES)
    assert summary["miou"] == pytest.approx(expected["miou"], rel=1e-12)
    assert summary["num_pixels"] == expected["num_pixels"] == np.sum(labels[valid] != 255)
    assert summary["num_examples"] == int(valid.sum())
    pictures, labels_shown, predictions_shown = summary["pictures"]
    np.testing.assert_array_equal(pictures, images[2:5])
    np.testing.assert_array_equal(labels_shown, labels[2:5])
    np.testing.assert_array_equal(predictions_shown, predictions[2:5])
    assert summary["pictures"].predictions is predictions_shown


def test_evaluate_rejects_an_empty_iterator():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="no batches"):
        evaluate.evaluate(lambda *args: None, (), iter([]), mesh, CITYSCAPES_CLASSES)


# ------------------------------------------------------------------ outputs


def test_table_json_and_pictures(tmp_path):
    predictions, labels = _random_dataset(5)
    summary = evaluate.summarize(_numpy_confusion(predictions, labels, K), CITYSCAPES_CLASSES)

    table = evaluate.format_iou_table(summary)
    assert f"road{100 * summary['per_class_iou'][0]:>18.2f}" in table
    assert f"{100 * summary['miou16']:6.2f}" in table and "terrain" in table and "n/a" in table

    image = np.full((2, 4, 6, 3), 7, np.uint8)
    label = np.full((2, 8, 12), 255, np.uint8)
    label[:, :4] = 0  # road on the top half, ignore below
    prediction = np.full((2, 8, 12), 13, np.uint8)  # car everywhere
    pictures = evaluate.Pictures(image, label, prediction)

    path = tmp_path / "eval" / "step_100.json"
    evaluate.write_eval_json(str(path), dict(summary, pictures=pictures))
    loaded = json.loads(path.read_text())
    assert loaded["miou"] == pytest.approx(summary["miou"]) and loaded["per_class_iou"][9] is None
    assert "pictures" not in loaded

    paths = evaluate.save_prediction_pictures(str(tmp_path / "pictures"), 100, *pictures)
    assert len(paths) == 2
    picture = np.asarray(Image.open(paths[1]))
    assert picture.shape == (4, 18, 3)  # image | ground truth | prediction at the image size
    np.testing.assert_array_equal(picture[:, :6], image[1])
    np.testing.assert_array_equal(picture[0, 6], CITYSCAPES_PALETTE[0])
    np.testing.assert_array_equal(picture[3, 6], (0, 0, 0))  # ignore is black
    np.testing.assert_array_equal(picture[2, 12], CITYSCAPES_PALETTE[13])

    own_palette = np.array([(1, 2, 3)] * 13 + [(40, 50, 60)], np.uint8)  # a dataset's own colours
    paths = evaluate.save_prediction_pictures(str(tmp_path / "own"), 100, *pictures, palette=own_palette)
    picture = np.asarray(Image.open(paths[0]))
    np.testing.assert_array_equal(picture[0, 6], (1, 2, 3))
    np.testing.assert_array_equal(picture[3, 6], (0, 0, 0))
    np.testing.assert_array_equal(picture[2, 12], (40, 50, 60))
