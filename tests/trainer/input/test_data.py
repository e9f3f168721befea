"""trainer/input/data.py: the pipeline reads the converter's shards back, batched, decoded and augmented."""

import io
import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfrecords import schema
from trainer.input import data


def test_read_manifest_without_one_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--data_dir '.*' has no manifest.json; create it with"):
        schema.read_manifest(str(tmp_path))


def test_missing_split_is_named(demo_data_dir):
    manifest = schema.read_manifest(str(demo_data_dir))
    with pytest.raises(ValueError, match=r"has no 'extra' split"):
        data.shard_paths(str(demo_data_dir), manifest, "extra")


def test_empty_shards_are_not_given_to_input_pipelines():
    # A split with about as many shards as images can have empty shards (tfrecords/writing/plan.py).
    shards = [{"file": "train-00000-of-00002.tfrecord", "num_examples": 0},
              {"file": "train-00001-of-00002.tfrecord", "num_examples": 3}]
    manifest = {"splits": {"train": {"num_examples": 3, "shards": shards}}}
    assert data.shard_paths("/data", manifest, "train") == ["/data/train-00001-of-00002.tfrecord"]


def test_evaluation_dataset_reads_every_example_once_in_order(demo_data_dir):
    manifest = schema.read_manifest(str(demo_data_dir))
    expected = manifest["splits"]["validation"]["num_examples"]
    dataset = data.make_dataset(
        data_dir=str(demo_data_dir), manifest=manifest, split="validation", image_size=40, batch_size=4,
        training=False,
    )
    assert int(dataset.cardinality()) == -(-expected // 4)
    passes = []
    for _ in range(2):
        batches = list(dataset)
        assert all(images.shape == (4, 40, 40, 3) for images, _, _ in batches)  # the last one padded
        weights = np.concatenate([batch_weights.numpy() for _, _, batch_weights in batches])
        labels = np.concatenate([batch_labels.numpy() for _, batch_labels, _ in batches])
        padded = len(weights)
        assert padded == -(-expected // 4) * 4
        np.testing.assert_allclose(weights[:expected], padded / expected)
        assert (weights[expected:] == 0).all()
        passes.append(labels[:expected])
    np.testing.assert_array_equal(passes[0], passes[1])
    counts = np.bincount(passes[0], minlength=len(manifest["classes"]))
    assert counts.tolist() == [manifest["splits"]["validation"]["class_counts"][name] for name in manifest["classes"]]


def test_training_dataset_repeats_with_full_augmented_batches(demo_data_dir):
    manifest = schema.read_manifest(str(demo_data_dir))
    augmentation = data.make_augmentation(flip=True, rotation=0.1, zoom=0.1, seed=0, pixels="uint8")
    dataset = data.make_dataset(
        data_dir=str(demo_data_dir), manifest=manifest, split="train", image_size=40, batch_size=8,
        training=True, augmentation=augmentation, options=data.PipelineOptions(seed=0),
    )
    num_batches = 3 * manifest["splits"]["train"]["num_examples"] // 8 + 1  # more than one epoch
    for images, labels in dataset.take(num_batches):
        assert images.shape == (8, 40, 40, 3) and images.dtype == tf.float32
        assert labels.dtype == tf.int32
        assert 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255
        assert set(labels.numpy()) <= set(range(len(manifest["classes"])))


def test_augmentation_layers_follow_the_flags():
    assert data.make_augmentation(flip=False, rotation=0, zoom=0) is None
    names = [type(layer).__name__ for layer in data.make_augmentation(flip=True, rotation=0.2, zoom=0.1).layers]
    assert names == ["RandomFlip", "RandomRotation", "RandomZoom"]
    names = [type(layer).__name__ for layer in data.make_augmentation(flip=False, rotation=0.2, zoom=0).layers]
    assert names == ["RandomRotation"]
    every = data.make_augmentation(flip=True, rotation=0.1, zoom=0.1, translation=0.1, contrast=0.2, brightness=0.2)
    assert [type(layer).__name__ for layer in every.layers] == [
        "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast", "RandomBrightness"
    ]
    with pytest.raises(ValueError, match=r"--augment_rotation 1.5 must be within \[0, 1\]"):
        data.make_augmentation(rotation=1.5)


def encode(image: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "BMP", "GIF"])
def test_decode_and_resize_eagerly_and_in_tf_data(image_format):
    image = np.zeros((30, 50, 3), np.uint8)
    image[:, :25] = [200, 30, 30]
    encoded = encode(image, image_format)
    eager = data.decode_and_resize(tf.constant(encoded), 20).numpy()
    in_graph = next(iter(tf.data.Dataset.from_tensors(encoded).map(lambda x: data.decode_and_resize(x, 20)))).numpy()
    assert eager.shape == (20, 20, 3) and eager.dtype == np.float32
    np.testing.assert_array_equal(eager, in_graph)
    if image_format != "GIF":  # GIF quantises the colours
        np.testing.assert_allclose(eager[10, 2], [200, 30, 30], atol=8)
        np.testing.assert_allclose(eager[10, 17], [0, 0, 0], atol=8)


def test_manifest_is_what_the_converter_wrote(demo_data_dir):
    with open(demo_data_dir / "manifest.json") as file:
        assert schema.read_manifest(str(demo_data_dir)) == json.load(file)


def test_padded_evaluation_gives_exact_loss_and_accuracy(demo_data_dir):
    """Loss and accuracy over padded batches equal those over the real examples alone."""
    import keras

    manifest = schema.read_manifest(str(demo_data_dir))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8)(x)))
    model.compile(loss="sparse_categorical_crossentropy", weighted_metrics=["accuracy"])
    results = {}
    for batch_size in (1, 7):  # 1: no padding at all
        dataset = data.make_dataset(
            data_dir=str(demo_data_dir), manifest=manifest, split="validation", image_size=16,
            batch_size=batch_size, training=False,
        )
        results[batch_size] = model.evaluate(dataset, return_dict=True, verbose=0)
    assert manifest["splits"]["validation"]["num_examples"] % 7 != 0
    assert results[7]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert results[7]["accuracy"] == pytest.approx(results[1]["accuracy"], rel=1e-6)


AUGMENTATIONS = {
    "flip": dict(flip=True),
    "rotation": dict(flip=False, rotation=0.2),
    "zoom": dict(flip=False, zoom=0.2),
    "translation": dict(flip=False, translation=0.2),
    "contrast": dict(flip=False, contrast=0.5),
    "brightness": dict(flip=False, brightness=0.3),
}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_each_augmentation_changes_batches_eagerly_and_in_tf_data(name):
    images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    augmentation = data.make_augmentation(**AUGMENTATIONS[name], seed=1)
    eager = augmentation(images, training=True).numpy()
    dataset = tf.data.Dataset.from_tensors(images).map(lambda batch: augmentation(batch, training=True))
    in_graph = next(iter(dataset)).numpy()
    for output in (eager, in_graph):
        assert output.shape == images.shape and output.dtype == np.float32
        assert not np.allclose(output, images)
        assert output.min() >= -1e-3 and output.max() <= 255 + 1e-3
    np.testing.assert_array_equal(augmentation(images, training=False).numpy(), images)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_uint8_pixels_give_the_float32_result_to_within_rounding(name):
    images = np.random.default_rng(2).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    as_float = data.make_augmentation(**AUGMENTATIONS[name], seed=1)(images.astype(np.float32), training=True)
    as_uint8 = data.make_augmentation(**AUGMENTATIONS[name], seed=1, pixels="uint8")(images, training=True)
    difference = np.abs(tf.cast(as_uint8, tf.float32).numpy() - as_float.numpy())
    assert difference.max() <= 1.0 and not np.array_equal(as_float.numpy(), images)


def test_jpeg_evaluation_decode_equals_full_decode_then_central_crop():
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    encoded = encode(image, "JPEG")
    fused = data.decode_and_resize(tf.constant(encoded), 24).numpy()
    decoded = tf.io.decode_jpeg(encoded, channels=3)
    crop_height, crop_width = round(37 * data.EVAL_CROP_FRACTION), round(53 * data.EVAL_CROP_FRACTION)
    cropped = tf.image.crop_to_bounding_box(
        decoded, (37 - crop_height) // 2, (53 - crop_width) // 2, crop_height, crop_width
    )
    expected = tf.image.resize(cropped, [24, 24]).numpy()
    np.testing.assert_allclose(fused, expected, atol=1e-3)
    whole = data.decode_and_resize(tf.constant(encoded), 24, crop_fraction=1.0).numpy()
    expected = tf.image.resize(decoded, [24, 24], antialias=True).numpy()  # 53 px > 2 x 24: antialiased
    np.testing.assert_allclose(whole, np.clip(expected, 0, 255), atol=1e-3)


def test_large_images_are_shrunk_with_antialiasing():
    stripes = np.zeros((200, 200, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: plain bilinear at 10x would alias them
    resized = data.decode_and_resize(tf.constant(encode(stripes, "PNG")), 20, crop_fraction=1.0).numpy()
    np.testing.assert_allclose(resized[:, 1:-1], 127.5, atol=1)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "GIF"])
def test_random_crop_eagerly_and_in_tf_data(image_format):
    image = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    encoded = tf.constant(encode(image, image_format))
    seed = tf.constant([7, 3], tf.int64)
    eager = data.decode_random_crop(encoded, 20, min_area=0.3, seed=seed).numpy()
    dataset = tf.data.Dataset.from_tensors(encoded).map(lambda x: data.decode_random_crop(x, 20, min_area=0.3, seed=seed))
    np.testing.assert_array_equal(eager, next(iter(dataset)).numpy())  # stateless: same seed, same crop
    assert eager.shape == (20, 20, 3) and eager.dtype == np.float32
    assert 0 <= eager.min() and eager.max() <= 255
    crops = {data.decode_random_crop(encoded, 20, min_area=0.3).numpy().tobytes() for _ in range(5)}
    assert len(crops) > 1  # without a seed, crops differ
    # Without the DCT-domain downscale: on pure noise it averages what bilinear resizing samples (see below).
    whole = data.decode_random_crop(encoded, 20, min_area=1.0, dct_scale=False).numpy()
    exact = data.decode_and_resize(encoded, 20, crop_fraction=1.0, dct_scale=False).numpy()
    if image_format == "JPEG":
        # Training decodes JPEG with the fast IDCT and plain chroma upsampling: a few levels off the exact
        # decode on average (this random-noise image, all high frequencies, is the worst case).
        assert np.abs(whole - exact).mean() < 4.0
    else:
        np.testing.assert_array_equal(whole, exact)


PIPELINE_OPTIONS = {field.name for field in dataclasses.fields(data.PipelineOptions)}


def training_dataset(demo_data_dir, **kwargs):
    """make_dataset of the demo train split; keyword arguments that are PipelineOptions' fields go there."""
    manifest = schema.read_manifest(str(demo_data_dir))
    options = data.PipelineOptions(**{key: value for key, value in kwargs.items() if key in PIPELINE_OPTIONS})
    arguments = dict(
        data_dir=str(demo_data_dir), manifest=manifest, split="train", image_size=16, batch_size=4, training=True,
        options=options,
    )
    arguments.update((key, value) for key, value in kwargs.items() if key not in PIPELINE_OPTIONS)
    return data.make_dataset(**arguments)


def first_batches(dataset, count=3):
    return [tuple(part.numpy() for part in batch) for batch in dataset.take(count)]


def test_deterministic_with_a_seed_repeats_exactly(demo_data_dir):
    dataset = training_dataset(demo_data_dir, deterministic=True, seed=5)
    assert dataset.options().deterministic
    # A rerun with the same seed: a new dataset (one dataset object reshuffles on each iteration).
    first, second = first_batches(dataset), first_batches(training_dataset(demo_data_dir, deterministic=True, seed=5))
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)
    assert not training_dataset(demo_data_dir).options().deterministic
    other_seed = first_batches(training_dataset(demo_data_dir, deterministic=True, seed=6))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other_seed))


def test_options_reach_the_dataset(demo_data_dir):
    options = training_dataset(demo_data_dir, ram_budget_gb=0.5, private_threads=2).options()
    assert options.autotune.enabled and options.autotune.ram_budget == 2**29
    assert options.threading.private_threadpool_size == 2 and options.threading.max_intra_op_parallelism == 1
    assert options.experimental_optimization.map_parallelization
    # By default the pipeline still gets a pool of its own, off TensorFlow's inter-op pool.
    assert training_dataset(demo_data_dir).options().threading.private_threadpool_size == data.default_private_threads()
    assert data.default_private_threads() >= 2
    assert not training_dataset(demo_data_dir, autotune=False).options().autotune.enabled
    # Outside a run (trainer.evaluate, ...) too: autotuning only where an accelerator waits; this host has none.
    assert data.standalone_options() == data.PipelineOptions(autotune=False)


@pytest.mark.parametrize("cache", ["memory", "file"])
def test_cache_keeps_random_crops_new_each_epoch(demo_data_dir, tmp_path, cache):
    manifest = schema.read_manifest(str(demo_data_dir))
    num_examples = manifest["splits"]["train"]["num_examples"]
    cache = str(tmp_path / "cache") if cache == "file" else cache
    dataset = training_dataset(demo_data_dir, batch_size=num_examples, cache=cache, seed=3, deterministic=True)
    (epoch_1_images, epoch_1_labels), (epoch_2_images, epoch_2_labels) = first_batches(dataset, 2)
    np.testing.assert_array_equal(np.sort(epoch_1_labels), np.sort(epoch_2_labels))  # same examples
    assert not np.array_equal(np.sort(epoch_1_images.sum(axis=(1, 2, 3))), np.sort(epoch_2_images.sum(axis=(1, 2, 3))))
    if cache != "memory":
        assert any(name.startswith("train") for name in (tmp_path / "cache").iterdir() for name in [name.name])
    evaluation = data.make_dataset(
        data_dir=str(demo_data_dir), manifest=manifest, split="validation", image_size=16, batch_size=4,
        training=False, options=data.PipelineOptions(cache=cache),
    )
    first, second = list(evaluation), list(evaluation)  # the second pass reads the cache
    for batch_a, batch_b in zip(first, second):
        np.testing.assert_array_equal(batch_a[0].numpy(), batch_b[0].numpy())


def image_keys(dataset, count):
    keys = []
    for images, _ in dataset.take(count):
        keys.extend(image.tobytes() for image in images.numpy())
    return keys


@pytest.mark.parametrize("num_pipelines", [2, 3])  # 2 shards: one each; 3: more pipelines than shards
def test_input_context_shards_training_data_and_batches_per_replica(demo_data_dir, num_pipelines):
    manifest = schema.read_manifest(str(demo_data_dir))
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) == 2
    num_examples = manifest["splits"]["train"]["num_examples"]
    keys = []
    for pipeline_id in range(num_pipelines):
        context = tf.distribute.InputContext(
            num_input_pipelines=num_pipelines, input_pipeline_id=pipeline_id, num_replicas_in_sync=num_pipelines
        )
        dataset = training_dataset(
            demo_data_dir, batch_size=num_pipelines, input_context=context, crop_min_area=1.0, flip=False,
            seed=0, shuffle_buffer=1, deterministic=True,
        )
        assert dataset.element_spec[0].shape == (1, 16, 16, 3)  # per-replica batch: 3 global / 3 replicas
        if num_pipelines == 2:
            epoch = shards[pipeline_id]["num_examples"]
        else:
            epoch = len(range(pipeline_id, num_examples, num_pipelines))
        keys.extend(image_keys(dataset, epoch))
    assert len(keys) == len(set(keys)) == num_examples  # disjoint shares that cover the split


def test_input_context_splits_evaluation_evenly_and_exactly(demo_data_dir):
    manifest = schema.read_manifest(str(demo_data_dir))
    num_examples = manifest["splits"]["validation"]["num_examples"]
    labels, weights, lengths = [], [], []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=4)
        dataset = data.make_dataset(
            data_dir=str(demo_data_dir), manifest=manifest, split="validation", image_size=16, batch_size=8,
            training=False, input_context=context,
        )
        batches = list(dataset)
        assert int(dataset.cardinality()) == len(batches)
        assert all(batch[0].shape[0] == 2 for batch in batches)
        lengths.append(len(batches))
        labels.extend(label for batch in batches for label in batch[1].numpy())
        weights.extend(weight for batch in batches for weight in batch[2].numpy())
    assert lengths[0] == lengths[1] and len(weights) == -(-num_examples // 8) * 8
    real = np.array(weights) > 0
    assert real.sum() == num_examples and np.sum(weights) == pytest.approx(len(weights))
    counts = np.bincount(np.array(labels)[real], minlength=len(manifest["classes"]))
    assert counts.tolist() == [manifest["splits"]["validation"]["class_counts"][name] for name in manifest["classes"]]


@pytest.fixture(scope="module")
def data_service_address():
    dispatcher = tf.data.experimental.service.DispatchServer()
    dispatcher_address = dispatcher.target.split("://")[1]
    worker = tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher_address=dispatcher_address)
    )
    yield dispatcher.target
    worker.stop()
    dispatcher.stop()


@pytest.mark.parametrize("mode", ["parallel_epochs", "distributed_epoch"])
def test_tf_data_service_runs_the_training_pipeline(demo_data_dir, data_service_address, mode):
    manifest = schema.read_manifest(str(demo_data_dir))
    augmentation = data.make_augmentation(flip=True, rotation=0.1, seed=0)
    dataset = training_dataset(demo_data_dir, augmentation=augmentation, data_service=data_service_address,
                               data_service_mode=mode)
    for images, labels in dataset.take(4):
        assert images.shape == (4, 16, 16, 3) and images.dtype == tf.float32
        assert set(labels.numpy()) <= set(range(len(manifest["classes"])))


def test_bad_arguments_are_refused_with_the_flag_name(demo_data_dir):
    with pytest.raises(ValueError, match="--tf_data_service_mode 'sometimes'"):
        training_dataset(demo_data_dir, data_service="grpc://localhost:1", data_service_mode="sometimes")
    with pytest.raises(ValueError, match=r"--crop_min_area 0 must be within \(0, 1\]"):
        training_dataset(demo_data_dir, crop_min_area=0)


@pytest.mark.parametrize("min_area", [1.0, 0.5])
def test_flip_in_the_decode_mirrors_some_images(min_area):
    image = np.random.default_rng(4).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    encoded = tf.constant(encode(image, "PNG"))
    plain = data.decode_random_crop(encoded, 24, min_area=1.0).numpy()
    outputs = [
        data.decode_random_crop(encoded, 24, min_area=min_area, flip=True, seed=tf.constant([0, index], tf.int64))
        for index in range(8)
    ]
    dataset = tf.data.Dataset.range(8).map(
        lambda index: data.decode_random_crop(encoded, 24, min_area=min_area, flip=True, seed=tf.stack([0, index]))
    )
    for eager, in_graph in zip(outputs, dataset):
        np.testing.assert_array_equal(eager.numpy(), in_graph.numpy())
    if min_area == 1.0:
        mirrored = [np.array_equal(output.numpy(), plain[:, ::-1]) for output in outputs]
        kept = [np.array_equal(output.numpy(), plain) for output in outputs]
        assert all(a or b for a, b in zip(mirrored, kept)) and any(mirrored) and any(kept)
    unseeded = {data.decode_random_crop(encoded, 24, min_area=1.0, flip=True).numpy().tobytes() for _ in range(12)}
    assert len(unseeded) == 2


def test_training_without_flip_or_crop_gives_whole_images(demo_data_dir):
    dataset = training_dataset(demo_data_dir, crop_min_area=1.0, flip=False, seed=0, deterministic=True)
    evaluation_like = training_dataset(demo_data_dir, crop_min_area=1.0, flip=False, seed=0, deterministic=True)
    for (images_a, _), (images_b, _) in zip(first_batches(dataset, 2), first_batches(evaluation_like, 2)):
        np.testing.assert_array_equal(images_a, images_b)


def test_pipeline_and_augmentation_options_name_the_flag_of_a_bad_value():
    with pytest.raises(ValueError, match="--shuffle_buffer 0 must be at least 1"):
        data.PipelineOptions(shuffle_buffer=0)
    with pytest.raises(ValueError, match="--data_threads -1 must be 0"):
        data.PipelineOptions(private_threads=-1)
    with pytest.raises(ValueError, match="--augment_on 'gpu' must be host or device"):
        data.LayerAugmentation(on="gpu")
    with pytest.raises(ValueError, match=r"--augment_rotation 1.5 must be within \[0, 1\]"):
        data.LayerAugmentation(rotation=1.5)


def test_dct_scale_is_the_largest_ratio_that_keeps_the_window_at_least_the_image_size():
    smaller_sides = tf.constant([10, 159, 160, 319, 320, 639, 640, 1279, 1280, 5000])
    branches = data.dct_scale_branch(smaller_sides, 160).numpy()
    ratios = [data.DCT_RATIOS[branch] for branch in branches]
    assert ratios == [1, 1, 1, 1, 2, 2, 4, 4, 8, 8]
    assert all(side // ratio >= 160 or ratio == 1 for side, ratio in zip(smaller_sides.numpy(), ratios))


@pytest.mark.parametrize("height, width", [(1300, 1700), (1700, 1300), (700, 2000), (333, 1001)])
def test_dct_scaled_crops_match_the_full_resolution_decode_on_a_large_smooth_image(height, width):
    # A smooth photo-like image (gradients and soft blobs), as a phone photo is at 1/8 scale, so both
    # paths see the same content; differences come from the DCT-domain downscale alone.
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([rows / height * 255, columns / width * 255,
                      127 + 100 * np.sin(rows / 97.0) * np.cos(columns / 131.0)], axis=-1)
    encoded = tf.constant(encode(np.clip(image, 0, 255).astype(np.uint8), "JPEG"))
    for min_area in (1.0, 0.3):
        seed = tf.constant([3, 5], tf.int64)
        scaled = data.decode_random_crop(encoded, 64, min_area=min_area, seed=seed).numpy()
        full = data.decode_random_crop(encoded, 64, min_area=min_area, seed=seed, dct_scale=False).numpy()
        assert scaled.shape == full.shape == (64, 64, 3)
        assert np.abs(scaled - full).mean() < 2.0, (min_area, np.abs(scaled - full).mean())
    central_scaled = data.decode_and_resize(encoded, 64, dct_scale=True).numpy()
    central_exact = data.decode_and_resize(encoded, 64, dct_scale=False).numpy()
    assert np.abs(central_scaled - central_exact).mean() < 2.0


def test_dct_scaled_random_crops_never_fail_at_the_image_edges():
    # Odd sizes, so windows that end on the last pixel round differently at each scale.
    image = np.random.default_rng(4).integers(0, 256, (517, 771, 3), dtype=np.uint8)
    encoded = tf.constant(encode(image, "JPEG"))
    crops = tf.data.Dataset.range(200).map(
        lambda index: data.decode_random_crop(encoded, 48, min_area=0.05, seed=tf.stack([index, 1])))
    for crop in crops:
        assert crop.shape == (48, 48, 3)


def test_shards_stored_far_larger_than_the_training_size_get_one_advice(demo_data_dir):
    manifest = schema.read_manifest(str(demo_data_dir))
    # The demo images' longer sides are 48-120 px: 4x a 16 px training size or more, not 4x 32 px.
    advice = data.stored_size_advice(str(demo_data_dir), manifest, 16)
    assert advice.startswith("the train split's images are stored at a longer side of ")
    assert "--max_side=32 " in advice and "benchmarks/pipeline.py" in advice
    assert data.stored_size_advice(str(demo_data_dir), manifest, 32) is None


def test_augmentation_runs_on_the_accelerator_by_default_and_on_the_host_without_one():
    class Extended:  # what a strategy's `extended` reports of its devices
        def __init__(self, devices):
            self.worker_devices = devices

    class Strategy:
        def __init__(self, devices):
            self.extended = Extended(devices)

    gpus = Strategy(["/job:localhost/replica:0/task:0/device:GPU:0", "/job:localhost/replica:0/task:0/device:GPU:1"])
    tpu = Strategy(["/job:worker/replica:0/task:0/device:TPU:0"])
    assert data.augmentation_place("auto", gpus) == data.augmentation_place("auto", tpu) == "device"
    assert data.augmentation_place("auto", tf.distribute.get_strategy()) == "host"
    assert data.augmentation_place("host", gpus) == "host" and data.augmentation_place("device", tf.distribute.get_strategy()) == "device"
