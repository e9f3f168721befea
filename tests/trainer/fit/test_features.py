"""trainer/fit/features.py: phase 1 on cached backbone features trains the same head as on images."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrecords import schema
from trainer.fit import checkpoints
from trainer.fit import features
from trainer.fit import loop
from trainer.fit import recipe
from trainer.fit import steps
from trainer.fit import transfer
from trainer.input import data
from trainer.models import classifier
from trainer.reports import training_log

IMAGE_SIZE = 32


def tiny_backbone_file(tmp_path) -> str:
    """A small random convolutional feature extractor saved as a .keras backbone file (varied features)."""
    backbone = keras.Sequential([
        keras.Input((None, None, 3)),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
    ], name="tiny_backbone")
    path = str(tmp_path / "tiny_backbone.keras")
    backbone.save(path)
    return path


def test_split_model_shares_weights_and_gives_the_full_models_output(tmp_path):
    model = classifier.build_model(
        classifier.ModelSpec(
            backbone=tiny_backbone_file(tmp_path), image_size=IMAGE_SIZE, weights="imagenet", preprocess="tf", dropout=0.3,
        ),
        num_classes=3,
    )
    feature_model, head = features.split_model(model)
    images = np.random.default_rng(0).uniform(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    np.testing.assert_allclose(head(feature_model(images)), model(images), rtol=1e-5, atol=1e-6)
    assert {id(weight) for weight in head.weights} <= {id(weight) for weight in model.weights}


def test_both_modes_share_one_trace_unless_the_model_augments(tmp_path):
    spec = classifier.ModelSpec(backbone=tiny_backbone_file(tmp_path), image_size=IMAGE_SIZE, weights="imagenet",
                                preprocess="tf", dropout=0.0)
    strategy = tf.distribute.get_strategy()
    images = np.random.default_rng(0).uniform(0, 255, (8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    batch = (tf.constant(images), tf.zeros([8], tf.int32))
    for augmentation in (None, data.make_augmentation(flip=True, seed=1)):
        feature_model = features.split_model(classifier.build_model(spec, num_classes=3, augmentation=augmentation))[0]
        training, inference = (features._feature_step(feature_model, strategy, mode) for mode in (True, False))
        # Only the model's augmentation layers act on `training` (the backbone runs in inference mode).
        assert (training is inference) == (augmentation is None)
        flipped = np.abs(training(batch)[0].numpy() - inference(batch)[0].numpy()).max() > 1e-3
        assert flipped == (augmentation is not None)


def train_phase1(tmp_path, demo_data_dir, backbone_file, cache_features: bool, budget=features.CacheBudget()) -> keras.Model:
    """Phase 1 on the whole train split as one batch (order-free), no augmentation, no dropout."""
    manifest = schema.read_manifest(str(demo_data_dir))
    num_train = manifest["splits"]["train"]["num_examples"]
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(1)
    spec = classifier.ModelSpec(backbone=backbone_file, image_size=IMAGE_SIZE, weights="imagenet", preprocess="tf", dropout=0.0)
    model = classifier.build_model(spec, num_classes=3)
    splits = data.DistributedSplits(
        strategy=strategy, data_dir=str(demo_data_dir), manifest=manifest, image_size=IMAGE_SIZE, batch_size=num_train,
        # In order: otherwise a fast image of the next epoch may take a slow one's place in a batch.
        options=data.PipelineOptions(crop_min_area=1.0, flip=False, seed=3, deterministic=True),
    )
    model_dir = str(tmp_path / ("cached" if cache_features else "slow") / budget.directory.rsplit("/", 1)[-1])
    phase = transfer.Phase("phase1", 0, 4, 0.05, "adam", None)
    schedule = transfer.PhaseSchedule(cache_features=cache_features, feature_views=4, feature_cache=budget)
    trained = transfer.phase_data(phase, model=model, evaluation_step=steps.make_evaluation_step(model=model, strategy=strategy),
                                  splits=splits, schedule=schedule, augmented=False, seed=3)
    assert (trained.model is model) == (not cache_features)
    optimizer = recipe.Recipe(lr_schedule="constant", warmup_fraction=0.0).optimizer(
        name="adam", learning_rate=0.05, total_steps=4, precision="float32", model=trained.model
    )
    with checkpoints.PreemptionWatcher() as preemption:
        loop.train_phase(
            phase, trained, optimizer=optimizer, loss_function=recipe.make_loss_function(label_smoothing=0.0, class_weights=None),
            global_batch_size=num_train, strategy=strategy, model_dir=model_dir,
            reporter=training_log.EpochReporter(model_dir=model_dir, chief=True), preemption=preemption,
            options=loop.LoopOptions(steps_per_epoch=1), weights_model=model,
        )
    trained.finish()
    return model


@pytest.mark.parametrize("spilled", [False, True], ids=["in_memory", "spilled_to_files"])
def test_cached_features_train_the_same_head_as_the_slow_path(tmp_path, demo_data_dir, spilled, monkeypatch):
    backbone_file = tiny_backbone_file(tmp_path)
    slow = train_phase1(tmp_path, demo_data_dir, backbone_file, cache_features=False)
    spill_root = tmp_path / "spill"
    spill_root.mkdir()
    # 1 KiB: every split's features are spilled.
    budget = features.CacheBudget(memory_mb=1 / 1024, directory=str(spill_root)) if spilled else features.CacheBudget()
    written = []
    original_writer = features._SpillWriter.close
    monkeypatch.setattr(features._SpillWriter, "close", lambda self: written.extend(original_writer(self)) or list(self.paths))
    cached = train_phase1(tmp_path, demo_data_dir, backbone_file, cache_features=True, budget=budget)
    # Spilled: the train and validation features went to files, all removed after the phase.
    assert (len(written) == 2) == spilled
    assert list(spill_root.iterdir()) == []
    slow_kernel, slow_bias = (keras.ops.convert_to_numpy(w) for w in slow.get_layer("classifier").weights)
    cached_kernel, cached_bias = (keras.ops.convert_to_numpy(w) for w in cached.get_layer("classifier").weights)
    initial = classifier.build_model(
        classifier.ModelSpec(
            backbone=backbone_file, image_size=IMAGE_SIZE, weights="imagenet", preprocess="tf", dropout=0.0,
        ),
        num_classes=3,
    )
    # The head did train (4 Adam steps of 0.05 move every weight), and both paths moved it alike.
    assert np.abs(slow_kernel - keras.ops.convert_to_numpy(initial.get_layer("classifier").weights[0])).max() > 0.05
    np.testing.assert_allclose(cached_kernel, slow_kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cached_bias, slow_bias, rtol=1e-4, atol=1e-5)
    # The backbone is untouched by either path.
    for slow_weight, cached_weight in zip(classifier.get_backbones(slow)[0].weights, classifier.get_backbones(cached)[0].weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(slow_weight), keras.ops.convert_to_numpy(cached_weight))




def test_spilled_features_stream_back_every_row_once(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "SPILL_FILE_BYTES", 500)  # a new file every 3 batches
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(96, 5)).astype(np.float32)
    rows[:, 0] = np.arange(96)  # each row names itself
    labels, weights = (np.arange(96) % 3).astype(np.int32), np.ones(96, np.float32)
    writer = features._SpillWriter(str(tmp_path))
    for start in range(0, 96, 8):
        writer.write(rows[start : start + 8], labels[start : start + 8], weights[start : start + 8])
    cached = features.CachedFeatures(arrays=None, paths=writer.close(), count=96, width=5, shuffle_rows=32,
                                     folder=str(tmp_path))
    assert len(cached.paths) >= 4
    evaluation = list(features.make_feature_dataset(cached=cached, batch_size=16, training=False, seed=1))
    np.testing.assert_array_equal(np.concatenate([batch[0] for batch in evaluation]), rows)
    np.testing.assert_array_equal(np.concatenate([batch[1] for batch in evaluation]), labels)
    # Training: endless and shuffled; the first 96 rows are each row once (one pass over the files).
    training = features.make_feature_dataset(cached=cached, batch_size=16, training=True, seed=1).take(6)
    seen = np.concatenate([batch[0].numpy() for batch in training])
    assert sorted(seen[:, 0].tolist()) == list(range(96)) and seen[:, 0].tolist() != list(range(96))
    cached.delete()
    assert not tmp_path.exists()


def test_features_that_fit_the_budget_but_not_the_available_memory_are_spilled(tmp_path, monkeypatch, caplog):
    """Fault injection (issue 26): a machine with less memory free than the budget assumes. The cache is spilled
    before any feature is computed, with one line naming the flag, instead of an OOM kill halfway."""
    budget = features.CacheBudget(memory_mb=256, directory=str(tmp_path))
    assert isinstance(budget.writer(rows=10_000, width=1280), features._MemoryWriter)  # 49 MiB: in memory
    monkeypatch.setattr(features.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=40 * 2**20))
    with caplog.at_level("WARNING"):
        writer = budget.writer(rows=10_000, width=1280)
    assert isinstance(writer, features._SpillWriter) and writer.folder.startswith(str(tmp_path))
    assert "--feature_cache_memory_mb" in caplog.text and "available" in caplog.text


def write_until_refused(writer, *, batches: int = 64) -> None:
    rows = np.ones((64, 1024), np.float32)  # 256 KiB a batch
    for _ in range(batches):
        writer.write(rows, np.zeros(64, np.int32), np.ones(64, np.float32))
    writer.finish()


def test_a_full_disk_while_spilling_is_a_one_line_error_and_leaves_nothing(tmp_path):
    """Fault injection (issue 29's attack: a full disk left a traceback and the partial files). The disk fills at
    1 MiB: the process's file size limit (as `ulimit -f`), so the real write fails as on a full disk."""
    import resource
    import signal

    budget = features.CacheBudget(memory_mb=1, directory=str(tmp_path / "spill")).owned_by("/models/a", worker="")
    writer = budget.writer(rows=4096, width=1024, kind="phase2_activations")
    assert isinstance(writer, features._SpillWriter) and "phase2_activations-" in writer.folder
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limits[1]))
    try:
        with pytest.raises(features.CacheError) as raised:
            write_until_refused(writer)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    message = str(raised.value)
    assert "\n" not in message and writer.folder in message and "--feature_cache_dir" in message, message
    assert any((tmp_path / "spill").rglob("*.tfrecord"))
    writer.delete()  # what transfer._cached_pass does when its pass fails
    assert not any((tmp_path / "spill").rglob("*.tfrecord"))


def test_what_a_killed_run_spilled_is_removed_by_the_next_run_of_its_model_dir_only(tmp_path):
    """Fault injection (issue 29's attack: after a SIGKILL in phase 2 the spill stayed in TMPDIR for good)."""
    spill = str(tmp_path / "spill")
    killed = features.CacheBudget(memory_mb=1, directory=spill).owned_by("/models/a", worker="")
    other_model = features.CacheBudget(memory_mb=1, directory=spill).owned_by("/models/b", worker="")
    other_worker = features.CacheBudget(memory_mb=1, directory=spill).owned_by("/models/a", worker="worker:1")
    for budget in (killed, other_model, other_worker):
        writer = budget.writer(rows=4096, width=1024)
        writer.write(np.ones((64, 1024), np.float32), np.zeros(64, np.int32), np.ones(64, np.float32))
        writer.close()  # ... and the process is killed: nothing deletes the folder
    assert len({killed.spill_parent, other_model.spill_parent, other_worker.spill_parent}) == 3
    rerun = features.CacheBudget(memory_mb=1, directory=spill).owned_by("/models/a", worker="")
    assert rerun.remove_stale() >= 64 * 1024 * 4
    assert not tf.io.gfile.exists(killed.spill_parent)
    assert tf.io.gfile.exists(other_model.spill_parent) and tf.io.gfile.exists(other_worker.spill_parent)
    assert rerun.remove_stale() == 0


@pytest.mark.parametrize("case", ["file", "missing_nested", "read_only"])
def test_the_cache_folder_is_checked_before_anything_is_written(tmp_path, case):
    if case == "file":
        (tmp_path / "a_file").write_text("x")
        with pytest.raises(ValueError, match=r"--feature_cache_dir '.*a_file/sub': '.*a_file' is a file, not a folder"):
            features.check_cache_directory(str(tmp_path / "a_file" / "sub"))
    elif case == "missing_nested":  # created when first written
        features.check_cache_directory(str(tmp_path / "no" / "such" / "folder"))
        assert not (tmp_path / "no").exists()
    else:
        import os

        if os.geteuid() == 0:
            pytest.skip("root may write anywhere")
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(ValueError, match="no permission to write"):
            features.check_cache_directory(str(tmp_path / "locked" / "spill"))
