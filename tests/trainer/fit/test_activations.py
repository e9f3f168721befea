"""trainer/fit/activations.py: phase 2 on cached activations at the cut trains the same model as on images."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrecords import schema
from trainer.fit import activations
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


def residual_backbone_file(tmp_path) -> str:
    """A small random backbone with a residual block in the middle (it cannot be cut inside), saved as .keras.

    Layers: 0 input, 1 stem, 2 stem_bn, 3 block_conv1, 4 block_conv2, 5 block_add, 6 top_conv, 7 top_bn, 8 top_out.
    """
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    branch = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="block_conv1")(x)
    branch = keras.layers.Conv2D(8, 3, padding="same", name="block_conv2")(branch)
    x = keras.layers.Add(name="block_add")([x, branch])
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="top_conv")(x)
    x = keras.layers.BatchNormalization(name="top_bn")(x)
    outputs = keras.layers.ReLU(name="top_out")(x)
    path = str(tmp_path / "residual_backbone.keras")
    keras.Model(inputs, outputs, name="residual_backbone").save(path)
    return path


def build(backbone_file, *, dropout=0.0, seed=1):
    keras.utils.set_random_seed(seed)
    spec = classifier.ModelSpec(backbone=backbone_file, image_size=IMAGE_SIZE, weights="imagenet", preprocess="tf",
                                dropout=dropout)
    return classifier.build_model(spec, num_classes=3)


def test_boundaries_are_never_inside_a_residual_block(tmp_path):
    backbone = classifier.get_backbone(build(residual_backbone_file(tmp_path)))
    found = activations.boundaries(backbone)
    # block_conv1 and block_conv2 are inside the block: the add also reads stem_bn's output.
    assert found[0] == 0 and [backbone.layers[index].name for index in found[1:]] == [
        "stem", "stem_bn", "block_add", "top_conv", "top_bn", "top_out"]
    # The first unfrozen layer inside the block (block_conv2, index 4) cuts below the block, at stem_bn.
    cut = activations.find_cut(backbone, first_trainable=4, image_size=IMAGE_SIZE)
    assert (cut.layer, cut.shape) == ("stem_bn", (16, 16, 8))
    assert 0 < cut.bottom_macs < cut.total_macs
    assert activations.find_cut(backbone, first_trainable=6, image_size=IMAGE_SIZE).layer == "block_add"
    # Nothing to cut when the first unfrozen layer is the first layer after the input.
    assert activations.find_cut(backbone, first_trainable=1, image_size=IMAGE_SIZE) is None


def test_real_backbones_cut_at_block_boundaries():
    """MobileNetV2's inverted residual blocks: the cut is a block's output (an add or a projection), not inside."""
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3))
    first_trainable = classifier.resolve_fine_tune_at(backbone, "0.7")
    cut = activations.find_cut(backbone, first_trainable=first_trainable, image_size=64)
    assert cut.index < first_trainable
    assert cut.layer.endswith(("_add", "_project_BN")), cut.layer
    later = [layer.name for layer in backbone.layers[cut.index + 1 : first_trainable]]
    assert not any(name.endswith("_add") for name in later)  # the nearest boundary below, not a deeper one


def test_split_at_cut_gives_the_full_models_output_and_shares_its_weights(tmp_path):
    model = build(residual_backbone_file(tmp_path), dropout=0.3)
    cut = activations.find_cut(classifier.get_backbone(model), first_trainable=6, image_size=IMAGE_SIZE)
    parts = activations.split_at_cut(model, cut)
    assert activations.split_at_cut(model, cut) is parts
    images = np.random.default_rng(0).uniform(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    feature_model, _ = features.split_model(model)
    pooled, cut_activations = parts.pass_model(images)
    np.testing.assert_allclose(pooled, feature_model(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cut_activations, parts.bottom(images), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(parts.top(cut_activations), model(images), rtol=1e-5, atol=1e-6)
    assert {id(weight) for weight in parts.top.weights} <= {id(weight) for weight in model.weights}
    # Unfreezing the full model unfreezes the top's layers: training the top trains the full model.
    classifier.unfreeze_backbone(model, "6")
    top_names = [weight.path for weight in parts.top.trainable_weights]
    assert top_names == [weight.path for weight in model.trainable_weights]


def test_plan_decides_and_says_why(tmp_path, monkeypatch):
    model = build(residual_backbone_file(tmp_path))
    budget = features.CacheBudget()
    always = activations.plan(model, mode="always", fine_tune_at="6", image_size=IMAGE_SIZE, rows=100, budget=budget)
    assert always.cut.layer == "block_add"
    assert activations.plan(model, mode="never", fine_tune_at="6", image_size=IMAGE_SIZE, rows=100,
                            budget=budget).cut is None
    assert activations.plan(model, mode="auto", fine_tune_at=None, image_size=IMAGE_SIZE, rows=100,
                            budget=budget).reason == "no phase 2"
    # Cut right after the stem: 8 KiB of activations per image against a few thousand multiply-adds.
    cheap = activations.plan(model, mode="auto", fine_tune_at="3", image_size=IMAGE_SIZE, rows=100, budget=budget)
    assert cheap.cut is None and ("multiply-adds" in cheap.reason)
    # Spilled to gs:// and read back every epoch: not in auto.
    mobilenet = classifier.build_model(classifier.ModelSpec(backbone="mobilenet_v2", image_size=64, weights="none"),
                                       num_classes=3)
    remote = features.CacheBudget(memory_mb=1, directory="gs://bucket/cache")
    decided = activations.plan(mobilenet, mode="auto", fine_tune_at="0.7", image_size=64, rows=10_000, budget=remote)
    assert decided.cut is None and "gs://bucket/cache" in decided.reason
    assert activations.plan(mobilenet, mode="auto", fine_tune_at="0.7", image_size=64, rows=10_000,
                            budget=budget).cut is not None
    # A local spill needing more than half the folder's free space: not in auto (a disk filled by a default).
    local = features.CacheBudget(memory_mb=1, directory=str(tmp_path))
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=10 * 2**20))
    full = activations.plan(mobilenet, mode="auto", fine_tune_at="0.7", image_size=64, rows=10_000, budget=local)
    assert full.cut is None and "more than half" in full.reason and str(tmp_path) in full.reason
    assert activations.plan(mobilenet, mode="auto", fine_tune_at="0.7", image_size=64, rows=100,
                            budget=local).cut is not None
    (tmp_path / "second").mkdir()
    members = f"{residual_backbone_file(tmp_path)}+{residual_backbone_file(tmp_path / 'second')}"
    ensemble = classifier.build_model(
        classifier.ModelSpec(backbone=members, image_size=IMAGE_SIZE, preprocess="tf"), num_classes=3)
    assert "ensemble" in activations.plan(ensemble, mode="always", fine_tune_at="0.7", image_size=IMAGE_SIZE, rows=10,
                                          budget=budget).reason
    with pytest.raises(ValueError, match="--phase2_cache 'sometimes'"):
        activations.plan(model, mode="sometimes", fine_tune_at="6", image_size=IMAGE_SIZE, rows=1, budget=budget)


def train_phase2(tmp_path, demo_data_dir, backbone_file, *, cached: bool, budget=features.CacheBudget(),
                 views: int = 1) -> keras.Model:
    """Phase 2 (unfrozen from top_conv) on the whole train split as one batch (order-free), no augmentation."""
    manifest = schema.read_manifest(str(demo_data_dir))
    num_train = manifest["splits"]["train"]["num_examples"]
    strategy = tf.distribute.get_strategy()
    model = build(backbone_file)
    splits = data.DistributedSplits(
        strategy=strategy, data_dir=str(demo_data_dir), manifest=manifest, image_size=IMAGE_SIZE, batch_size=num_train,
        options=data.PipelineOptions(crop_min_area=1.0, flip=False, seed=3, deterministic=True),
    )
    model_dir = str(tmp_path / ("cached" if cached else "slow") / budget.directory.rsplit("/", 1)[-1])
    phase = transfer.Phase("phase2", 0, 3, 0.01, "adam", "6")
    transfer.unfreeze(model, phase, strategy=strategy)
    schedule = transfer.PhaseSchedule(feature_views=views, feature_cache=budget)
    cache = None
    if cached:
        cut = activations.plan(model, mode="always", fine_tune_at="6", image_size=IMAGE_SIZE, rows=num_train,
                               budget=budget).cut
        cache = activations.ActivationCache(cut)
    trained = transfer.phase_data(phase, model=model, splits=splits, schedule=schedule, augmented=False, seed=3,
                                  evaluation_step=steps.make_evaluation_step(model=model, strategy=strategy),
                                  activations=cache)
    assert (trained.model is model) == (not cached)
    optimizer = recipe.Recipe(lr_schedule="constant", warmup_fraction=0.0).optimizer(
        name="adam", learning_rate=0.01, total_steps=3, precision="float32", model=trained.model
    )
    with checkpoints.PreemptionWatcher() as preemption:
        loop.train_phase(
            phase, trained, optimizer=optimizer,
            loss_function=recipe.make_loss_function(label_smoothing=0.0, class_weights=None),
            global_batch_size=num_train, strategy=strategy, model_dir=model_dir,
            reporter=training_log.EpochReporter(model_dir=model_dir, chief=True), preemption=preemption,
            options=loop.LoopOptions(steps_per_epoch=1), weights_model=model,
        )
    trained.finish()
    if cache is not None:
        assert cache.describe()["layer"] == "block_add" and cache.describe()["train_rows"] == num_train * views
        cache.delete()
    return model


@pytest.mark.parametrize("spilled", [False, True], ids=["in_memory", "spilled_to_files"])
def test_cached_activations_train_the_same_model_as_the_slow_path(tmp_path, demo_data_dir, spilled):
    backbone_file = residual_backbone_file(tmp_path)
    slow = train_phase2(tmp_path, demo_data_dir, backbone_file, cached=False)
    spill_root = tmp_path / "spill"
    spill_root.mkdir()
    budget = features.CacheBudget(memory_mb=1 / 1024, directory=str(spill_root)) if spilled else features.CacheBudget()
    cached = train_phase2(tmp_path, demo_data_dir, backbone_file, cached=True, budget=budget)
    assert list(spill_root.iterdir()) == []  # spilled files removed once the cache is deleted
    initial = build(backbone_file)
    moved = np.abs(keras.ops.convert_to_numpy(slow.get_layer("classifier").weights[0])
                   - keras.ops.convert_to_numpy(initial.get_layer("classifier").weights[0])).max()
    assert moved > 0.005  # it did train
    for slow_weight, cached_weight, initial_weight in zip(slow.weights, cached.weights, initial.weights):
        assert slow_weight.path == cached_weight.path
        np.testing.assert_allclose(keras.ops.convert_to_numpy(cached_weight), keras.ops.convert_to_numpy(slow_weight),
                                   rtol=1e-4, atol=1e-5, err_msg=slow_weight.path)
        if not slow_weight.trainable:  # the frozen bottom and every BatchNormalization statistic: untouched
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(slow_weight),
                                          keras.ops.convert_to_numpy(initial_weight))
    # top_conv trained (it is above the cut) in both.
    top_kernel = [w for w in cached.weights if "top_conv" in w.path and "kernel" in w.path][0]
    initial_kernel = [w for w in initial.weights if "top_conv" in w.path and "kernel" in w.path][0]
    assert np.abs(keras.ops.convert_to_numpy(top_kernel) - keras.ops.convert_to_numpy(initial_kernel)).max() > 1e-3


def test_a_checkpoint_of_either_path_resumes_in_the_other(tmp_path):
    """Phase 2 on cached activations checkpoints the whole classifier with the top's optimizer: a rerun that decides
    otherwise (say, less memory free) restores it on images, and the reverse."""
    backbone_file = residual_backbone_file(tmp_path)
    strategy = tf.distribute.get_strategy()
    for first, second in ((True, False), (False, True)):
        saved = build(backbone_file, seed=1)
        classifier.unfreeze_backbone(saved, "6")
        cut = activations.find_cut(classifier.get_backbone(saved), first_trainable=6, image_size=IMAGE_SIZE)

        def trained_variables(model, cached):
            return activations.split_at_cut(model, cut).top if cached else model

        optimizer = recipe.make_optimizer(name="adam", learning_rate=0.01, weight_decay=0.0, precision="float32",
                                          model=trained_variables(saved, first))
        for variable in trained_variables(saved, first).trainable_variables:
            variable.assign_add(tf.ones_like(variable))
        for variable in optimizer.variables:
            variable.assign(tf.fill(variable.shape, tf.cast(3, variable.dtype)))
        model_dir = str(tmp_path / f"from_{'cached' if first else 'images'}")
        checkpoints.PhaseCheckpoint(model_dir=model_dir, phase_name="phase2", model=saved, optimizer=optimizer,
                                    strategy=strategy, initial_epoch=0).save()
        restored = build(backbone_file, seed=2)
        classifier.unfreeze_backbone(restored, "6")
        restored_optimizer = recipe.make_optimizer(name="adam", learning_rate=0.01, weight_decay=0.0,
                                                   precision="float32", model=trained_variables(restored, second))
        checkpoints.PhaseCheckpoint(model_dir=model_dir, phase_name="phase2", model=restored,
                                    optimizer=restored_optimizer, strategy=strategy, initial_epoch=0).restore_latest()
        for saved_weight, restored_weight in zip(saved.weights, restored.weights):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored_weight),
                                          keras.ops.convert_to_numpy(saved_weight))
        def names(variables):  # without the optimizer's own name (adam_4/...)
            return [variable.path.split("/", 1)[1] for variable in variables]

        assert names(restored_optimizer.variables) == names(optimizer.variables)
        for variable in restored_optimizer.variables[2:]:  # iterations and learning rate first, then the slots
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), 3)


def test_plan_never_breaks_a_run_the_images_path_would_finish(tmp_path):
    """Fault injection (issue 29's attack): the default crashed where phase 2 on images ran."""
    model = build(residual_backbone_file(tmp_path))
    budget = features.CacheBudget()
    # --fine_tune_at=1.0 (or the number of layers) unfreezes nothing: the cut landed on the output layer.
    for nothing in ("1.0", "9"):
        for mode in ("auto", "always"):
            decided = activations.plan(model, mode=mode, fine_tune_at=nothing, image_size=IMAGE_SIZE, rows=10,
                                       budget=budget)
            assert decided.cut is None and "unfreezes no layer" in decided.reason
    # The last layer unfrozen: the cut is below it, never the output layer itself.
    assert activations.plan(model, mode="always", fine_tune_at="-1", image_size=IMAGE_SIZE, rows=10,
                            budget=budget).cut.layer == "top_bn"
    # A --feature_cache_dir that does not exist yet (it is created when first written) and a spill.
    mobilenet = classifier.build_model(classifier.ModelSpec(backbone="mobilenet_v2", image_size=64, weights="none"),
                                       num_classes=3)
    missing = features.CacheBudget(memory_mb=1, directory=str(tmp_path / "no" / "such" / "folder"))
    assert activations.plan(mobilenet, mode="auto", fine_tune_at="0.7", image_size=64, rows=10_000,
                            budget=missing).cut is not None
    assert not (tmp_path / "no").exists()


def test_plan_says_when_a_cache_would_train_without_augmentation_or_is_forced_against_auto(tmp_path):
    mobilenet = classifier.build_model(classifier.ModelSpec(backbone="mobilenet_v2", image_size=64, weights="none"),
                                       num_classes=3)
    budget = features.CacheBudget()
    # --feature_views=1 with the data-quality report: the one cached view is the unaugmented one.
    auto = activations.plan(mobilenet, mode="auto", fine_tune_at="0.7", image_size=64, rows=100, budget=budget,
                            unaugmented_only=True)
    assert auto.cut is None and "--feature_views=1" in auto.reason and "without augmentation" in auto.reason
    forced = activations.plan(mobilenet, mode="always", fine_tune_at="0.7", image_size=64, rows=100, budget=budget,
                              unaugmented_only=True)
    assert forced.cut is not None and "auto would not cache" in forced.reason
    cheap = activations.plan(build(residual_backbone_file(tmp_path)), mode="always", fine_tune_at="3",
                             image_size=IMAGE_SIZE, rows=100, budget=budget)
    assert cheap.cut is not None and "auto would not cache" in cheap.reason and "multiply-adds" in cheap.reason


def test_a_backbone_with_operations_outside_layers_is_not_cut_and_says_why(tmp_path):
    """MobileNetV3's hard-swish is `x + 3` on tensors, not a layer: no boundary can be trusted in such a graph."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(inputs)
    x = keras.layers.ReLU(name="relu")(x + 3.0)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="top_conv")(x)
    path = str(tmp_path / "with_op.keras")
    keras.Model(inputs, x, name="with_op").save(path)
    decided = activations.plan(build(path), mode="always", fine_tune_at="-1", image_size=IMAGE_SIZE, rows=10,
                               budget=features.CacheBudget())
    assert decided.cut is None and "cannot be cut" in decided.reason and "outside layers" in decided.reason


def test_a_sequential_backbone_file_does_not_break_the_plan(tmp_path):
    """Fault injection: a backbone saved as a keras.Sequential (benchmarks/scale.py's) crashed every default run in
    the plan (AttributeError: 'Sequential' object has no attribute '_nodes_by_depth'); phase 2 then trains on images."""
    path = str(tmp_path / "sequential.keras")
    keras.Sequential([
        keras.Input((None, None, 3)),
        keras.layers.Conv2D(8, 3, strides=2, name="stem"),
        keras.layers.Conv2D(16, 1, name="top_conv"),
    ], name="sequential_backbone").save(path)
    for mode in ("auto", "always"):
        decided = activations.plan(build(path), mode=mode, fine_tune_at="-1", image_size=IMAGE_SIZE, rows=10,
                                   budget=features.CacheBudget())
        assert decided.cut is None and "cannot be cut" in decided.reason
