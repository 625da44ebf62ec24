"""The built-in synthetic domain pair: determinism, long-tailed classes, a real appearance gap."""

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import builders, synthetic_city


def test_images_are_a_pure_function_of_seed_domain_split_index():
    image, label = synthetic_city.generate_example(0, "target", "train", 5)
    again_image, again_label = synthetic_city.generate_example(0, "target", "train", 5)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(label, again_label)
    assert image.shape == (128, 256, 3) and image.dtype == np.uint8
    assert label.shape == (128, 256) and label.dtype == np.uint8
    for other in [(1, "target", "train", 5), (0, "target", "validation", 5), (0, "target", "train", 6)]:
        assert not np.array_equal(synthetic_city.generate_example(*other)[1], label)
    small_image, small_label = synthetic_city.generate_example(0, "source", "train", 0, (64, 96))
    assert small_image.shape == (64, 96, 3) and small_label.shape == (64, 96)


def test_all_classes_long_tailed_and_shared_by_both_domains():
    def histogram(domain):
        counts = np.zeros(256, np.int64)
        for i in range(60):
            label = synthetic_city.generate_example(0, domain, "train", i)[1]
            counts += np.bincount(label.ravel(), minlength=256)
        assert counts[19:].sum() == 0  # train ids only, nothing ignored
        return counts[:19] / counts.sum()

    source, target = histogram("source"), histogram("target")
    assert (source > 0).all() and (target > 0).all()
    stuff = [0, 2, 8, 10]  # road, building, vegetation, sky dominate
    rare = [6, 12, 16, 17, 18]  # traffic light, rider, train, motorcycle, bicycle
    assert source[stuff].min() > 0.05 and source[rare].max() < 0.015
    np.testing.assert_allclose(source, target, atol=0.04)  # one scene model for both domains


def test_target_differs_from_source_in_colour_texture_and_noise():
    colour_gaps, source_spread, target_spread = [], [], []
    for i in range(12):
        source_image, source_label = synthetic_city.generate_example(0, "source", "train", i)
        target_image, target_label = synthetic_city.generate_example(0, "target", "train", i)
        for cls in (0, 2, 8, 10, 13):  # road, building, vegetation, sky, car
            in_source, in_target = source_label == cls, target_label == cls
            if in_source.sum() > 200 and in_target.sum() > 200:
                gap = source_image[in_source].mean(0) - target_image[in_target].mean(0)
                colour_gaps.append(np.linalg.norm(gap))
        road = source_label == 0
        source_spread.append(len(np.unique(source_image[road], axis=0)))  # flat shading: few colours
        road = target_label == 0
        target_spread.append(target_image[road].std(0).mean())
    assert np.median(colour_gaps) > 30
    assert max(source_spread) <= 8
    assert min(target_spread) > 4  # texture, blur and sensor noise


def test_builder_writes_the_generator_output_with_statistics(tmp_path):
    config = builders.SyntheticCityConfig(
        name="target_tiny", domain="target", image_hw=(24, 40), num_train=5, num_validation=3
    )
    builder = builders.SyntheticCity(config=config, data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    source = tfds.builder_from_directory(builder.data_dir).as_data_source("train")
    counts = np.zeros(19, np.int64)
    for i in range(5):
        image, label = synthetic_city.generate_example(0, "target", "train", i, (24, 40))
        np.testing.assert_array_equal(source[i]["image"], image)
        np.testing.assert_array_equal(source[i]["label"][..., 0], label)
        counts += np.bincount(label.ravel(), minlength=19)
    stats = builder.info.metadata["splits"]["train"]
    assert stats["class_pixels"] == counts.tolist()
    assert builder.info.splits["validation"].num_examples == 3
