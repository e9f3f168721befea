"""Accuracy and wall time: the Keras tutorials' transfer-learning recipe against ours, on the same images.

    python -m benchmarks.accuracy --image_dir=../shared/data/flowers_small \
        --backbone_file=../shared/models/efficientnet_lite0_imagenet_notop.keras

Both rows use the same ImageNet-pretrained backbone file and the same train / validation / test images:
the folder is converted first (`python -m tfrecords.build`), and the split of every image is read back
from our shards ("image/source"), then mirrored as folders of symlinks for the tutorial recipe.

1. "seeds' recipe", in this process, exactly as the Keras transfer-learning tutorials do it:
   keras.utils.image_dataset_from_directory (--seeds_image_size, batch 32), RandomFlip("horizontal") +
   RandomRotation(0.2) as the model's first layers, Rescaling(1/127.5, offset=-1), backbone(x,
   training=False) frozen, GlobalAveragePooling2D, Dropout(0.2), Dense(softmax); Adam for
   --seeds_epochs, then the backbone unfrozen from layer --seeds_fine_tune_at and RMSprop for
   --seeds_fine_tune_epochs more, with model.fit / model.evaluate. Its wall time counts everything from
   dataset creation to the final test evaluation (the test split is evaluated once, as for ours).
2. "ours": the real CLIs as subprocesses, `python -m tfrecords.build` then `python -m trainer.train`
   with our defaults plus --ours_flags; its wall time is the conversion plus the training. Its "flip-avg test"
   column is the same model's test accuracy with horizontal-flip test-time augmentation (probabilities averaged
   with the mirror image's), measured after the timed run: a paired comparison, only the averaging differs.

Both rows run once per training seed (--train_seeds, default 1,2,3: weights, shuffling, augmentation; the split
stays --seed's), then the summary gives each recipe's mean, standard deviation and range of the final test
accuracy and wall time: a default changes only on a difference larger than that spread. Results of row 1 are
saved to <work_dir>/seeds_results_seed<N>.json; --skip_seeds reuses them, so our recipe can be tuned without
re-running the slow baseline. Logs of the subprocesses: <work_dir>/build.log, train_seed<N>.log; ours trains into
<work_dir>/ours_seed<N> (ours_<hash of --ours_flags>_seed<N> with flags, so each variant's runs are kept apart).
Not a test: accuracies on ~75 test images move by a few points from run to run.
"""

import datetime
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from benchmarks import common
from tfrecords import schema
from trainer.input import data
from trainer.reports import evaluation

FLAGS = flags.FLAGS
DEFAULT_BACKBONE_FILE = os.path.join(
    os.path.dirname(common.REPO_ROOT), "shared", "models", "efficientnet_lite0_imagenet_notop.keras"
)
SEEDS_RESULTS_FILE = "seeds_results.json"
SPLITS = ("train", "validation", "test")
# "final test": the model each recipe ends with (ours restores the weights of the best validation epoch); the
# test split is looked at once per run, not per phase.
COLUMNS = ("val acc ph1", "val acc ph2", "final test", "flip-avg test", "wall time s", "time vs seeds")


def check_inputs(image_dir: str, backbone_file: str) -> None:
    """Raises ValueError when the image folder or the backbone file is missing."""
    if not os.path.isdir(image_dir):
        raise ValueError(f"--image_dir {image_dir!r} does not exist; expected <image_dir>/<class>/<image files> "
                         "(../shared/data/flowers_small)")
    if not os.path.isfile(backbone_file):
        raise ValueError(f"--backbone_file {backbone_file!r} does not exist; expected a .keras feature extractor "
                         "(../shared/models/efficientnet_lite0_imagenet_notop.keras)")


def run_logged(command: list[str], log_path: str) -> float:
    """Runs a command from the repository root with its output in log_path; returns its wall seconds."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n\n")
        log.flush()
        returncode = subprocess.run(command, cwd=common.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if returncode != 0:
        with open(log_path) as log:
            tail = "".join(log.readlines()[-15:])
        raise RuntimeError(f"{shlex.join(command)} failed with exit code {returncode} (log: {log_path}):\n{tail}")
    return seconds


def read_split_sources(data_dir: str) -> dict[str, list[tuple[str, str]]]:
    """Returns {split: [(path relative to the input folder, class name), ...]} read from our shards."""
    manifest = schema.read_manifest(data_dir)
    splits = {}
    for split in SPLITS:
        examples = tf.data.TFRecordDataset(data.shard_paths(data_dir, manifest, split)).map(schema.parse_example)
        splits[split] = [
            (example["image/source"].numpy().decode("utf-8"), example["image/class/text"].numpy().decode("utf-8"))
            for example in examples
        ]
    return splits


def link_split_folders(image_dir: str, splits: dict, class_names: list[str], output_dir: str) -> dict[str, str]:
    """Makes <output_dir>/<split>/<class>/<file> symlinks to the original images; returns {split: folder}."""
    shutil.rmtree(output_dir, ignore_errors=True)
    folders = {}
    for split, sources in splits.items():
        folders[split] = os.path.join(output_dir, split)
        for class_name in class_names:  # every class folder, so an empty class still gets its label id
            os.makedirs(os.path.join(folders[split], class_name))
        for source, class_name in sources:
            # The relative path flattened into the name: unique even when the input has nested folders.
            link = os.path.join(folders[split], class_name, source.replace("/", "__"))
            os.symlink(os.path.abspath(os.path.join(image_dir, source)), link)
    return folders


class EpochTimer(keras.callbacks.Callback):
    """Records the wall seconds of each epoch (training plus its validation pass)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def seeds_recipe(
    *,
    split_folders: dict[str, str],
    class_names: list[str],
    backbone_file: str,
    image_size: int,
    batch_size: int,
    epochs: int,
    fine_tune_epochs: int,
    fine_tune_at: int,
    learning_rate: float,
    fine_tune_learning_rate: float,
    seed: int,
) -> dict:
    """Trains the tutorials' recipe; returns accuracies per phase, wall seconds and seconds per epoch."""
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)

    def load(split):
        return keras.utils.image_dataset_from_directory(
            split_folders[split], labels="inferred", label_mode="int", class_names=class_names,
            image_size=(image_size, image_size), batch_size=batch_size, shuffle=split == "train", seed=seed,
        ).prefetch(tf.data.AUTOTUNE)

    train_dataset, validation_dataset, test_dataset = load("train"), load("validation"), load("test")

    data_augmentation = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)], name="data_augmentation"
    )
    backbone = keras.saving.load_model(backbone_file)
    backbone.trainable = False
    inputs = keras.Input(shape=(image_size, image_size, 3))
    x = data_augmentation(inputs)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)
    x = backbone(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(len(class_names), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])

    results = {}
    timer = EpochTimer()
    history = model.fit(train_dataset, epochs=epochs, validation_data=validation_dataset, callbacks=[timer], verbose=2)
    results["phase1"] = {"validation_accuracy": history.history["val_accuracy"][-1], "epoch_seconds": timer.seconds}

    if fine_tune_epochs > 0:
        backbone.trainable = True
        for layer in backbone.layers[:fine_tune_at]:
            layer.trainable = False
        model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=fine_tune_learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
        timer = EpochTimer()
        history = model.fit(train_dataset, epochs=epochs + fine_tune_epochs, initial_epoch=epochs,
                            validation_data=validation_dataset, callbacks=[timer], verbose=2)
        results["phase2"] = {
            "validation_accuracy": history.history["val_accuracy"][-1],
            "test_accuracy": model.evaluate(test_dataset, return_dict=True, verbose=0)["accuracy"],
            "epoch_seconds": timer.seconds,
        }
    else:
        results["phase1"]["test_accuracy"] = model.evaluate(test_dataset, return_dict=True, verbose=0)["accuracy"]
    results["wall_seconds"] = time.perf_counter() - start
    return results


def read_our_results(model_dir: str) -> dict:
    """Returns {"phase1": {"validation_accuracy"}, "phase2": {...}, "final_test_accuracy"} from
    <model_dir>/metrics.json; a missing value is None. The validation accuracies are each phase's last epoch's."""
    with tf.io.gfile.GFile(os.path.join(model_dir, "metrics.json")) as file:
        metrics = json.load(file)
    results = {phase: {"validation_accuracy": None} for phase in ("phase1", "phase2")}
    for entry in sorted(metrics.get("history", []), key=lambda entry: entry["epoch"]):
        results[entry["phase"]]["validation_accuracy"] = entry.get("val_accuracy")
    results["final_test_accuracy"] = metrics["accuracy"] if metrics.get("evaluated_split") == "test" else None
    # Phase 2's training speed: the median of its epochs' images/s (the first epoch also traces the step).
    rates = [entry["images_per_second"] for entry in metrics.get("history", []) if entry["phase"] != "phase1"
             and entry.get("images_per_second")]
    results["phase2_images_per_second"] = statistics.median(rates) if rates else None
    results["frozen_pass_engine"] = metrics.get("frozen_pass", {}).get("engine")
    return results


def final_test_accuracy(results: dict) -> float | None:
    """The test accuracy of the model a recipe ends with (else the one after its last phase)."""
    if results.get("final_test_accuracy") is not None:
        return results["final_test_accuracy"]
    for phase in ("phase2", "phase1"):
        if results.get(phase, {}).get("test_accuracy") is not None:
            return results[phase]["test_accuracy"]
    return None


def format_row(name: str, results: dict, wall_seconds: float, seeds_seconds: float) -> str:
    cells = []
    for phase in ("phase1", "phase2"):
        value = results.get(phase, {}).get("validation_accuracy")
        cells.append("n/a" if value is None else f"{value:.3f}")
    final, flipped = final_test_accuracy(results), results.get("flip_averaged_test_accuracy")
    cells += ["n/a" if final is None else f"{final:.3f}", "n/a" if flipped is None else f"{flipped:.3f}",
              f"{wall_seconds:.0f}", f"{wall_seconds / seeds_seconds:.2f}x"]
    return f"{name:<28}" + "".join(f"{cell:>15}" for cell in cells)


def run_seeds(data_dir: str, results_path: str, seed: int) -> dict:
    """Mirrors our splits as symlink folders, trains the tutorials' recipe with `seed`, saves and returns its results."""
    manifest = schema.read_manifest(data_dir)
    splits = read_split_sources(data_dir)
    split_folders = link_split_folders(FLAGS.image_dir, splits, manifest["classes"],
                                       os.path.join(FLAGS.work_dir, "split_folders"))
    results = seeds_recipe(
        split_folders=split_folders, class_names=manifest["classes"], backbone_file=FLAGS.backbone_file,
        image_size=FLAGS.seeds_image_size, batch_size=FLAGS.seeds_batch_size, epochs=FLAGS.seeds_epochs,
        fine_tune_epochs=FLAGS.seeds_fine_tune_epochs, fine_tune_at=FLAGS.seeds_fine_tune_at,
        learning_rate=FLAGS.seeds_learning_rate, fine_tune_learning_rate=FLAGS.seeds_fine_tune_learning_rate,
        seed=seed,
    )
    results["settings"] = split_settings() | {
        name: getattr(FLAGS, name) for name in (
            "seeds_image_size", "seeds_batch_size", "seeds_epochs", "seeds_fine_tune_epochs",
            "seeds_fine_tune_at", "seeds_learning_rate", "seeds_fine_tune_learning_rate")
    } | {"split_sizes": {split: len(sources) for split, sources in splits.items()}, "train_seed": seed}
    results["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
    with open(results_path, "w") as file:
        json.dump(results, file, indent=2)
    return results


def split_settings() -> dict:
    """What decides which images land in which split (a reused baseline must have been run with these)."""
    return {"image_dir": os.path.abspath(FLAGS.image_dir), "validation_fraction": FLAGS.validation_fraction,
            "test_fraction": FLAGS.test_fraction, "seed": FLAGS.seed}


def main(argv):
    del argv
    try:
        check_inputs(FLAGS.image_dir, FLAGS.backbone_file)
        ours_flags = shlex.split(FLAGS.ours_flags)
        train_seeds = [int(seed) for seed in FLAGS.train_seeds]
        for seed in train_seeds:
            results_path = seeds_results_path(seed)
            if FLAGS.skip_seeds and not os.path.isfile(results_path):
                raise ValueError(f"--skip_seeds needs {results_path} from an earlier run; run once without --skip_seeds")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        compare(ours_flags, train_seeds)
    except RuntimeError as error:  # a subprocess failed; its log's tail is in the message
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def seeds_results_path(seed: int) -> str:
    """Where the tutorials' recipe's results of one training seed are kept (for --skip_seeds)."""
    return os.path.join(FLAGS.work_dir, SEEDS_RESULTS_FILE.replace(".json", f"_seed{seed}.json"))


def compare(ours_flags: list[str], train_seeds: list[int]) -> None:
    """Converts once, trains both recipes once per training seed (or reuses the baseline's results), prints the table."""
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    data_dir = os.path.join(FLAGS.work_dir, "tfrecords")
    build_command = [
        sys.executable, "-m", "tfrecords.build", f"--input_dir={FLAGS.image_dir}", f"--output_dir={data_dir}",
        f"--validation_fraction={FLAGS.validation_fraction}", f"--test_fraction={FLAGS.test_fraction}",
        f"--seed={FLAGS.seed}", "--overwrite",
    ]
    print(f"converting: {shlex.join(build_command)}", flush=True)
    build_seconds = run_logged(build_command, os.path.join(FLAGS.work_dir, "build.log"))
    manifest = schema.read_manifest(data_dir)
    split_sizes = {split: manifest["splits"][split]["num_examples"] for split in SPLITS if split in manifest["splits"]}
    print(f"splits: {split_sizes}, classes: {manifest['classes']}", flush=True)

    rows = []  # (seed, seeds' results, ours' results, ours' seconds)
    for seed in train_seeds:
        seeds = baseline_results(data_dir, seed)
        ours, train_seconds = train_ours(data_dir, ours_flags, seed)
        rows.append((seed, seeds, ours, build_seconds + train_seconds))

    print(f"\nimages: {FLAGS.image_dir} splits {split_sizes}; backbone: {FLAGS.backbone_file}; cores: {os.cpu_count()}")
    print(f"training seeds {train_seeds} (the split is --seed={FLAGS.seed}'s for every row); ours: convert "
          f"{build_seconds:.0f} s once, counted in each of its rows; flags: {FLAGS.ours_flags or '(defaults)'}")
    print(f"\n{'':<28}" + "".join(f"{column:>15}" for column in COLUMNS))
    ours_name = "ours (defaults)" if not ours_flags else "ours (--ours_flags)"
    for seed, seeds, ours, ours_seconds in rows:
        print(format_row(f"seeds' recipe, seed {seed}", seeds, seeds["wall_seconds"], seeds["wall_seconds"]))
        print(format_row(f"{ours_name}, seed {seed}", ours, ours_seconds, seeds["wall_seconds"]))
    print_summary(rows, num_test=split_sizes.get("test", 0))


def baseline_results(data_dir: str, seed: int) -> dict:
    """The tutorials' recipe's results for one training seed: trained now, or reused with --skip_seeds."""
    results_path = seeds_results_path(seed)
    if not FLAGS.skip_seeds:
        print(f"seeds' recipe, seed {seed}: training in this process", flush=True)
        return run_seeds(data_dir, results_path, seed)
    with open(results_path) as file:
        seeds = json.load(file)
    print(f"seeds' recipe, seed {seed}: reused {results_path} (finished at {seeds.get('finished_at', 'unknown time')})")
    if {key: seeds.get("settings", {}).get(key) for key in split_settings()} != split_settings():
        print(f"warning: those results were run with other splits: {seeds.get('settings')}")
    return seeds


def train_ours(data_dir: str, ours_flags: list[str], seed: int) -> tuple:
    """Trains ours with `seed` (from scratch); returns (results, training seconds)."""
    # Each set of --ours_flags trains into its own folders: a rerun with other flags keeps the earlier runs.
    variant = "" if not ours_flags else "_" + hashlib.sha256(shlex.join(ours_flags).encode()).hexdigest()[:8]
    model_dir = os.path.join(FLAGS.work_dir, f"ours{variant}_seed{seed}")
    # A model_dir with checkpoints would make the trainer resume instead of training from scratch.
    shutil.rmtree(model_dir, ignore_errors=True)
    train_command = [
        sys.executable, "-m", "trainer.train", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
        f"--backbone={FLAGS.backbone_file}", "--preprocess=tf", f"--seed={seed}", *ours_flags,
    ]
    print(f"ours, seed {seed}: {shlex.join(train_command)}", flush=True)
    seconds = run_logged(train_command, os.path.join(FLAGS.work_dir, f"train{variant}_seed{seed}.log"))
    results = read_our_results(model_dir)
    if results["final_test_accuracy"] is not None:
        results["flip_averaged_test_accuracy"] = flip_averaged_test_accuracy(data_dir, model_dir)
    return results, seconds


def flip_averaged_test_accuracy(data_dir: str, model_dir: str) -> float:
    """Test accuracy of our exported model with horizontal-flip test-time augmentation: each image's probabilities
    averaged with its mirror image's. Measured here, after the timed run, on the same weights (a paired comparison
    with the "final test" column: only the averaging differs)."""
    manifest = schema.read_manifest(data_dir)
    model = evaluation.load_model(model_dir)
    dataset = data.make_dataset(data_dir=data_dir, manifest=manifest, split="test",
                                image_size=evaluation.model_image_size(model), batch_size=32, training=False)
    predict = tf.function(lambda images: model(images, training=False) + model(tf.image.flip_left_right(images), training=False))
    correct = total = 0
    for images, labels, weights in dataset:
        real = weights.numpy() > 0  # weight 0: padding of the last batch
        predicted = np.argmax(predict(images).numpy(), axis=1)[real]
        correct += int(np.sum(predicted == labels.numpy()[real]))
        total += int(np.sum(real))
    return correct / total


def print_summary(rows: list, *, num_test: int) -> None:
    """Mean and spread over the seeds of each recipe's final test accuracy and wall time, and the targets."""
    seeds_accuracy = [final_test_accuracy(seeds) or 0.0 for _, seeds, _, _ in rows]
    ours_accuracy = [final_test_accuracy(ours) or 0.0 for _, _, ours, _ in rows]
    seeds_time = [seeds["wall_seconds"] for _, seeds, _, _ in rows]
    ours_time = [seconds for _, _, _, seconds in rows]

    def spread(values: list, digits: int) -> str:
        deviation = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} +- {deviation:.{digits}f} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"

    print(f"\nover {len(rows)} seeds, final model on the test split ({num_test} images: one image is "
          f"{1 / max(num_test, 1):.3f}):")
    print(f"  seeds' recipe: accuracy {spread(seeds_accuracy, 3)}, wall time {spread(seeds_time, 0)} s")
    print(f"  ours:          accuracy {spread(ours_accuracy, 3)}, wall time {spread(ours_time, 0)} s")
    flipped = [ours.get("flip_averaged_test_accuracy") for _, _, ours, _ in rows]
    if None not in flipped:
        gains = [flip - plain for flip, plain in zip(flipped, ours_accuracy)]
        print(f"  ours with flip-averaged predictions (same models): accuracy {spread(flipped, 3)}; "
              f"gain {spread(gains, 3)}")
    rates = [ours.get("phase2_images_per_second") for _, _, ours, _ in rows]
    if None not in rates:
        engines = sorted({str(ours.get("frozen_pass_engine")) for _, _, ours, _ in rows})
        print(f"  ours: phase 2 trains at {spread(rates, 0)} images/s (each run's median epoch); phase 1's frozen "
              f"pass in {', '.join(engines)}")
    ratio = statistics.mean(ours_time) / statistics.mean(seeds_time)
    accuracy_met = statistics.mean(ours_accuracy) >= statistics.mean(seeds_accuracy)
    print(f"accuracy target (mean ours >= mean seeds): {'met' if accuracy_met else 'not met'}; "
          f"time target (mean ours <= 0.4x mean seeds): {'met' if ratio <= 0.4 else 'not met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    flags.DEFINE_string("image_dir", common.DEFAULT_IMAGE_DIR, "Folder of class subfolders of images.")
    flags.DEFINE_string("backbone_file", DEFAULT_BACKBONE_FILE,
                        "ImageNet-pretrained .keras feature extractor taking [-1, 1] pixels; used by both rows.")
    flags.DEFINE_string("work_dir", "/tmp/accuracy_benchmark",
                        "Where the shards, split folders, our model, logs and the saved baseline results go.")
    flags.DEFINE_float("validation_fraction", 0.15, "Share of the images in the validation split (~75 of 500).")
    flags.DEFINE_float("test_fraction", 0.15, "Share of the images in the test split (~75 of 500).")
    flags.DEFINE_integer("seed", 42, "Seed of the split (tfrecords.build): the same images in each split for every row.")
    flags.DEFINE_list("train_seeds", ["1", "2", "3"],
                      "Training seeds (weights, shuffling, augmentation): each recipe runs once per seed, and the summary "
                      "gives the mean and spread, so a default changes only on a difference larger than the noise.")
    flags.DEFINE_integer("seeds_image_size", 224, "Baseline image size (the tutorials' 224; smaller only for debugging).")
    flags.DEFINE_integer("seeds_batch_size", 32, "Baseline batch size (the tutorials' 32).")
    flags.DEFINE_integer("seeds_epochs", 10, "Baseline phase-1 epochs (frozen backbone, Adam).")
    flags.DEFINE_integer("seeds_fine_tune_epochs", 10, "Baseline phase-2 epochs (top of the backbone, RMSprop); 0 skips.")
    flags.DEFINE_integer("seeds_fine_tune_at", 100, "Baseline phase 2 freezes backbone.layers[:this].")
    flags.DEFINE_float("seeds_learning_rate", 1e-4, "Baseline phase-1 Adam learning rate.")
    flags.DEFINE_float("seeds_fine_tune_learning_rate", 1e-5, "Baseline phase-2 RMSprop learning rate.")
    flags.DEFINE_string("ours_flags", "",
                        "Extra flags for `python -m trainer.train`, one string, e.g. '--epochs=3 --image_size=160'; "
                        "'' = our defaults.")
    flags.DEFINE_bool("skip_seeds", False,
                      "Reuse the baseline results of an earlier run (<work_dir>/seeds_results_seed<N>.json) instead of "
                      "training it again.")
    app.run(main)
