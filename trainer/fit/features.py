"""Phase 1 on cached features: run the frozen backbone once per image, then train the head on its output.

While the backbone is frozen (and in inference mode) its pooled output for an image never changes, so
phase 1 spends nearly all its time recomputing the same numbers. Here the model is split at the head,

    full model = feature model (input -> [augmentation] -> preprocess -> backbone(s) -> pooling)
                 + head (dropout -> classifier),

the feature model runs over the training set once (or once per augmented view) and over the validation
set once, and the head trains on those features: many epochs in seconds. The head's layers are the full
model's own layers, so training the head trains the full model. Without augmentation the result is the
model the slow path would give (tests/test_features.py checks it); with augmentation each image has
`views` random crops and flips instead of a new one every epoch.

Memory: features that fit the budget (--feature_cache_memory_mb, per worker) stay in memory (host variables)
and are shuffled by index: one copy of them, not two or three. Larger ones are spilled: written as they are computed to TFRecord
files in a folder of this worker's own (local or gs://), streamed back with a shuffle buffer of the
budget's size, and deleted when the phase ends; memory then stays flat in the number of images. A run's spill
folders live in one folder per model_dir and worker (CacheBudget.owner), so a run killed before it could delete
them (SIGKILL, a lost machine) leaves nothing for good: the next run of the same model_dir removes them first.
"""

import dataclasses
import hashlib
import os
import tempfile
import uuid
import weakref

import keras
import numpy as np
import psutil
import tensorflow as tf
from absl import logging

from trainer.input import data

FEATURES_INPUT = "features"
SPILL_FILE_BYTES = 64 * 2**20  # a spilled cache file is closed and the next one opened past this size
SPILL_CYCLE_LENGTH = 4  # spilled files read at once (their records interleaved)
MIN_SHUFFLE_ROWS = 1024
# The layers that make the head; everything before them is the feature model.
HEAD_LAYERS = ("dropout", "classifier")
# The folder of a run's spilled caches under --feature_cache_dir: this prefix + a key of model_dir and worker.
SPILL_FOLDER_PREFIX = "imagefolder-transfer-spill-"


class CacheError(OSError):
    """A spilled cache could not be written (a full disk, a folder without write access): a one-line error."""


def check_cache_directory(directory: str) -> None:
    """Checks --feature_cache_dir before anything is written: a local one must be a folder this process can write
    (or one it can create); ValueError naming the problem. gs:// folders are checked when first written."""
    if not directory or directory.startswith("gs://"):
        return
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--feature_cache_dir {directory!r}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--feature_cache_dir {directory!r}: no permission to write in {existing!r}")


# One split (and so one traced step per strategy and mode) per model: phase 1's passes and the data-quality
# report's test pass reuse it instead of tracing the backbone again (seconds each).
_SPLITS = weakref.WeakKeyDictionary()
_STEPS = weakref.WeakKeyDictionary()


def split_model(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Returns (feature_model, head) sharing the full model's layers (and so its weights); the same pair for
    every call with the same model."""
    if model not in _SPLITS:
        dropout, classifier = (model.get_layer(name) for name in HEAD_LAYERS)
        feature_model = keras.Model(model.inputs, dropout.input, name="feature_model")
        features = keras.Input(shape=feature_model.output.shape[1:], name=FEATURES_INPUT)
        head = keras.Model(features, classifier(dropout(features)), name="head")
        _SPLITS[model] = (feature_model, head)
    return _SPLITS[model]


def _feature_step(feature_model: keras.Model, strategy: tf.distribute.Strategy, training: bool):
    """The traced step of compute_features, made once per feature model, strategy and mode.

    A feature model's backbone runs with training=False: only its augmentation layers (augment_on=device) act on
    `training`. Without them both modes compute the same, and share one trace (a trace of EfficientNet-Lite0
    costs about 0.7 s).
    """
    training = training and data.has_augmentation_layers(feature_model)
    steps = _STEPS.setdefault(feature_model, {})
    if (strategy, training) not in steps:

        def replica_step(images, labels, weights=None, *more):
            outputs = tf.nest.flatten(feature_model(images, training=training))
            outputs = [tf.cast(output, tf.float32) for output in outputs]
            return (*outputs, labels, tf.ones_like(labels, tf.float32) if weights is None else weights, *more)

        steps[(strategy, training)] = tf.function(lambda batch: strategy.run(replica_step, args=batch))
    return steps[(strategy, training)]


@dataclasses.dataclass
class CachedFeatures:
    """One split's features on this worker: in memory (arrays) or spilled to TFRecord files (paths).

    Attributes:
        arrays: (features, labels, weights) as host tf.Variables, or None when spilled.
        paths: the spilled files, in the order written; [] when in memory.
        count: rows (whole per-replica batches; evaluation padding weighs 0).
        width: features per row.
        shuffle_rows: the shuffle buffer of a spilled cache, in rows (from the memory budget).
        folder: the spilled files' folder (this worker's own), or "".
        shape: the shape of one row as the model takes it (cut activations are cached flat); () = (width,).
    """

    arrays: tuple | None
    paths: list
    count: int
    width: int
    shuffle_rows: int = 0
    folder: str = ""
    shape: tuple = ()

    @property
    def nbytes(self) -> int:
        return self.count * (self.width + 2) * 4

    def delete(self) -> None:
        """Removes the spilled files and their folder (nothing for a cache in memory)."""
        if self.folder and tf.io.gfile.exists(self.folder):
            tf.io.gfile.rmtree(self.folder)
        self.paths = []


@dataclasses.dataclass(frozen=True)
class CacheBudget:
    """Where phase 1's features are kept (the flags --feature_cache_memory_mb and --feature_cache_dir).

    memory_mb: features of one split up to this size (per worker) stay in memory; larger ones are spilled, and
        their shuffle buffer holds this much. Either way phase 1 holds at most about this much per split,
        whatever the number of images (benchmarks/scale.py measures it at 200,000).
    directory: the spilled files' parent folder, local or gs://; "" is the system's temporary folder.
    """

    memory_mb: float = 128
    directory: str = ""
    owner: str = ""

    def __post_init__(self):
        if self.memory_mb <= 0:
            raise ValueError(f"--feature_cache_memory_mb={self.memory_mb} must be positive, e.g. 128")

    def owned_by(self, model_dir: str, worker: str) -> "CacheBudget":
        """This budget with its spills in a folder of model_dir's run on this worker (see remove_stale)."""
        key = hashlib.sha256(f"{model_dir}\n{worker}".encode()).hexdigest()[:16]
        return dataclasses.replace(self, owner=key)

    @property
    def spill_parent(self) -> str:
        """The folder holding this run's spill folders: one per model_dir and worker, or the parent itself."""
        parent = self.directory or tempfile.gettempdir()
        return tf.io.gfile.join(parent, SPILL_FOLDER_PREFIX + self.owner) if self.owner else parent

    def remove_stale(self) -> int:
        """Removes what an earlier run of the same model_dir and worker spilled and could not delete (it was
        killed); returns the bytes removed. Safe: the model_dir's lock lets one run at a time own the folder."""
        folder = self.spill_parent
        if not self.owner or not tf.io.gfile.exists(folder):
            return 0
        size = sum(tf.io.gfile.stat(tf.io.gfile.join(root, name)).length
                   for root, _, files in tf.io.gfile.walk(folder) for name in files)
        tf.io.gfile.rmtree(folder)
        return size

    def writer(self, rows: int, width: int, kind: str = "phase1_features"):
        """Where `rows` features of `width` go: in memory when they fit the budget and half the memory this
        machine has available now, else spilled to a new folder of files named after `kind` (a line in the log
        says why)."""
        size = rows * (width + 2) * 4
        available = psutil.virtual_memory().available
        if size <= self.memory_mb * 2**20 and size <= available / 2:
            return _MemoryWriter(capacity=rows, width=width)
        if size <= self.memory_mb * 2**20:
            logging.warning(
                "%.0f MiB of features fit --feature_cache_memory_mb=%g but not half the %.0f MiB of memory available "
                "now: spilled to files instead (lower --feature_cache_memory_mb to choose this yourself)",
                size / 2**20, self.memory_mb, available / 2**20,
            )
        folder = tf.io.gfile.join(self.spill_parent, f"{kind}-{uuid.uuid4().hex}")
        with _cache_errors(folder):
            tf.io.gfile.makedirs(folder)
        return _SpillWriter(folder)

    def shuffle_rows(self, width: int) -> int:
        """Rows of a spilled cache's shuffle buffer: what the budget holds."""
        return max(MIN_SHUFFLE_ROWS, int(self.memory_mb * 2**20 // ((width + 2) * 4)))


def compute_features(
    *, feature_model: keras.Model, strategy: tf.distribute.Strategy, dataset, num_batches: int, training: bool,
    writer=None, collect=None, drop_padding: bool = False, second_writer=None, on_first_batch=None,
) -> None:
    """Runs the feature model over a distributed dataset, handing this worker's rows to a writer and a collector.

    Args:
        feature_model: from split_model, activations.split_at_cut (its pass_model), or a lite_pass.LitePass (its
            Keras front runs here, its frozen part in LiteRT).
        strategy: the tf.distribute strategy (the dataset is distributed by it).
        dataset: distributed (images, labels) or (images, labels, weights, *more) batches; weights are kept
            (evaluation padding weighs 0), or are 1 when the dataset has none; `more` (thumbnails and positions,
            data.make_dataset's thumbnail_side) goes to `collect` untouched.
        num_batches: batches to take: from an endless training dataset, or all of an evaluation dataset's.
        training: run the model's augmentation layers (augment_on=device); the backbone stays in inference mode.
        writer: from CacheBudget.writer (or None: the features are only collected).
        collect: called with (features, labels, weights, *more) as numpy arrays, one call per replica and batch.
        drop_padding: leave rows of weight 0 (evaluation padding) out of the writers (for training rows).
        second_writer: of a feature model with two outputs (activations.CutModels.pass_model): where the second
            output's rows go, flattened (the first goes to `writer` and `collect`).
        on_first_batch: called once with the first replica's images of the first batch, as the pipeline gave them
            (the run's TensorBoard sample of augmented training images).
    """

    lite = feature_model if hasattr(feature_model, "front") else None  # a lite_pass.LitePass
    step = _feature_step(lite.front if lite else feature_model, strategy, training)
    num_outputs = 1 if lite else len(feature_model.outputs)
    for index, batch in enumerate(dataset):
        if index >= num_batches:
            break
        if index == 0 and on_first_batch is not None:
            on_first_batch(strategy.experimental_local_results(batch[0])[0])
        per_replica = [strategy.experimental_local_results(values) for values in step(batch)]
        for values in zip(*per_replica):
            outputs, (labels, weights, *more) = values[:num_outputs], values[num_outputs:]
            outputs = lite.run(keras.ops.convert_to_numpy(outputs[0])) if lite else outputs
            features, *second = (keras.ops.convert_to_numpy(output) for output in outputs)
            labels, weights, *more = (keras.ops.convert_to_numpy(value) for value in (labels, weights, *more))
            labels, weights = labels.astype(np.int32), weights.astype(np.float32)
            if collect is not None:
                collect(features, labels, weights, *more)
            keep = weights > 0 if drop_padding else slice(None)
            for rows, rows_writer in ((features, writer), (second[0] if second else None, second_writer)):
                if rows_writer is not None:
                    rows = rows.reshape(len(rows), -1)
                    rows_writer.write(rows[keep], labels[keep], weights[keep])


class _MemoryWriter:
    """Collects feature batches into arrays allocated once, then hands them over as host tf.Variables.

    One copy while collecting, two for a moment at the end (a list of batches joined at the end would need
    three). Variables, not tensors: a dataset captures a variable by reference, where iterating it copied a
    captured tensor into its graph (measured: +357 MiB for 341 MiB of features).
    """

    def __init__(self, *, capacity: int, width: int):
        # np.empty: pages never written (another worker's share of the rows) take no memory.
        self.arrays = (np.empty((capacity, width), np.float32), np.empty(capacity, np.int32), np.empty(capacity, np.float32))
        self.count, self.width = 0, width

    def write(self, features: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        for array, values in zip(self.arrays, (features, labels, weights)):
            array[self.count : self.count + len(values)] = values
        self.count += len(features)

    def delete(self) -> None:
        self.arrays = None

    def finish(self) -> "CachedFeatures":
        with tf.device("CPU:0"):
            variables = tuple(tf.Variable(array[: self.count], trainable=False) for array in self.arrays)
        self.arrays = None
        return CachedFeatures(arrays=variables, paths=[], count=self.count, width=self.width)


class _SpillWriter:
    """Writes feature batches as TFRecords (one record a batch: raw float32 features, int32 labels, float32
    weights) into files of about SPILL_FILE_BYTES."""

    def __init__(self, folder: str):
        self.folder, self.paths, self.writer, self.written, self.count, self.width = folder, [], None, 0, 0, 0

    def write(self, features: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        self.width = features.shape[1]
        if not len(features):
            return
        example = tf.train.Example(features=tf.train.Features(feature={
            name: tf.train.Feature(bytes_list=tf.train.BytesList(value=[values.tobytes()]))
            for name, values in (("features", features), ("labels", labels), ("weights", weights))
        }))
        with _cache_errors(self.folder):
            if self.writer is None or self.written >= SPILL_FILE_BYTES:
                self._next_file()
            self.writer.write(example.SerializeToString())
        self.written += features.nbytes + labels.nbytes + weights.nbytes
        self.count += len(features)

    def _next_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.paths.append(tf.io.gfile.join(self.folder, f"features-{len(self.paths):05d}.tfrecord"))
        self.writer, self.written = tf.io.TFRecordWriter(self.paths[-1]), 0

    def close(self) -> list:
        if self.writer is not None:
            with _cache_errors(self.folder):
                self.writer.close()
            self.writer = None
        return self.paths

    def delete(self) -> None:
        """Removes what was written (a pass that failed part way); never raises."""
        try:
            if self.writer is not None:
                self.writer.close()
        except (OSError, tf.errors.OpError):
            pass
        self.writer = None
        try:
            if tf.io.gfile.exists(self.folder):
                tf.io.gfile.rmtree(self.folder)
        except (OSError, tf.errors.OpError) as error:
            logging.warning("could not remove the spilled cache %s: %s", self.folder, error)

    def finish(self) -> "CachedFeatures":
        return CachedFeatures(arrays=None, paths=self.close(), count=self.count, width=self.width, folder=self.folder)


class _cache_errors:
    """Turns a failed write of a spilled cache (OSError, or TensorFlow's file errors) into a CacheError."""

    def __init__(self, folder: str):
        self.folder = folder

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or not isinstance(error, (OSError, tf.errors.OpError)) or isinstance(error, CacheError):
            return False
        reason = (getattr(error, "message", None) or str(error)).strip().splitlines()[-1]
        raise CacheError(
            f"could not write the feature cache in {self.folder} ({reason}): free space there, choose another folder "
            "with --feature_cache_dir, or raise --feature_cache_memory_mb to keep more in memory"
        ) from error


def log_cached(name: str, cached: CachedFeatures, *, views: int, seconds: float, budget: CacheBudget) -> None:
    logging.info(
        "phase1: cached %d %s features of width %d (%d view(s) per image) in %.1fs, %.0f MiB%s", cached.count, name,
        cached.width, views, seconds, cached.nbytes / 2**20,
        f", spilled to {len(cached.paths)} file(s) in {cached.folder} (more than --feature_cache_memory_mb="
        f"{budget.memory_mb:g} or half the available memory)" if cached.paths else " in memory",
    )


def make_feature_dataset(
    *, cached: CachedFeatures, batch_size: int, training: bool, seed: int | None, input_context=None
) -> tf.data.Dataset:
    """Batches of cached features for one input pipeline (the features this worker computed).

    Args:
        cached: from compute_features (whole per-replica batches, evaluation padding weighing 0).
        batch_size: the global batch size.
        training: shuffled, endless (features, labels) batches of whole per-replica batches; otherwise one pass
            of (features, labels, weights) in order.
        seed: shuffle seed.
        input_context: from distribute_datasets_from_function.
    """
    local_batch_size = input_context.get_per_replica_batch_size(batch_size) if input_context else batch_size
    if cached.paths:
        return _spilled_dataset(cached, local_batch_size=local_batch_size, training=training, seed=seed)
    features, labels, weights = cached.arrays
    # Batches of row indices, gathered: a training shuffle buffer then holds 8 bytes a row, not a copy of the rows.
    rows = tf.data.Dataset.range(cached.count)
    if training:
        rows = rows.shuffle(cached.count, seed=seed).repeat()
    rows = rows.batch(local_batch_size, drop_remainder=True)
    shape = [-1, *(cached.shape or (cached.width,))]

    def gather(batch):
        return tf.reshape(tf.gather(features, batch), shape), tf.gather(labels, batch), tf.gather(weights, batch)

    # A gather from memory needs no tuning; without tf.data's autotuning thread, deleting the iterator at the end
    # of a phase is immediate (with it, on a busy single core, it waited up to the tuner's next wake-up: 6-8 s
    # after a 12 s phase, measured with taskset -c 0).
    options = tf.data.Options()
    options.autotune.enabled = False
    batches = rows.map(lambda batch: gather(batch)[:2]) if training else rows.map(gather)
    return batches.prefetch(2).with_options(options)


def _spilled_dataset(cached: CachedFeatures, *, local_batch_size: int, training: bool, seed: int | None) -> tf.data.Dataset:
    """make_feature_dataset of a spilled cache: its files streamed, shuffled by a buffer of cached.shuffle_rows."""
    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in ("features", "labels", "weights")}

    def parse(record):
        parsed = tf.io.parse_single_example(record, spec)
        row_shape = cached.shape or (cached.width,)
        features = tf.reshape(tf.io.decode_raw(parsed["features"], tf.float32), [-1, *row_shape])
        return features, tf.io.decode_raw(parsed["labels"], tf.int32), tf.io.decode_raw(parsed["weights"], tf.float32)

    files = tf.data.Dataset.from_tensor_slices(cached.paths)
    if not training:
        dataset = tf.data.TFRecordDataset(files).map(parse).unbatch()
        return dataset.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    # One epoch: the files in a new order, several read at once, rows shuffled within the buffer; repeated
    # after that, so (as in memory) an epoch holds every row once and epochs do not mix.
    files = files.shuffle(len(cached.paths), seed=seed)
    dataset = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(cached.paths), SPILL_CYCLE_LENGTH))
    dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    dataset = dataset.shuffle(min(cached.shuffle_rows, cached.count), seed=seed).repeat()
    dataset = dataset.map(lambda features, labels, weights: (features, labels))
    return dataset.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
