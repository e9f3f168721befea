"""Input pipeline throughput: ours against what users do today, on the same JPEGs, in one process.

    python -m benchmarks.pipeline --image_dir=../shared/data/flowers_small

Rows (all at --image_size, --batch_size, images/s and the ratio to row 1 measured in this same run):
1. keras.utils.image_dataset_from_directory + RandomFlip('horizontal') + RandomRotation(0.2) mapped on
   batches + prefetch (the Keras tutorial pipeline);
2. trainer.input.data.make_dataset with exactly that augmentation (random crop off);
3. trainer.input.data.make_dataset with the default policy (random resized crop + flip, both in the decode);
4. read + decode + resize from the original files, nothing else (the decode ceiling).
Rows 2 and 3 run on the folder converted as is and with --max_side (whose downscaled images the
converter re-encodes at its default --jpeg_quality, 90; one more row reads a --jpeg_quality=95 copy).
Rows "on the device: the host's part" time what the host still does when the layers run on the
accelerator (--augment_on=device, the default with GPUs or TPUs): the decode and flip only.
A second table (--large_photos, on by default) times the same pipelines on photos of --image_dir upscaled to
phone size (3000 x 2250, JPEG 90) and converted as is, with our DCT-scaled decode and without it.
The pipelines are timed in interleaved rounds (common.measure), each from a fresh iterator, and the
medians reported. The last table turns images per CPU-second into how many host cores feed an
accelerator at a given rate.
"""

import math
import os

import keras
import tensorflow as tf
from absl import app, flags

from benchmarks import common
from tfrecords import schema
from trainer.input import data

FLAGS = flags.FLAGS
ACCELERATOR_RATES = (1_000, 3_500, 10_000)


def baseline(image_dir: str, image_size: int, batch_size: int, augment: bool) -> tf.data.Dataset:
    dataset = keras.utils.image_dataset_from_directory(
        image_dir, image_size=(image_size, image_size), batch_size=batch_size, seed=0, verbose=False
    ).repeat()
    if augment:
        augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)])
        dataset = dataset.map(lambda images, labels: (augmentation(images, training=True), labels),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def decode_ceiling(image_dir: str, image_size: int, batch_size: int) -> tf.data.Dataset:
    pattern = os.path.join(image_dir, "*", "*")
    files = [path for path in tf.io.gfile.glob(pattern) if path.lower().endswith(common.IMAGE_EXTENSIONS)]

    def decode(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, [image_size, image_size])

    dataset = tf.data.Dataset.from_tensor_slices(files).repeat().map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def ours(data_dir: str, image_size: int, batch_size: int, policy: str, **kwargs) -> tf.data.Dataset:
    """trainer.input.data.make_dataset with a named augmentation policy; kwargs are PipelineOptions fields."""
    augmentation = None
    if policy == "baseline augmentation":
        # The same flip + rotation(0.2); the flip runs in the decode (make_dataset's flip=True).
        augmentation = data.make_augmentation(flip=False, rotation=0.2, pixels="uint8")
        kwargs.setdefault("crop_min_area", 1.0)
    elif policy == "device rotation":
        # --augment_on=device (the default with a GPU/TPU): the rotation is the model's, the host only flips.
        kwargs.setdefault("crop_min_area", 1.0)
    elif policy == "keras flip":
        kwargs["flip"] = False
        augmentation = data.make_augmentation(flip=True, pixels="uint8")
    return data.make_dataset(
        data_dir=data_dir, manifest=schema.read_manifest(data_dir), split="train", image_size=image_size,
        batch_size=batch_size, training=True, augmentation=augmentation, options=data.PipelineOptions(**kwargs),
    )


def small_photo_rows(size: int, batch: int) -> list:
    """The rows on --image_dir as it is (small photos), converted as is and with --max_side."""
    converted = {
        "as is": common.convert(FLAGS.image_dir, FLAGS.converted_dir or os.path.join(FLAGS.work_dir, "full")),
        f"max_side {FLAGS.max_side}": common.convert(
            FLAGS.image_dir, FLAGS.converted_max_side_dir or os.path.join(FLAGS.work_dir, f"max_side_{FLAGS.max_side}"),
            max_side=FLAGS.max_side,
        ),
    }
    quality_95_dir = common.convert(
        FLAGS.image_dir, os.path.join(FLAGS.work_dir, f"max_side_{FLAGS.max_side}_quality_95"),
        max_side=FLAGS.max_side, jpeg_quality=95,
    )
    max_side_dir = converted[f"max_side {FLAGS.max_side}"]
    rows = [("1. baseline: image_dataset_from_directory + flip + rotation(0.2)",
             baseline(FLAGS.image_dir, size, batch, augment=True))]
    rows.append(("   baseline without augmentation", baseline(FLAGS.image_dir, size, batch, augment=False)))
    for name, data_dir in converted.items():
        rows.append((f"2. ours, flip + rotation(0.2), TFRecords {name}", ours(data_dir, size, batch, "baseline augmentation")))
    for name, data_dir in converted.items():
        rows.append((f"3. ours, default policy (crop + flip), TFRecords {name}", ours(data_dir, size, batch, "default policy")))
    rows.append(("   ours, default policy, max_side, autotune off (the default on CPU hosts)",
                 ours(max_side_dir, size, batch, "default policy", autotune=False)))
    rows.append(("   ours, default policy, max_side, on TF's shared inter-op pool",
                 common.on_shared_pool(ours(max_side_dir, size, batch, "default policy"))))
    rows.append(("   ours, default policy, max_side, --jpeg_quality=95 shards", ours(quality_95_dir, size, batch, "default policy")))
    rows.append(("   ours, crop + keras RandomFlip on batches, max_side", ours(max_side_dir, size, batch, "keras flip")))
    rows.append(("   ours, flip + rotation(0.2) on the device: the host's part, max_side",
                 ours(max_side_dir, size, batch, "device rotation")))
    rows.append(("   ours, default policy, cache=memory, max_side",
                 ours(max_side_dir, size, batch, "default policy", cache="memory")))
    rows.append(("4. decode ceiling: read + decode + resize, original files", decode_ceiling(FLAGS.image_dir, size, batch)))
    return rows


def large_photo_rows(size: int, batch: int) -> list:
    """The rows on phone-size photos (--large_photos of --image_dir upscaled to 3000 x 2250, JPEG 90) stored as is."""
    photos = common.upscaled_copy(FLAGS.image_dir, os.path.join(FLAGS.work_dir, "phone_size_photos"),
                                  count=FLAGS.large_photos)
    as_is = common.convert(photos, os.path.join(FLAGS.work_dir, "phone_size_full"))
    max_side = common.convert(photos, os.path.join(FLAGS.work_dir, f"phone_size_max_side_{FLAGS.max_side}"),
                              max_side=FLAGS.max_side)
    return [
        ("1. baseline: image_dataset_from_directory + flip + rotation(0.2)", baseline(photos, size, batch, augment=True)),
        ("   baseline without augmentation", baseline(photos, size, batch, augment=False)),
        ("2. ours, flip + rotation(0.2), as is, DCT-scaled decode", ours(as_is, size, batch, "baseline augmentation")),
        ("   ours, flip + rotation(0.2), as is, full-size decode",
         ours(as_is, size, batch, "baseline augmentation", dct_scale=False)),
        ("   ours, flip + rotation(0.2) on the device: the host's part", ours(as_is, size, batch, "device rotation")),
        ("3. ours, default policy, as is, DCT-scaled decode", ours(as_is, size, batch, "default policy")),
        ("   ours, default policy, as is, full-size decode", ours(as_is, size, batch, "default policy", dct_scale=False)),
        ("   ours, default policy, as is, DCT-scaled, autotune off (the default on CPU hosts)",
         ours(as_is, size, batch, "default policy", autotune=False)),
        (f"   ours, default policy, TFRecords max_side {FLAGS.max_side}", ours(max_side, size, batch, "default policy")),
        ("4. decode ceiling: read + decode + resize, original files", decode_ceiling(photos, size, batch)),
    ]


def max_side_rows(size: int, batch: int) -> list:
    """Both policies on the phone-size photos converted at each --max_side_sweep value (0: as is)."""
    photos = os.path.join(FLAGS.work_dir, "phone_size_photos")
    rows = []
    for max_side in (int(value) for value in FLAGS.max_side_sweep.split(",")):
        data_dir = common.convert(photos, os.path.join(FLAGS.work_dir, f"phone_size_max_side_{max_side}" if max_side
                                                       else "phone_size_full"), max_side=max_side)
        manifest = schema.read_manifest(data_dir)
        stored = sum(shard["size_bytes"] for shard in manifest["splits"]["train"]["shards"])
        kilobytes = stored / manifest["splits"]["train"]["num_examples"] / 1000
        label = f"max_side {max_side}" if max_side else "as is"
        rows.append((f"   default policy, {label} ({kilobytes:.0f} KB per image)", ours(data_dir, size, batch, "default policy")))
        rows.append((f"   flip + rotation(0.2), {label}", ours(data_dir, size, batch, "baseline augmentation")))
        rows.append((f"   flip + rotation(0.2) on the device: the host's part, {label}",
                     ours(data_dir, size, batch, "device rotation")))
    return rows


def report(title: str, rows: list, size: int, batch: int) -> None:
    """Times the rows (interleaved rounds, medians) and prints rates, ratios to row 1 and cores per accelerator."""
    print(f"\n{title}: image_size={size} batch_size={batch} cores={os.cpu_count()}")
    print(f"{FLAGS.rounds} interleaved rounds (shuffled order) of {FLAGS.num_batches} batches per pipeline, medians:", flush=True)
    measured = common.measure(
        [dataset for _, dataset in rows], batch_size=batch, num_batches=FLAGS.num_batches,
        warmup_batches=FLAGS.warmup_batches, rounds=FLAGS.rounds,
    )
    results = [(name, rate, per_core) for (name, _), (rate, per_core) in zip(rows, measured)]
    print(f"{'pipeline':<64} {'images/s':>9} {'ratio':>6} {'img/CPU-s':>10}")
    for name, rate, per_core in results:
        print(f"{name:<64} {rate:>9.0f} {rate / results[0][1]:>5.2f}x {per_core:>10.0f}")
    print("\nHost cores needed to feed an accelerator (from images per CPU-second above):")
    print(f"{'pipeline':<64} " + " ".join(f"{rate:>8,}/s" for rate in ACCELERATOR_RATES))
    for name, _, per_core in results:
        print(f"{name:<64} " + " ".join(f"{math.ceil(rate / per_core):>10}" for rate in ACCELERATOR_RATES))


def main(argv):
    del argv
    size, batch = FLAGS.image_size, FLAGS.batch_size
    if FLAGS.small_photos:
        report(f"Photos as in {FLAGS.image_dir}", small_photo_rows(size, batch), size, batch)
    if FLAGS.large_photos:
        rows = large_photo_rows(size, batch)
        report(f"{FLAGS.large_photos} photos of {FLAGS.image_dir} upscaled to phone size (3000 x 2250, JPEG 90)",
               rows, size, batch)
        if FLAGS.max_side_sweep:
            # The tutorial's pipeline first again, so the ratios of this table have their own baseline.
            report("The converter's --max_side on those photos (storage per image; both policies)",
                   rows[:1] + max_side_rows(size, batch), size, batch)


if __name__ == "__main__":
    flags.DEFINE_string("image_dir", common.DEFAULT_IMAGE_DIR, "Folder of class subfolders of JPEGs.")
    flags.DEFINE_string("work_dir", "/tmp/pipeline_benchmark", "Where the converted copies are written (once).")
    flags.DEFINE_string("converted_dir", "", "Use this converted copy of --image_dir instead of converting.")
    flags.DEFINE_string("converted_max_side_dir", "", "Use this converted --max_side copy instead of converting.")
    flags.DEFINE_integer("max_side", 256, "Longest side of the images in the second converted copy.")
    flags.DEFINE_integer("image_size", 160, "Output height and width.")
    flags.DEFINE_integer("batch_size", 32, "Images per batch.")
    flags.DEFINE_integer("num_batches", 80, "Batches per timed run.")
    flags.DEFINE_integer("rounds", 5, "Timed runs per pipeline, interleaved; the median is reported.")
    flags.DEFINE_integer("warmup_batches", 20, "Batches read from each fresh iterator before timing.")
    flags.DEFINE_bool("small_photos", True, "Time the rows on --image_dir's photos as they are.")
    flags.DEFINE_string("max_side_sweep", "0,384,512,768,1024",
                        "The phone-size photos converted at each of these --max_side (0: as is); '' = skip.")
    flags.DEFINE_integer(
        "large_photos", 200, "Also time rows on this many photos of --image_dir upscaled to phone size; 0 = skip."
    )
    app.run(main)
