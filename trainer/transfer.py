"""Two-phase transfer learning: which phases run, with what, and the guards around them.

    phase1            backbone frozen, new head; on cached backbone features when possible (features.py)
    phase2            backbone unfrozen from --fine_tune_at (BatchNormalization stays frozen), lower rate;
    phase2-stage2...  with --unfreeze_stages > 1, phase 2 unfreezes gradually: each stage goes deeper,
                      each with a fresh optimizer and its own warmup + decay

Each phase has its own checkpoint folder; a rerun skips every phase before the last one that has a
checkpoint (a later checkpoint holds the whole model). At the end the weights with the best validation
accuracy are restored, with a warning naming the likely cause when the last epoch was not the best.
"""

import dataclasses

import keras
import tensorflow as tf
from absl import logging

from trainer import features as features_lib, loop, model as model_lib, recipe


@dataclasses.dataclass(frozen=True)
class Phase:
    """One call of loop.train_phase.

    name: checkpoint folder and the "phase" of its history entries.
    first_epoch, last_epoch: epochs done before it starts, and when it ends (the count runs on across phases).
    learning_rate, optimizer: its peak rate and optimizer name.
    fine_tune_at: the first unfrozen backbone layer; None for phase 1 (backbone frozen).
    """

    name: str
    first_epoch: int
    last_epoch: int
    learning_rate: float
    optimizer: str
    fine_tune_at: str | None


def plan_phases(
    *,
    epochs: int,
    fine_tune_epochs: int,
    learning_rate: float,
    fine_tune_learning_rate: float,
    optimizer: str,
    fine_tune_optimizer: str,
    fine_tune_at: str,
    fine_tune_fraction: float,
    unfreeze_stages: int,
) -> list[Phase]:
    """Returns the phases of a run in order.

    With unfreeze_stages = k > 1, phase 2's epochs are split into k stages whose first unfrozen layer
    moves from the top of the backbone down to fine_tune_at in k even steps (gradual unfreezing, as in
    ULMFiT); fine_tune_fraction is fine_tune_at as a share of the backbone's layers, for the stages before
    the last (which uses fine_tune_at itself).
    """
    if unfreeze_stages < 1:
        raise ValueError(f"--unfreeze_stages {unfreeze_stages} must be at least 1")
    phases = []
    if epochs > 0:
        phases.append(Phase("phase1", 0, epochs, learning_rate, optimizer, None))
    if fine_tune_epochs <= 0:
        return phases
    stages = min(unfreeze_stages, fine_tune_epochs)
    if stages == 1:
        return phases + [Phase("phase2", epochs, epochs + fine_tune_epochs, fine_tune_learning_rate, fine_tune_optimizer, fine_tune_at)]
    first_epoch = epochs
    for stage in range(1, stages + 1):
        last_epoch = epochs + round(fine_tune_epochs * stage / stages)
        start = fine_tune_at if stage == stages else f"{1 - (1 - fine_tune_fraction) * stage / stages:.4f}"
        name = "phase2" if stage == 1 else f"phase2-stage{stage}"
        phases.append(Phase(name, first_epoch, last_epoch, fine_tune_learning_rate, fine_tune_optimizer, start))
        first_epoch = last_epoch
    return phases


def has_checkpoint(model_dir: str, phase: Phase) -> bool:
    return tf.train.latest_checkpoint(tf.io.gfile.join(model_dir, loop.CHECKPOINT_DIR, phase.name)) is not None


def run_phases(
    *,
    phases: list[Phase],
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    model_dir: str,
    make_dataset,
    batch_size: int,
    steps_per_epoch: int,
    num_train_examples: int,
    precision: str,
    lr_schedule: str,
    warmup_fraction: float,
    weight_decay: float,
    loss_function,
    cache_features: bool,
    feature_views: int,
    augmented: bool,
    seed: int,
    profile_steps: tuple[int, int] | None,
    after_phase,
    loop_arguments: dict,
) -> None:
    """Trains the phases in order, each from its latest checkpoint, skipping those a later one replaces.

    Args:
        phases: from plan_phases.
        model: the classifier, built in strategy.scope().
        make_dataset: make_dataset(split, training, **overrides) -> distributed image dataset.
        cache_features: run phase 1 on cached backbone features (see features.py).
        feature_views: augmented views per image cached when `augmented`.
        augmented: training images are augmented (random crops, flips or layers).
        profile_steps: steps of the first phase to profile (see loop.train_phase).
        after_phase: after_phase(phase, evaluate_on) is called at the end of each phase, where
            evaluate_on(split) returns loop.evaluate's result for that split with the current weights.
        loop_arguments: the remaining keyword arguments of loop.train_phase (history, preemption, ...).
    Raises:
        loop.Preempted, FloatingPointError: as loop.train_phase.
    """
    # One evaluation function for the whole model, traced once: unfreezing layers does not change inference.
    model_evaluation_step = loop.make_evaluation_step(model=model, strategy=strategy, num_classes=model.output_shape[-1])

    def evaluate_model_on(split):
        return loop.evaluate(model_evaluation_step, make_dataset(split, False))

    backbone_phase_started = False
    for index, phase in enumerate(phases):
        if any(has_checkpoint(model_dir, later) for later in phases[index + 1:]):
            continue
        trained_model, evaluate_on = model, None
        if phase.fine_tune_at is None and cache_features and model_lib.get_backbones(model):
            feature_model, trained_model = features_lib.split_model(model)
            views = feature_views if augmented else 1
            train_dataset, validation_dataset, evaluate_on = cached_feature_datasets(
                feature_model=feature_model, strategy=strategy, make_dataset=make_dataset, batch_size=batch_size,
                num_train_examples=num_train_examples, views=views, augmented=augmented, seed=seed,
                evaluation_step=loop.make_evaluation_step(
                    model=trained_model, strategy=strategy, num_classes=model.output_shape[-1]
                ),
            )
        else:
            train_dataset, validation_dataset = make_dataset("train", True), make_dataset("validation", False)
        if phase.fine_tune_at is not None:
            with strategy.scope():
                frozen = model_lib.unfreeze_backbone(model, phase.fine_tune_at)
            if not backbone_phase_started:
                logging.info("%s: backbone unfrozen from --fine_tune_at=%s, %d layers left frozen below "
                             "(BatchNormalization stays frozen)", phase.name, phase.fine_tune_at, frozen)
            backbone_phase_started = True
        total_steps = (phase.last_epoch - phase.first_epoch) * steps_per_epoch
        with strategy.scope():
            # A fresh optimizer per phase, for its own set of trainable weights and its own schedule.
            learning_rate = recipe.make_learning_rate(
                schedule=lr_schedule, learning_rate=phase.learning_rate, total_steps=total_steps,
                warmup_steps=int(round(warmup_fraction * total_steps)),
            )
            optimizer = recipe.make_optimizer(
                name=phase.optimizer, learning_rate=learning_rate, weight_decay=weight_decay,
                precision=precision, model=trained_model,
            )
        loop.train_phase(
            phase=phase.name, model=trained_model, weights_model=model, optimizer=optimizer,
            strategy=strategy, model_dir=model_dir, train_dataset=train_dataset,
            validation_dataset=validation_dataset, global_batch_size=batch_size, initial_epoch=phase.first_epoch,
            epochs=phase.last_epoch, steps_per_epoch=steps_per_epoch, loss_function=loss_function,
            profile_steps=profile_steps if index == 0 else None, **loop_arguments,
        )
        after_phase(phase, evaluate_on or evaluate_model_on)


def cached_feature_datasets(
    *, feature_model, strategy, make_dataset, batch_size, num_train_examples, views, augmented, seed, evaluation_step
):
    """Computes phase 1's features; returns (train dataset, validation dataset, evaluate_on(split))."""
    train_features, train_labels = features_lib.training_features(
        feature_model=feature_model, strategy=strategy, dataset=make_dataset("train", True),
        num_examples=num_train_examples, batch_size=batch_size, views=views, training=augmented,
    )
    evaluation_arrays = {}

    def evaluation_dataset(split):
        if split not in evaluation_arrays:
            evaluation_arrays[split] = features_lib.compute_features(
                feature_model=feature_model, strategy=strategy, dataset=make_dataset(split, False),
                num_batches=None, training=False,
            )
        return strategy.distribute_datasets_from_function(lambda context: features_lib.make_feature_dataset(
            arrays=evaluation_arrays[split], batch_size=batch_size, training=False, seed=seed, input_context=context,
        ))

    train_dataset = strategy.distribute_datasets_from_function(lambda context: features_lib.make_feature_dataset(
        arrays=(train_features, train_labels), batch_size=batch_size, training=True, seed=seed, input_context=context,
    ))

    def evaluate_on(split):
        return loop.evaluate(evaluation_step, evaluation_dataset(split))

    return train_dataset, evaluation_dataset("validation"), evaluate_on


def restore_best_weights(*, model: keras.Model, model_dir: str, history: loop.History) -> dict | None:
    """Restores the weights of the best validation accuracy when the last epoch was worse.

    Returns the best history entry when weights were restored, else None. Logs a warning naming the
    likely cause: phase 2 is where transfer learning classically goes wrong.
    """
    if not history.epochs:
        return None
    best = max(history.epochs, key=lambda entry: entry["val_accuracy"])
    last = history.epochs[-1]
    path = tf.io.gfile.join(model_dir, loop.CHECKPOINT_DIR, loop.BEST_WEIGHTS)
    if last["val_accuracy"] >= best["val_accuracy"] or not tf.io.gfile.exists(path):
        return None
    if best["phase"] == "phase1" and last["phase"] != "phase1":
        cause = (
            "fine-tuning made it worse than the frozen backbone: --fine_tune_learning_rate is likely too high, "
            "or --fine_tune_at unfreezes too many layers for this much data"
        )
    else:
        cause = "the later epochs overfit or the rate was too high: try fewer epochs or --early_stopping_patience"
    logging.warning(
        "validation accuracy ended at %.4f (epoch %d, %s), below its best %.4f (epoch %d, %s): %s. "
        "Restored the best weights.",
        last["val_accuracy"], last["epoch"], last["phase"], best["val_accuracy"], best["epoch"], best["phase"], cause,
    )
    model.load_weights(path)
    return best
