"""One training job: build the model, run its phases, evaluate, export.

`trainer/train.py` (the entry point) validates the flags and calls train_and_export; this module does the
work in order: datasets per input pipeline -> model in strategy.scope() -> phases (trainer/transfer.py)
-> best weights -> evaluation (metrics.json, and on the chief the full report of trainer/evaluate.py)
-> SavedModel, model.keras, labels.txt and optional TFLite files.
"""

import hashlib
import json

import keras
import tensorflow as tf
from absl import logging

from trainer import data, distribute, evaluate, export, loop, model as model_lib, recipe, transfer


def weights_fingerprint(model: keras.Model) -> str:
    """A short digest of every weight's bytes: equal on all workers when they are in sync."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(keras.ops.convert_to_numpy(weight).tobytes())
    return digest.hexdigest()[:16]


def distribute_dataset(strategy: tf.distribute.Strategy, make_dataset):
    """Builds the dataset once per input pipeline (per worker), each reading its own files, and batching
    per replica: the same code feeds one GPU, a multi-GPU host and many hosts.

    Args:
        strategy: the tf.distribute strategy.
        make_dataset: a function of a tf.distribute.InputContext returning that pipeline's dataset.
    """
    return strategy.distribute_datasets_from_function(make_dataset)


def train_and_export(
    *,
    strategy: tf.distribute.Strategy,
    data_dir: str,
    manifest: dict,
    model_dir: str,
    backbone: str,
    backbone_layer: str,
    weights: str,
    preprocess: str,
    image_size: int,
    batch_size: int,
    precision: str,
    epochs: int,
    fine_tune_epochs: int,
    learning_rate: float,
    fine_tune_learning_rate: float,
    optimizer: str,
    fine_tune_optimizer: str,
    lr_schedule: str,
    warmup_fraction: float,
    weight_decay: float,
    label_smoothing: float,
    class_weight: str,
    fine_tune_at: str,
    unfreeze_stages: int,
    cache_features: bool,
    feature_views: int,
    dropout: float,
    steps_per_epoch: int,
    augment_on: str,
    augmentation_factors: dict,
    dataset_arguments: dict,
    early_stopping_patience: int,
    profile_steps: tuple[int, int] | None,
    checkpoint_every_steps: int,
    steps_per_execution: int,
    jit_compile: bool,
    confusion_matrix_images: bool,
    top_k: int,
    export_tflite: bool,
    seed: int,
    baseline_cnn: bool = False,
) -> dict:
    """Runs the phases, evaluates, exports, and returns the metrics written to metrics.json.

    Args: as the flags of the same names; `preprocess` is already resolved, `fine_tune_learning_rate`
    and `fine_tune_optimizer` already defaulted. `augmentation_factors` holds data.make_augmentation's
    layer factors (rotation, zoom, translation, contrast, brightness); `augment_on` says whether those
    layers run in tf.data ("host") or as the model's first layers ("device"). `dataset_arguments` holds
    the remaining keyword arguments of data.make_dataset (flip, crop_min_area, shuffle_buffer, cache, ...).
    baseline_cnn: train the small from-scratch CNN instead of the backbone (one phase of
    epochs + fine_tune_epochs epochs, the same budget).

    Raises:
        loop.Preempted: a SIGTERM stopped training after saving a checkpoint.
    """
    class_names = manifest["classes"]
    num_train = manifest["splits"]["train"]["num_examples"]
    steps_per_epoch = steps_per_epoch or max(1, num_train // batch_size)
    eval_split = "test" if "test" in manifest["splits"] else "validation"
    chief = distribute.is_chief(strategy)
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(precision)
    has_layers = any(augmentation_factors.values())
    augmented = has_layers or dataset_arguments["flip"] or dataset_arguments["crop_min_area"] < 1.0

    def augmentation(pixels):
        # Flips happen in the decode; tf.data batches are uint8 until augmented, the model's are float32.
        return data.make_augmentation(flip=False, seed=seed, pixels=pixels, **augmentation_factors)

    host_augmentation = augmentation("uint8") if augment_on == "host" else None

    def dataset(split, training):
        return distribute_dataset(strategy, lambda input_context: data.make_dataset(
            data_dir=data_dir, manifest=manifest, split=split, image_size=image_size, batch_size=batch_size,
            training=training, augmentation=host_augmentation, seed=seed, input_context=input_context,
            **dataset_arguments,
        ))

    with strategy.scope():
        device_augmentation = augmentation("float32") if augment_on == "device" else None
        if baseline_cnn:
            model = model_lib.build_baseline_cnn(
                num_classes=len(class_names), image_size=image_size, dropout=dropout, augmentation=device_augmentation
            )
        else:
            model = model_lib.build_model(
                backbone=backbone, backbone_layer=backbone_layer or None, num_classes=len(class_names),
                image_size=image_size, weights=weights, preprocess=preprocess, dropout=dropout,
                augmentation=device_augmentation,
            )
    if chief and augmented:
        write_augmented_images(model_dir, dataset_arguments, data_dir, manifest, image_size, host_augmentation,
                               device_augmentation, seed)
    backbones = model_lib.get_backbones(model)
    if baseline_cnn:
        phases = [transfer.Phase("baseline_cnn", 0, epochs + fine_tune_epochs, learning_rate, optimizer, None)]
    else:
        phases = transfer.plan_phases(
            epochs=epochs, fine_tune_epochs=fine_tune_epochs, learning_rate=learning_rate,
            fine_tune_learning_rate=fine_tune_learning_rate, optimizer=optimizer,
            fine_tune_optimizer=fine_tune_optimizer, fine_tune_at=fine_tune_at,
            # Checks --fine_tune_at against every backbone now rather than after phase 1.
            fine_tune_fraction=min(
                model_lib.resolve_fine_tune_at(member, fine_tune_at) / len(member.layers) for member in backbones
            ),
            unfreeze_stages=unfreeze_stages,
        )
    history = loop.History(model_dir, chief)
    preemption = loop.PreemptionWatcher()
    # A resumed run skips finished phases: their results come from the metrics.json of the run before.
    metrics_path = tf.io.gfile.join(model_dir, "metrics.json")
    phase_results = {}
    if tf.io.gfile.exists(metrics_path):
        with tf.io.gfile.GFile(metrics_path) as file:
            phase_results = json.load(file).get("phases", {})

    last_results = {}

    def after_phase(phase, evaluate_on):
        # Validation accuracy is the phase's last epoch's; the evaluation split is measured here.
        last_results.update(evaluate_on(eval_split))
        validation_accuracy = [entry["val_accuracy"] for entry in history.epochs if entry["phase"] == phase.name][-1]
        phase_results[phase.name] = {
            "validation_accuracy": validation_accuracy, f"{eval_split}_accuracy": last_results["accuracy"],
        }
        logging.info("%s done: validation accuracy %.4f, %s accuracy %.4f", phase.name, validation_accuracy,
                     eval_split, last_results["accuracy"])

    try:
        transfer.run_phases(
            phases=phases, model=model, strategy=strategy, model_dir=model_dir,
            make_dataset=dataset, batch_size=batch_size, steps_per_epoch=steps_per_epoch, num_train_examples=num_train,
            precision=precision, lr_schedule=lr_schedule, warmup_fraction=warmup_fraction, weight_decay=weight_decay,
            loss_function=recipe.make_loss_function(
                label_smoothing=label_smoothing,
                class_weights=recipe.class_weights(
                    mode=class_weight, class_counts=manifest["splits"]["train"]["class_counts"], class_names=class_names
                ),
            ),
            cache_features=cache_features, feature_views=feature_views, augmented=augmented, seed=seed,
            profile_steps=profile_steps, after_phase=after_phase,
            loop_arguments=dict(
                history=history, early_stopping_patience=early_stopping_patience,
                checkpoint_every_steps=checkpoint_every_steps, preemption=preemption,
                steps_per_execution=steps_per_execution, jit_compile=jit_compile,
                class_names=class_names if confusion_matrix_images else None,
            ),
        )
    finally:
        preemption.close()
    restored = transfer.restore_best_weights(model=model, model_dir=model_dir, history=history)
    # The last phase's evaluation holds unless older weights came back.
    results = last_results if last_results and not restored else loop.evaluate(
        loop.make_evaluation_step(model=model, strategy=strategy, num_classes=len(class_names)),
        dataset(eval_split, training=False),
    )
    metrics = {
        "evaluated_split": eval_split,
        "num_examples": manifest["splits"][eval_split]["num_examples"],
        "loss": results["loss"],
        "accuracy": results["accuracy"],
        "backbone": model_lib.BASELINE_CNN_NAME if baseline_cnn else backbone,
        "image_size": image_size,
        "num_classes": len(class_names),
        "num_replicas": strategy.num_replicas_in_sync,
        "phases": phase_results,
        "restored_best_weights_of_epoch": restored["epoch"] if restored else None,
        "history": history.epochs,
    }
    logging.info("%s accuracy %.4f, loss %.4f", eval_split, metrics["accuracy"], metrics["loss"])
    # Every worker logs this; under multi_worker they must agree (the tests compare them).
    logging.info("weights fingerprint %s", weights_fingerprint(model))
    export_dir = tf.io.gfile.join(model_dir, export.SAVED_MODEL_DIR)
    # Every worker exports (saving may need collectives); only the chief's copy is kept.
    export_write_dir = distribute.write_dir(export_dir, strategy)
    export.export_saved_model(
        model=model, class_names=class_names, image_size=image_size, export_dir=export_write_dir, top_k=top_k
    )
    distribute.remove_write_dir(export_write_dir, strategy)
    if chief:
        loop.write_text(tf.io.gfile.join(model_dir, "metrics.json"), json.dumps(metrics, indent=2))
        loop.write_text(tf.io.gfile.join(model_dir, "labels.txt"), "".join(name + "\n" for name in class_names))
        model.save(tf.io.gfile.join(model_dir, export.KERAS_MODEL_FILE))
        if export_tflite:
            for quantization in export.TFLITE_FILES:
                export.export_tflite(model=model, class_names=class_names, image_size=image_size,
                                     output_dir=tf.io.gfile.join(model_dir, export.TFLITE_DIR), quantization=quantization)
        # The full report (per-class, confusion matrix, worst errors) and the learning curves.
        evaluate.evaluate_model(
            model=model, data_dir=data_dir, manifest=manifest, split=eval_split, image_size=image_size,
            batch_size=batch_size, class_names=class_names, top_k=top_k, output_dir=model_dir,
        )
        evaluate.write_learning_curves(model_dir)
    return metrics


def write_augmented_images(model_dir, dataset_arguments, data_dir, manifest, image_size, host_augmentation,
                           device_augmentation, seed) -> None:
    """Puts a few augmented training images in TensorBoard (step 0), so users see what the model sees."""
    arguments = {key: value for key, value in dataset_arguments.items() if key not in ("data_service", "cache")}
    images, _ = next(iter(data.make_dataset(
        data_dir=data_dir, manifest=manifest, split="train", image_size=image_size, batch_size=8, training=True,
        augmentation=host_augmentation, seed=seed, **arguments,
    )))
    if device_augmentation is not None:
        images = device_augmentation(images, training=True)
    loop.write_image_summary(model_dir=model_dir, name="augmented_training_images", images=images)
