"""tf.data pipelines over the converter's shards (their manifest and labels are read through tfrecords/schema.py).

One function per dataset, in the canonical order:
list shards -> interleave -> [cache] -> shuffle -> repeat -> map(parse + decode + crop + resize) -> batch
-> augment -> [tf.data service] -> prefetch.
Images leave the pipeline as float32 RGB in [0, 255]; scaling for the backbone happens inside the model.

Training decodes a random resized crop straight from the JPEG bytes (tf.io.decode_and_crop_jpeg only
decodes the window it keeps); evaluation and serving take a central crop (decode_and_resize).
"""

import contextlib
import dataclasses
import os
import re

import keras
import tensorflow as tf

from tfrecords import schema
from tfrecords.writing import images

AUTOTUNE = tf.data.AUTOTUNE
# Evaluation and serving keep the central 87.5% of each side (the Inception / TF-slim convention):
# training crops cover on average about that much of the image, so both see objects at similar scales.
EVAL_CROP_FRACTION = 0.875
# Random resized crop: aspect ratios of the window (it is then resized to a square) and tries per image.
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_MAX_ATTEMPTS = 10
MAX_INTERLEAVE_FILES = 16
# The scales libjpeg decodes at in the DCT (tf.io.decode_and_crop_jpeg's `ratio`), in increasing order.
DCT_RATIOS = (1, 2, 4, 8)
# Starts the message of a record whose label disagrees with the manifest (parse_record).
RECORD_MISMATCH = "record label does not match the manifest:"
DATA_SERVICE_MODES = ("parallel_epochs", "distributed_epoch")
AUGMENTATION_LAYERS = ("rotation", "zoom", "translation", "contrast", "brightness")


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How make_dataset reads, decodes and feeds the shards (the flags of the same names).

    shuffle_buffer: examples in the training shuffle buffer.
    seed: seed of the shuffles and the random crops (None: different every run).
    deterministic: a fixed element order in training too (evaluation always has one).
    cache: "" (none), "memory", or a local folder for cache files. The encoded bytes are cached, before
        the random crop, so every epoch still gets new crops.
    crop_min_area: smallest share of the image a training crop covers; 1.0 turns random crops off.
    flip: random left-right flips of training images, done in the decode (see decode_random_crop).
    dct_scale: decode large training JPEGs at a reduced scale in the DCT (see decode_random_crop).
    ram_budget_gb, private_threads, autotune: see dataset_options.
    data_service: "grpc://host:port" of a tf.data service dispatcher that runs the training pipeline on
        its workers; "" runs it here. Evaluation always runs here.
    data_service_mode: "parallel_epochs" (every worker runs the whole pipeline) or "distributed_epoch"
        (the workers split the files between them).
    """

    shuffle_buffer: int = 1000
    seed: int | None = None
    deterministic: bool = False
    cache: str = ""
    crop_min_area: float = 0.25
    flip: bool = True
    dct_scale: bool = True
    ram_budget_gb: float = 0.0
    private_threads: int = 0
    autotune: bool = True
    data_service: str = ""
    data_service_mode: str = "parallel_epochs"

    def __post_init__(self):
        if self.data_service_mode not in DATA_SERVICE_MODES:
            raise ValueError(f"--tf_data_service_mode {self.data_service_mode!r} is not one of {DATA_SERVICE_MODES}")
        if not 0.0 < self.crop_min_area <= 1.0:
            raise ValueError(f"--crop_min_area {self.crop_min_area!r} must be within (0, 1]; 1 turns random crops off")
        if self.private_threads < 0:
            raise ValueError(f"--data_threads {self.private_threads} must be 0 (two per core) or a thread count")
        if self.shuffle_buffer < 1:
            raise ValueError(f"--shuffle_buffer {self.shuffle_buffer} must be at least 1")

    def for_host(self, strategy: tf.distribute.Strategy) -> "PipelineOptions":
        """These options with tf.data's autotuning on only where the strategy runs on GPUs or TPUs (dataset_options)."""
        return dataclasses.replace(self, autotune=has_accelerator(strategy))

    @property
    def augments(self) -> bool:
        """True when the decode itself augments (random crops or flips)."""
        return self.flip or self.crop_min_area < 1.0


@dataclasses.dataclass(frozen=True)
class LayerAugmentation:
    """The Keras augmentation layers of training (the --augment_* flags; 0 = off) and where they run:
    "host" (in tf.data, on uint8 batches) or "device" (the model's first layers, inactive at inference)."""

    rotation: float = 0.0
    zoom: float = 0.0
    translation: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    on: str = "host"

    def __post_init__(self):
        if self.on not in ("host", "device"):
            raise ValueError(f"--augment_on {self.on!r} must be host or device")
        make_augmentation(flip=False, **self.factors())  # raises ValueError naming a bad --augment_* value

    def factors(self) -> dict:
        return {name: getattr(self, name) for name in AUGMENTATION_LAYERS}

    def any(self) -> bool:
        return any(self.factors().values())

    def make_layers(self, *, on: str, seed: int | None):
        """The layers when they run `on` "host" or "device" (else None), for uint8 or float32 batches."""
        if on != self.on:
            return None
        return make_augmentation(flip=False, seed=seed, pixels="uint8" if on == "host" else "float32", **self.factors())


def augmentation_place(choice: str, strategy: tf.distribute.Strategy) -> str:
    """Resolves --augment_on: "auto" is "device" when the strategy's devices are GPUs or TPUs, else "host".

    On an accelerator the layers cost next to nothing; on a CPU host a RandomRotation alone costs about
    0.7 ms per 160 px image and core (its ImageProjectiveTransformV3 kernel, profiled), and on a CPU-only
    machine "device" is the same CPU, so host keeps that work in tf.data, overlapped with the step.
    """
    if choice != "auto":
        return choice
    return "device" if has_accelerator(strategy) else "host"


def has_accelerator(strategy: tf.distribute.Strategy) -> bool:
    """Whether the strategy's devices are GPUs or TPUs (False: a CPU host)."""
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy runs on TensorFlow's default device: a GPU when there is one
        devices = [device.name for device in tf.config.list_logical_devices()]
    return any("GPU" in device.upper() or "TPU" in device.upper() for device in devices)


def standalone_options() -> PipelineOptions:
    """The PipelineOptions of a pass outside a training run (trainer.evaluate, trainer.data_quality, the int8 export's
    calibration images): the defaults, for this host (PipelineOptions.for_host)."""
    return PipelineOptions().for_host(tf.distribute.get_strategy())


def check_data(data_dir: str, manifest: dict) -> None:
    """Checks cheaply (no shard is read) that data_dir holds what its manifest says.

    labels.txt must list the manifest's classes in the same order, the counts must add up, and every
    shard must exist with the size the converter recorded: a shard cut short (even at a record boundary)
    or missing is found here, before training. What needs a full read (a flipped bit) is found while
    reading (describe_read_error) or by `python -m tfrecords.verify`.

    Raises:
        ValueError: naming the first mismatch and what to do.
    """
    verify = f"check it with: python -m tfrecords.verify --data_dir={data_dir} (or convert the images again)"
    classes = manifest.get("classes") or []
    if len(set(classes)) != len(classes) or not all(isinstance(name, str) and name for name in classes):
        raise ValueError(f"--data_dir {data_dir!r}: the manifest's classes {classes[:5]}... are not distinct names; {verify}")
    labels = schema.read_labels(data_dir)
    if labels is None:
        raise ValueError(f"--data_dir {data_dir!r} has no {schema.LABELS_FILE}; {verify}")
    if labels != classes:
        raise ValueError(
            f"--data_dir {data_dir!r}: {schema.LABELS_FILE} lists {labels[:5]}..., the manifest {classes[:5]}... "
            f"(label ids would be swapped); {verify}"
        )
    for name, split in manifest["splits"].items():
        counted = sum(split["class_counts"].get(class_name, 0) for class_name in classes)
        in_shards = sum(shard["num_examples"] for shard in split["shards"])
        if set(split["class_counts"]) - set(classes) or not split["num_examples"] == counted == in_shards:
            raise ValueError(
                f"--data_dir {data_dir!r}: the manifest's {name!r} split counts disagree (num_examples "
                f"{split['num_examples']}, class counts {counted}, shards {in_shards}); {verify}"
            )
        for shard in split["shards"]:
            path = tf.io.gfile.join(data_dir, shard["file"])
            if not tf.io.gfile.exists(path):
                raise ValueError(f"--data_dir {data_dir!r}: shard {shard['file']} is missing; {verify}")
            size = tf.io.gfile.stat(path).length
            if "size_bytes" in shard and size != shard["size_bytes"]:
                raise ValueError(
                    f"--data_dir {data_dir!r}: shard {shard['file']} has {size} bytes, the manifest says "
                    f"{shard['size_bytes']} (cut short or replaced); {verify}"
                )


# Stored images whose longer side is this many times the training size or more are worth converting smaller.
LARGE_STORED_FACTOR = 4
STORED_SIZE_SAMPLE = 16
# benchmarks/pipeline.py, phone-size photos (3000 x 2250, JPEG 90) at 160 px on 2 cores, default policy:
# shards converted with --max_side=256 against the same photos stored as is (DCT-scaled decode); three runs of
# 3 rounds each: 5423 vs 344, 5661 vs 351 and 4754 vs 302 images/s.
MEASURED_MAX_SIDE_SPEEDUP = "about 16x faster (15.7x to 16.1x in three runs)"


def stored_size_advice(data_dir: str, manifest: dict, image_size: int) -> str | None:
    """A one-time advice when the train split's images are stored far larger than the training size, else None.

    Reads the stored height and width of the first records of the first train shard (a few MB at most).
    Decoding a multi-megapixel JPEG costs several milliseconds per image even at 1/8 scale, so a pipeline on
    such shards stays input-bound; converting with --max_side near twice the training size removes that.
    """
    path = shard_paths(data_dir, manifest, "train")[0]
    sides = []
    for record in tf.data.TFRecordDataset(path).take(STORED_SIZE_SAMPLE):
        features = schema.parse_example(record)
        sides.append(max(int(features["image/height"]), int(features["image/width"])))
    if not sides:
        return None
    median = sorted(sides)[len(sides) // 2]
    if median < LARGE_STORED_FACTOR * image_size:
        return None
    return (
        f"the train split's images are stored at a longer side of {median} px (median of the first {len(sides)}), "
        f"{median / image_size:.0f}x the --image_size {image_size}: decoding them dominates the input pipeline. "
        f"Converting with --max_side={2 * image_size} (python -m tfrecords.build ... --max_side={2 * image_size}) "
        f"made the default policy {MEASURED_MAX_SIDE_SPEEDUP} on phone-size photos in benchmarks/pipeline.py"
    )


class DataError(ValueError):
    """A shard failed to read, or a record disagreed with the manifest, during a run (the message names it)."""


@contextlib.contextmanager
def data_errors(data_dir: str, manifest: dict):
    """Turns a shard's read or label error inside the block into a DataError naming the shard."""
    try:
        yield
    except tf.errors.OpError as error:
        problem = describe_read_error(error, data_dir, manifest)
        if problem is None:
            raise
        raise DataError(problem) from error


def describe_read_error(error: tf.errors.OpError, data_dir: str, manifest: dict) -> str | None:
    """A one-line description of a shard that failed to read or parse during a run, or None if error is not one.

    tf.data's errors do not name the file, so the shards are scanned (only now, after a failure) for the
    first one that does not read back whole.
    """
    message = error.message
    if not (
        isinstance(error, tf.errors.DataLossError)
        or RECORD_MISMATCH in message
        or "Could not parse example input" in message
        or "truncated record" in message
    ):
        return None
    mismatch = re.search(r"\[label\] \[(-?\d+)\] \[class\] \[(.*?)\] \[file\] \[(.*?)\]", message)
    if mismatch:
        # tf.debugging.Assert prints its data after the message: the label, class name and source path.
        label, class_name, source = mismatch.groups()
        where = (
            f"record of {source!r} has label {label} for class {class_name!r}, but the manifest's classes are "
            f"{manifest['classes'][:5]}"
        )
    elif RECORD_MISMATCH in message:
        where = "a record's label does not match the manifest's classes"
    else:
        # TensorFlow wraps the reason in "{{function_node ...}} reason [Op:...]": keep the reason.
        reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", message.strip().splitlines()[-1]).strip()
        where = f"a record failed to read ({reason[:200]})"
    for split in manifest["splits"]:
        for path in shard_paths(data_dir, manifest, split):
            records = tf.data.TFRecordDataset(path).map(lambda record: parse_record(record, manifest["classes"]))
            try:
                for _ in records:
                    pass
            except tf.errors.OpError:
                return f"shard {path}: {where}; check the data with: python -m tfrecords.verify --data_dir={data_dir}"
    return f"{where} in --data_dir {data_dir!r}; check it with: python -m tfrecords.verify --data_dir={data_dir}"


def parse_record(serialized: tf.Tensor, class_names: list[str]) -> dict:
    """Parses one record and checks its label id names its class in class_names (a failure stops the run).

    A shard whose labels disagree with the manifest (classes reordered, or more classes than listed) would
    otherwise train, and export, with the names swapped.
    """
    features = schema.parse_example(serialized)
    label, text = features["image/class/label"], features["image/class/text"]
    names = tf.constant(class_names)
    in_range = tf.logical_and(label >= 0, label < len(class_names))
    named = tf.gather(names, tf.clip_by_value(label, 0, len(class_names) - 1))
    matches = tf.logical_and(in_range, tf.equal(named, text))
    check = tf.debugging.Assert(
        matches, [RECORD_MISMATCH, "label", label, "class", text, "file", features["image/source"]], summarize=3
    )
    with tf.control_dependencies([check]):
        return {key: tf.identity(value) for key, value in features.items()}


def shard_paths(data_dir: str, manifest: dict, split: str) -> list[str]:
    """Returns the full paths of a split's non-empty shards, checking the split exists.

    Empty shards (a split with about as many shards as images: tfrecords/writing/plan.py) are left out, so no input
    pipeline of a multi-worker job is given only empty files.
    """
    if split not in manifest["splits"]:
        raise ValueError(
            f"--data_dir {data_dir!r} has no {split!r} split (it has {sorted(manifest['splits'])}); "
            "rebuild it with --validation_fraction / --test_fraction above 0, or a pre-split input folder"
        )
    shards = manifest["splits"][split]["shards"]
    return [tf.io.gfile.join(data_dir, shard["file"]) for shard in shards if shard["num_examples"]]


def _decode_window(
    encoded: tf.Tensor, offset_height, offset_width, height, width, fast: bool = False, min_side: int = 0
) -> tf.Tensor:
    """Decodes one window of an encoded image to uint8 RGB; for JPEG only that window is decoded.

    fast: libjpeg's fast integer IDCT and plain (not "fancy") chroma upsampling, about 1.35x faster for
        pixels that differ by a few levels: for random training crops, not for evaluation or serving.
    min_side: above 0, a JPEG window is decoded at the smallest scale libjpeg offers (1/2, 1/4 or 1/8, in
        the DCT: dct_scale) that keeps both its sides at least min_side pixels, so a 3000 px photo is never
        decoded whole to be shrunk to 160 px; the window then comes out that many times smaller.
    """
    window = tf.stack([offset_height, offset_width, height, width])
    options = dict(dct_method="INTEGER_FAST", fancy_upscaling=False) if fast else {}

    def decode_jpeg_window(ratio: int):
        def decode():
            # libjpeg scales the whole image to ceil(side / ratio); the window is given in those coordinates.
            scaled_shape = (tf.io.extract_jpeg_shape(encoded)[:2] + ratio - 1) // ratio
            begin = window[:2] // ratio
            end = tf.minimum((window[:2] + window[2:] + ratio - 1) // ratio, scaled_shape)
            scaled_window = tf.concat([begin, tf.maximum(end - begin, 1)], axis=0)
            return tf.io.decode_and_crop_jpeg(encoded, scaled_window, channels=3, ratio=ratio, **options)

        return decode

    def decode_jpeg():
        if not min_side:
            return tf.io.decode_and_crop_jpeg(encoded, window, channels=3, **options)
        # `ratio` is an attribute of the op, not a tensor: one branch per scale.
        branch = dct_scale_branch(tf.minimum(height, width), min_side)
        return tf.switch_case(branch, [decode_jpeg_window(ratio) for ratio in DCT_RATIOS])

    def decode_any_then_crop():
        return tf.image.crop_to_bounding_box(decode_on_white(encoded), offset_height, offset_width, height, width)

    return tf.cond(tf.io.is_jpeg(encoded), decode_jpeg, decode_any_then_crop)


def decode_on_white(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes PNG, WebP, GIF or BMP bytes to uint8 RGB [height, width, 3], transparent pixels composited on white
    with the converter's formula (tfrecords.writing.images.composite_on_white): a file served gets the pixels its converted
    copy was trained on, not the colour hidden under its transparent pixels.

    GIF and BMP decode as RGB: TensorFlow decodes GIF transparency as black, and the fourth byte of a 32-bit BMP
    is usually padding, not alpha.
    """
    signature = tf.strings.substr(encoded, 0, 4)

    def png():
        # libpng gives every PNG an alpha channel: grey+alpha, palette and colour-key (tRNS) transparency too.
        return tf.io.decode_png(encoded, channels=4)

    def webp():
        # WebP decodes only at its own channel count: 3, or 4 with alpha.
        image = tf.io.decode_image(encoded, channels=0, expand_animations=False)
        alpha = tf.where(tf.shape(image)[2] == 4, image[..., -1:], tf.constant(255, tf.uint8))
        return tf.concat([image[..., :3], alpha], axis=-1)

    def composite(rgba):
        rgba = tf.cast(rgba, tf.int32)
        return tf.cast(images.composite_on_white(rgba[..., :3], rgba[..., 3:]), tf.uint8)

    image = tf.case(
        [(signature == b"\x89PNG", lambda: composite(png())), (signature == b"RIFF", lambda: composite(webp()))],
        default=lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )
    return tf.ensure_shape(image, [None, None, 3])


def dct_scale_branch(smaller_side: tf.Tensor, min_side: int) -> tf.Tensor:
    """The index into DCT_RATIOS of the largest ratio r with smaller_side >= r * min_side (0, ratio 1, when none)."""
    fits = [tf.cast(smaller_side >= ratio * min_side, tf.int32) for ratio in DCT_RATIOS[1:]]
    return tf.add_n(fits)  # the ratios grow, so the count of those that fit is the largest one's index


def _image_shape(encoded: tf.Tensor) -> tf.Tensor:
    """Returns [height, width] of an encoded image, reading only the header for JPEG."""

    def decode_any_shape():
        # channels=0: a WebP decodes only at its own channel count.
        return tf.shape(tf.io.decode_image(encoded, channels=0, expand_animations=False))[:2]

    return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.io.extract_jpeg_shape(encoded)[:2], decode_any_shape)


def central_crop_window(shape: tf.Tensor, crop_fraction: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (offset, size), each [height, width], of the central crop keeping crop_fraction of each side."""
    crop = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * crop_fraction), tf.int32), 1)
    return (shape - crop) // 2, crop


def resize_pixels(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes one image [height, width, 3] or a batch of them to float32 [0, 255] at image_size."""
    # Antialiasing costs as much as the decode itself, and only matters when shrinking by more than 2x
    # (bilinear then skips pixels); below that, plain bilinear already reads every source pixel.
    # TensorFlow's resize kernels are faster on float32 than on uint8 input, even counting the cast.
    # Both kernels weigh pixels with non-negative weights that sum to 1, so the output stays in [0, 255]
    # without a clip.
    image = tf.cast(image, tf.float32)
    shrinks_a_lot = tf.reduce_max(tf.shape(image)[-3:-1]) > 2 * image_size
    return tf.cond(
        shrinks_a_lot,
        lambda: tf.image.resize(image, [image_size, image_size], antialias=True),
        lambda: tf.image.resize(image, [image_size, image_size]),
    )


def decode_and_resize(
    encoded: tf.Tensor, image_size: int, crop_fraction: float = EVAL_CROP_FRACTION, dct_scale: bool = True
) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes, keeps the central crop, resizes to float32 [image_size, image_size, 3].

    This is the evaluation path, and the exported model's serving signature uses this same function, so a
    served image is prepared exactly as the evaluation images were. Works eagerly and in-graph.

    Args:
        encoded: scalar string tensor of encoded image bytes.
        image_size: output height and width.
        crop_fraction: share of each side kept around the centre (1.0: the whole image).
        dct_scale: decode a JPEG whose crop is at least twice image_size at 1/2, 1/4 or 1/8 scale in the DCT
            (libjpeg's accurate IDCT), keeping the crop at least image_size on both sides, as training does.
            On phone-size photos this is about 3x less CPU and, measured on the test split of flowers_1500
            upscaled to 2000 x 1500 (336 images, 6 models), agrees with the exact path (False) on 96-99% of
            top-1 labels at the same accuracy (mean 0.883 both ways for models trained likewise); images
            below twice image_size decode exactly either way.

    Returns:
        float32 [image_size, image_size, 3] pixels in [0, 255].
    """
    shape = _image_shape(encoded)
    offset, crop = central_crop_window(shape, crop_fraction)
    image = _decode_window(encoded, offset[0], offset[1], crop[0], crop[1], min_side=image_size if dct_scale else 0)
    return resize_pixels(image, image_size)


def decode_random_crop(
    encoded: tf.Tensor, image_size: int, *, min_area: float, flip: bool = False, seed: tf.Tensor | None = None,
    dct_scale: bool = True,
) -> tf.Tensor:
    """Decodes a random resized crop (the Inception crop) to float32 [image_size, image_size, 3] in [0, 255].

    The window covers `min_area` to all of the image with an aspect ratio in CROP_ASPECT_RATIO_RANGE; for
    JPEG bytes only the window is decoded (tf.io.decode_and_crop_jpeg, with the fast IDCT), other formats
    decode then crop.

    Args:
        encoded: scalar string tensor of encoded image bytes.
        image_size: output height and width.
        min_area: smallest share of the image area a crop may cover (1.0: no crop, the whole image).
        flip: also flip left-right at random, on the small uint8 crop: about twice as fast in tf.data as
            keras.layers.RandomFlip on float batches (benchmarks/pipeline.py).
        seed: an int [2] tensor for a reproducible crop and flip (stateless), or None for random ones.
        dct_scale: decode a large JPEG window at 1/2, 1/4 or 1/8 scale in the DCT when it stays at least
            image_size on both sides (never upsampled because of it): 2-4x faster on multi-megapixel photos.
    """
    shape = _image_shape(encoded)
    min_side = image_size if dct_scale else 0
    if min_area >= 1.0:
        image = _decode_window(encoded, 0, 0, shape[0], shape[1], fast=True, min_side=min_side)
        return resize_pixels(_random_flip(image, seed) if flip else image, image_size)
    image_shape = tf.concat([shape, [3]], axis=0)
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])
    arguments = dict(
        bounding_boxes=whole_image,
        min_object_covered=min_area,
        aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
        area_range=(min_area, 1.0),
        max_attempts=CROP_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    if seed is None:
        begin, size, _ = tf.image.sample_distorted_bounding_box(image_shape, **arguments)
    else:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(image_shape, seed=seed, **arguments)
    image = _decode_window(encoded, begin[0], begin[1], size[0], size[1], fast=True, min_side=min_side)
    return resize_pixels(_random_flip(image, seed) if flip else image, image_size)


def _random_flip(image: tf.Tensor, seed: tf.Tensor | None) -> tf.Tensor:
    if seed is None:
        return tf.image.random_flip_left_right(image)
    # A seed of its own: the crop's seed would tie the flip to the crop's size.
    return tf.image.stateless_random_flip_left_right(image, seed=seed + tf.constant([0, 1], seed.dtype) * 2**31)


def pad_with_zero_weights(dataset: tf.data.Dataset, num_examples: int, batch_size: int):
    """Adds a sample weight to each (image, label) and zero-weight padding up to a whole batch.

    An evaluation pass must see every example, but a short last batch would leave some replicas an
    empty batch, which Keras 3 cannot run under MirroredStrategy, and a TPU needs static shapes.
    Padding weighs 0. Real examples weigh padded_count / num_examples rather than 1: Keras averages
    the loss over whole batches (padding included), and this constant makes both the loss and the
    weighted accuracy come out exactly as over the real examples alone.
    """
    num_padding = -num_examples % batch_size
    real_weight = (num_examples + num_padding) / num_examples
    # Elements may carry more after the label (a thumbnail and the record's position: with_thumbnails).
    dataset = dataset.map(lambda image, label, *more: (image, label, tf.constant(real_weight, tf.float32), *more))
    padding = tf.data.Dataset.from_tensors(tf.nest.map_structure(
        lambda spec: tf.zeros(spec.shape, spec.dtype), dataset.element_spec
    ))
    return dataset.concatenate(padding.repeat(num_padding))


def make_augmentation(
    *,
    flip: bool = True,
    rotation: float = 0.0,
    zoom: float = 0.0,
    translation: float = 0.0,
    contrast: float = 0.0,
    brightness: float = 0.0,
    seed: int | None = None,
    pixels: str = "float32",
):
    """Returns a Keras preprocessing-layer pipeline for training batches, or None when all are off.

    The layers work on [0, 255] batches, only when called with training=True, so the same kind of object
    can run in tf.data (make_dataset's `augmentation`) or at the front of the model
    (model.build_model's `augmentation`). For the model, create it inside `strategy.scope()`.

    Args:
        flip: random horizontal flips.
        rotation: RandomRotation factor, a fraction of a full turn (0.1 = up to +-36 degrees); 0 = off.
        zoom: RandomZoom factor (0.1 = up to 10% in or out); 0 = off.
        translation: RandomTranslation factor, a fraction of height and width; 0 = off.
        contrast: RandomContrast factor (0.2 = contrast scaled by 0.8 to 1.2); 0 = off.
        brightness: RandomBrightness factor, a fraction of the value range added or removed; 0 = off.
        seed: seed for reproducible augmentation.
        pixels: dtype of the batches the geometric layers (flip, rotation, zoom, translation) move:
            "uint8" for make_dataset (a quarter of the bytes, about 15% less CPU for a rotation, and
            rounding is lossless for 8-bit photos), "float32" in the model. Contrast and brightness
            always compute in float32.
    """
    if pixels not in ("uint8", "float32"):
        raise ValueError(f"pixels {pixels!r} must be uint8 or float32")
    for name, value in dict(rotation=rotation, zoom=zoom, translation=translation, contrast=contrast,
                            brightness=brightness).items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--augment_{name} {value!r} must be within [0, 1] (0 turns it off)")
    # float32 (not bfloat16) even under mixed precision: rotating or shifting pixels in bfloat16 would round them.
    common = dict(seed=seed, dtype="float32")
    geometric = dict(seed=seed, dtype=pixels)
    augment_layers = []
    if flip:
        augment_layers.append(keras.layers.RandomFlip("horizontal", **geometric))
    if rotation > 0:
        augment_layers.append(keras.layers.RandomRotation(rotation, fill_mode="reflect", **geometric))
    if zoom > 0:
        augment_layers.append(keras.layers.RandomZoom(zoom, fill_mode="reflect", **geometric))
    if translation > 0:
        augment_layers.append(keras.layers.RandomTranslation(translation, translation, fill_mode="reflect", **geometric))
    if contrast > 0:
        augment_layers.append(keras.layers.RandomContrast(contrast, value_range=(0, 255), **common))
    if brightness > 0:
        augment_layers.append(keras.layers.RandomBrightness(brightness, value_range=(0, 255), **common))
    if not augment_layers:
        return None
    return keras.Sequential(augment_layers, name="augmentation")


# The layer types make_augmentation uses: random only when called with training=True.
AUGMENTATION_LAYER_TYPES = (keras.layers.RandomFlip, keras.layers.RandomRotation, keras.layers.RandomZoom,
                            keras.layers.RandomTranslation, keras.layers.RandomContrast, keras.layers.RandomBrightness)


def has_augmentation_layers(model: keras.Model) -> bool:
    """Whether a model (or a model nested in it) holds make_augmentation's layers (augment_on=device)."""
    return any(isinstance(layer, AUGMENTATION_LAYER_TYPES)
               or (isinstance(layer, keras.Model) and has_augmentation_layers(layer)) for layer in model.layers)


def dataset_options(*, deterministic: bool, ram_budget_gb: float = 0.0, private_threads: int = 0,
                    autotune: bool = True) -> tf.data.Options:
    """The tf.data options every dataset of make_dataset gets.

    Args:
        deterministic: keep element order fixed (slower: a slow element holds up the ones behind it).
        ram_budget_gb: memory AUTOTUNE may spend on buffers; 0 keeps TensorFlow's default (half the RAM).
        private_threads: threads of the pipeline's own pool; 0 picks default_private_threads().
        autotune: tf.data's autotuning of the parallel calls and buffers. Without it each AUTOTUNE
            parallelism is fixed at min(16, private_threads) and prefetch buffers still grow on demand
            (TensorFlow's legacy prefetch autotuner). Off on hosts without an accelerator (for_host):
            there the model is the slower side, and TensorFlow 2.21 makes deleting an autotuned iterator wait for
            up to about 2.4 s (idle; measured at the end of each pass, 3-4 s of a flowers_small run;
            docs/input-pipeline.md).
    """
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = autotune
    if ram_budget_gb > 0:
        options.autotune.ram_budget = int(ram_budget_gb * 2**30)
    optimization = options.experimental_optimization
    optimization.map_parallelization = True
    optimization.parallel_batch = True
    optimization.inject_prefetch = True
    # One thread per op: parallelism comes from the parallel map over images, and intra-op threads
    # would only contend with those (and with the training step) for the same cores.
    options.threading.max_intra_op_parallelism = 1
    options.threading.private_threadpool_size = private_threads or default_private_threads()
    return options


def default_private_threads() -> int:
    """Two threads per core this process may use, in a pool of the input pipeline's own.

    Without a pool of its own, tf.data runs on TensorFlow's inter-op pool, where the training step's ops
    are scheduled too: a decode holding a thread there delays the step. On this 2-core machine a private
    pool made the default-policy pipeline a few percent faster alone and phase-1 fit() fed by it about 4%
    faster (benchmarks/, medians). Two per core leave slack for threads that wait on reads (gs:// shards).
    """
    return 2 * usable_cores()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cache(dataset: tf.data.Dataset, cache: str, split: str, input_context) -> tf.data.Dataset:
    if not cache:
        return dataset
    if cache == "memory":
        return dataset.cache()
    pipeline = "" if input_context is None else f"-{input_context.input_pipeline_id}"
    # tf.data.Dataset.cache writes <path>.index and <path>.data-*; one file set per split and pipeline.
    tf.io.gfile.makedirs(cache)
    return dataset.cache(tf.io.gfile.join(cache, f"{split}{pipeline}"))


def make_dataset(
    *,
    data_dir: str,
    manifest: dict,
    split: str,
    image_size: int,
    batch_size: int,
    training: bool,
    options: PipelineOptions = PipelineOptions(),
    augmentation=None,
    input_context: tf.distribute.InputContext | None = None,
    thumbnail_side: int = 0,
) -> tf.data.Dataset:
    """Builds the (images, labels) dataset of one split.

    Use it directly for one input pipeline, or through DistributedSplits (one per input_context).

    Args:
        data_dir: the converter's output folder (local or gs://).
        manifest: its manifest (schema.read_manifest).
        split: "train", "validation" or "test".
        image_size: output height and width.
        batch_size: global batch size (with input_context, each replica's batch is its share).
        training: shuffle, repeat forever, random-crop, drop the last partial batch and augment; otherwise
            one pass in a fixed order, central crop, the last batch padded.
        options: how to read, shuffle, crop, flip and feed (PipelineOptions).
        augmentation: a Keras layer applied to training batches in tf.data (make_augmentation with
            pixels="uint8": the batches it gets are uint8), or None (no augmentation, or augmentation in
            the model). Leave RandomFlip out of it: options.flip flips in the decode.
        input_context: from distribute_datasets_from_function: this pipeline reads its share of the
            files (of the examples when there are fewer files than pipelines) in per-replica batches.
        thumbnail_side: above 0 (evaluation only), each element also carries every image's grayscale
            thumbnail (int32 [batch, thumbnail_side**2], see thumbnail_pixels) and its position in the split's
            evaluation order (int32 [batch], see evaluation_records): what the data-quality report needs besides
            the embedding, computed from the same read and decode.

    Returns:
        For training, a dataset of (float32 [batch, image_size, image_size, 3] images, int32 [batch]
        labels); otherwise (images, labels, float32 [batch] sample weights), the weights being 0 for
        the padding that fills the last batch (see pad_with_zero_weights).
    """
    _, _, local_batch_size = _pipeline_share(input_context, batch_size)
    ordered = options.deterministic or not training
    dataset = _read_records(
        shard_paths(data_dir, manifest, split), training=training, ordered=ordered, seed=options.seed,
        input_context=input_context,
    )
    # Cache the still-encoded records, before the random crop, so later epochs get new crops; and
    # before shuffle so the cache holds each example once.
    dataset = _cache(dataset, options.cache, split, input_context)
    if thumbnail_side:
        if training:
            raise ValueError("thumbnails come with evaluation passes only (training=False)")
        dataset = dataset.enumerate()  # before sharding among pipelines: the position in the whole split
    if training:
        # Shuffle before repeat so each epoch sees every example once.
        dataset = dataset.shuffle(options.shuffle_buffer, seed=options.seed).repeat()
        # A per-example seed makes the crops reproducible when a seed is given.
        dataset = dataset.enumerate()
    parse = _parse_function(
        training=training, class_names=manifest["classes"], image_size=image_size, options=options,
        uint8=augmentation is not None, thumbnail_side=thumbnail_side,
    )
    dataset = dataset.map(parse, num_parallel_calls=AUTOTUNE, deterministic=ordered)
    if not training:
        dataset = _batch_for_evaluation(dataset, num_examples=manifest["splits"][split]["num_examples"],
                                        batch_size=batch_size, input_context=input_context)
    else:
        # Every batch is full (the remainder dropped): batches split evenly across replicas and keep
        # static shapes, which TPUs need.
        dataset = dataset.batch(local_batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE, deterministic=ordered)
    if training and augmentation is not None:
        # Augment whole batches: one vectorised op per batch is far cheaper than one per image.
        dataset = dataset.map(
            lambda images, labels: (tf.cast(augmentation(images, training=True), tf.float32), labels),
            num_parallel_calls=AUTOTUNE,
            deterministic=ordered,
        )
    return _feed(dataset, options, training=training, ordered=ordered)


def _feed(dataset: tf.data.Dataset, options: PipelineOptions, *, training: bool, ordered: bool) -> tf.data.Dataset:
    """The last steps of make_dataset: threading and memory options, the tf.data service (training with
    --data_service), prefetch."""
    dataset = dataset.with_options(
        dataset_options(deterministic=ordered, ram_budget_gb=options.ram_budget_gb, private_threads=options.private_threads,
                        autotune=options.autotune)
    )
    if training and options.data_service:
        # Everything above runs on the service's workers; only the finished batches travel here.
        dataset = dataset.apply(
            tf.data.experimental.service.distribute(processing_mode=options.data_service_mode, service=options.data_service)
        )
    return dataset.prefetch(AUTOTUNE)


# A thumbnail's source: a large JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT, keeping its shorter side at
# least this many pixels. An eighth of every image, as before, left a 3/4-size copy of a 320 x 240 flower photo
# at a thumbnail correlation of 0.84 to its original (a missed near-duplicate); at 64 px and more they agree to 0.999.
THUMBNAIL_DECODE_MIN_SIDE = 64


def thumbnail_pixels(encoded: tf.Tensor, side: int) -> tf.Tensor:
    """The whole image in grayscale, area-resized to side x side, rounded: int32 [side * side] in [0, 255].

    int32 rather than uint8 so that it may travel with the batch to any accelerator.
    """
    shape = _image_shape(encoded)
    image = _decode_window(encoded, 0, 0, shape[0], shape[1], min_side=THUMBNAIL_DECODE_MIN_SIDE)
    gray = tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))
    thumbnail = tf.image.resize(gray, [side, side], method="area")
    return tf.cast(tf.round(tf.reshape(thumbnail, [side * side])), tf.int32)


def evaluation_records(data_dir: str, manifest: dict, split: str) -> tf.data.Dataset:
    """The serialized records of a split in the order of its evaluation pass (one pipeline), which
    make_dataset(..., thumbnail_side=...) numbers: record i here is position i there."""
    return _read_records(shard_paths(data_dir, manifest, split), training=False, ordered=True, seed=None,
                         input_context=None)


def _pipeline_share(input_context: tf.distribute.InputContext | None, batch_size: int) -> tuple[int, int, int]:
    """(number of input pipelines, this pipeline's id, its per-replica batch size); one pipeline without a context.

    batch_size: the global batch size; 0 when only the pipelines matter.
    """
    if input_context is None:
        return 1, 0, batch_size
    local_batch_size = input_context.get_per_replica_batch_size(batch_size) if batch_size else 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id, local_batch_size


def _read_records(files: list[str], *, training: bool, ordered: bool, seed, input_context) -> tf.data.Dataset:
    """The serialized records of a split's shards, this input pipeline's share of them."""
    num_pipelines, pipeline_id, _ = _pipeline_share(input_context, batch_size=0)
    # Each pipeline reads its own files when there are enough; otherwise (and always for evaluation,
    # whose padded pass must split evenly) all read every file and keep every num_pipelines-th example.
    shard_files = training and num_pipelines > 1 and len(files) >= num_pipelines
    if shard_files:
        files = files[pipeline_id::num_pipelines]
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if training:
        dataset = dataset.shuffle(len(files), seed=seed)
    # Several shards are read at once so one slow file (or GCS object) does not stall the stream.
    dataset = dataset.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), MAX_INTERLEAVE_FILES),
        num_parallel_calls=AUTOTUNE,
        # Example-level sharding below needs the same order in every pipeline.
        deterministic=ordered or (num_pipelines > 1 and not shard_files),
    )
    if training and num_pipelines > 1 and not shard_files:
        dataset = dataset.shard(num_pipelines, pipeline_id)
    return dataset


def _batch_for_evaluation(dataset, *, num_examples: int, batch_size: int, input_context):
    """One pass in whole per-replica batches, padded with zero-weight examples (pad_with_zero_weights)."""
    num_pipelines, pipeline_id, local_batch_size = _pipeline_share(input_context, batch_size)
    # Pad to whole global batches, then give each pipeline every num_pipelines-th example: each gets
    # the same number of whole per-replica batches, so replicas stay in step to the end of the pass.
    dataset = pad_with_zero_weights(dataset, num_examples, batch_size)
    if num_pipelines > 1:
        dataset = dataset.shard(num_pipelines, pipeline_id)
    dataset = dataset.batch(local_batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE, deterministic=True)
    # Interleaving hides the length; stating it lets Keras show progress and end the pass
    # without an "input ran out of data" warning.
    padded_examples = -(-num_examples // batch_size) * batch_size
    return dataset.apply(tf.data.experimental.assert_cardinality(padded_examples // num_pipelines // local_batch_size))


def _parse_function(
    *, training: bool, class_names: list, image_size: int, options: PipelineOptions, uint8: bool, thumbnail_side: int = 0,
):
    """The per-record map of make_dataset: parse, decode (random crop and flip in training), label."""
    seed = options.seed
    if not training:
        def parse(serialized):
            features = parse_record(serialized, class_names)
            image = decode_and_resize(features["image/encoded"], image_size)
            return image, tf.cast(features["image/class/label"], tf.int32)

        if not thumbnail_side:
            return parse

        def parse_with_thumbnail(index, serialized):
            image, label = parse(serialized)
            encoded = schema.parse_example(serialized)["image/encoded"]
            return image, label, thumbnail_pixels(encoded, thumbnail_side), tf.cast(index, tf.int32)

        return parse_with_thumbnail

    def parse_for_training(index, serialized):
        features = parse_record(serialized, class_names)
        crop_seed = None if seed is None else tf.stack([tf.constant(seed, tf.int64), index])
        image = decode_random_crop(
            features["image/encoded"], image_size, min_area=options.crop_min_area, flip=options.flip, seed=crop_seed,
            dct_scale=options.dct_scale,
        )
        if uint8:
            # Batched and augmented as uint8 (make_augmentation's pixels="uint8"), float32 after.
            image = tf.cast(tf.round(image), tf.uint8)
        return image, tf.cast(features["image/class/label"], tf.int32)

    return parse_for_training


class DistributedSplits:
    """The run's image datasets, one per split, each built once per input pipeline (per worker) reading
    its own files and batching per replica: the same code feeds one GPU, a multi-GPU host and many hosts.

    Args:
        strategy: the tf.distribute strategy.
        data_dir, manifest: the converted data (schema.read_manifest).
        image_size, batch_size: output size and global batch size.
        options: PipelineOptions.
        augmentation: Keras layers run on training batches in tf.data (LayerAugmentation.make_layers), or None.
    """

    def __init__(self, *, strategy, data_dir: str, manifest: dict, image_size: int, batch_size: int,
                 options: PipelineOptions, augmentation=None):
        self.strategy, self.data_dir, self.manifest = strategy, data_dir, manifest
        self.image_size, self.batch_size, self.options, self.augmentation = image_size, batch_size, options, augmentation

    def images(self, split: str, *, training: bool, thumbnail_side: int = 0):
        """The distributed dataset of a split (make_dataset's, for training or for one evaluation pass)."""
        return self.strategy.distribute_datasets_from_function(lambda input_context: make_dataset(
            data_dir=self.data_dir, manifest=self.manifest, split=split, image_size=self.image_size,
            batch_size=self.batch_size, training=training, options=self.options, augmentation=self.augmentation,
            input_context=input_context, thumbnail_side=thumbnail_side,
        ))

    def sample(self, num_images: int = 8):
        """A few training images as they leave the pipeline on this host (no tf.data service, no cache).

        Shuffled among the first few only: filling the training shuffle buffer decodes --shuffle_buffer images
        (1.6 s of a 40 s run on flowers_small) for a TensorBoard picture.
        """
        options = dataclasses.replace(self.options, data_service="", cache="", shuffle_buffer=2 * num_images)
        images, _ = next(iter(make_dataset(
            data_dir=self.data_dir, manifest=self.manifest, split="train", image_size=self.image_size,
            batch_size=num_images, training=True, options=options, augmentation=self.augmentation,
        )))
        return images


def evaluation_split(manifest: dict) -> str:
    """The split a run reports: test when the data has one, else validation."""
    return "test" if "test" in manifest["splits"] else "validation"
