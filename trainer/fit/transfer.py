"""Two-phase transfer learning: which phases run, and what each one trains on.

    phase1            backbone frozen, new head; on cached backbone features when possible (features.py)
    phase2            backbone unfrozen from --fine_tune_at (BatchNormalization stays frozen), lower rate;
    phase2-stage2...  with --unfreeze_stages > 1, phase 2 unfreezes gradually: each stage goes deeper,
                      each with a fresh optimizer and its own warmup + decay
    baseline_cnn      the from-scratch reference model: one phase of epochs + fine_tune_epochs epochs

trainer/run/run.py runs them in order (checkpoints.py: a rerun skips the phases a later checkpoint replaces).
"""

import dataclasses
import time

import keras
import numpy as np
from absl import logging

from trainer.fit import activations as activations_lib
from trainer.fit import checkpoints
from trainer.fit import features as features_lib
from trainer.fit import lite_pass
from trainer.fit import recipe
from trainer.fit import steps
from trainer.models import classifier


@dataclasses.dataclass(frozen=True)
class PhaseSchedule:
    """How long each phase trains and how fast (the flags of the same names).

    epochs: phase-1 epochs (head only). fine_tune_epochs: phase-2 epochs; 0 skips phase 2.
    learning_rate: phase-1 peak rate. fine_tune_learning_rate: phase 2's; None = learning_rate / 10.
    optimizer: phase 1's. fine_tune_optimizer: phase 2's; "" = the same as optimizer.
    fine_tune_at: first unfrozen backbone layer: an index, a fraction of the layers, or a layer name.
    unfreeze_stages: phase 2 in this many stages, unfreezing from the top down to fine_tune_at.
    cache_features: phase 1 on cached backbone features (features.py). feature_views: augmented views
        per image cached when training images are augmented. feature_cache: features.CacheBudget, where
        they are kept (in memory, or spilled to files past its budget).
    phase2_cache: phase 2 on cached activations at the cut (activations.py): "auto", "always" or "never".
    frozen_pass_engine: what runs phase 1's frozen pass (lite_pass.py): "auto", "keras" or "litert".
    learning_rate_scaling: "linear" multiplies both rates by batch_size / base_batch_size; "none" not.
    """

    epochs: int = 10
    fine_tune_epochs: int = 3
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float | None = None
    optimizer: str = "adam"
    fine_tune_optimizer: str = ""
    fine_tune_at: str = "0.7"
    unfreeze_stages: int = 1
    cache_features: bool = True
    feature_views: int = 2
    feature_cache: features_lib.CacheBudget = features_lib.CacheBudget()
    phase2_cache: str = "auto"
    frozen_pass_engine: str = "auto"
    learning_rate_scaling: str = "none"
    base_batch_size: int = 32

    def __post_init__(self):
        if self.epochs < 0 or self.fine_tune_epochs < 0:
            raise ValueError(f"--epochs {self.epochs} and --fine_tune_epochs {self.fine_tune_epochs} must be >= 0")
        for flag, name in (("optimizer", self.optimizer), ("fine_tune_optimizer", self.fine_tune_optimizer or "adam")):
            if name not in recipe.OPTIMIZERS:
                raise ValueError(f"--{flag} {name!r} is not one of {recipe.OPTIMIZERS}")
        if self.phase2_cache not in activations_lib.MODES:
            raise ValueError(f"--phase2_cache {self.phase2_cache!r} is not one of {activations_lib.MODES}")
        if self.frozen_pass_engine not in lite_pass.MODES:
            raise ValueError(f"--frozen_pass_engine {self.frozen_pass_engine!r} is not one of {lite_pass.MODES}")
        if self.feature_views < 1 or self.unfreeze_stages < 1:
            raise ValueError("--feature_views and --unfreeze_stages must be at least 1")
        if self.learning_rate_scaling not in ("none", "linear") or self.base_batch_size < 1:
            raise ValueError(
                f"--learning_rate_scaling {self.learning_rate_scaling!r} must be none or linear, "
                f"--base_batch_size {self.base_batch_size} at least 1"
            )

    def learning_rates(self, batch_size: int) -> tuple[float, float]:
        """(phase 1's, phase 2's) peak learning rates at this global batch size."""
        scale = batch_size / self.base_batch_size if self.learning_rate_scaling == "linear" else 1.0
        fine_tune = self.fine_tune_learning_rate or self.learning_rate / 10
        return self.learning_rate * scale, fine_tune * scale


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


def plan_phases(schedule: PhaseSchedule, *, batch_size: int, model: keras.Model) -> list[Phase]:
    """Returns the phases of a run in order.

    With unfreeze_stages = k > 1, phase 2's epochs are split into k stages whose first unfrozen layer
    moves from the top of the backbone down to fine_tune_at in k even steps (gradual unfreezing, as in
    ULMFiT). A model without a backbone (the baseline CNN) trains whole in one phase of the same budget.

    Raises:
        ValueError: --fine_tune_at names no layer of a backbone (checked now, not after phase 1).
    """
    learning_rate, fine_tune_learning_rate = schedule.learning_rates(batch_size)
    backbones = classifier.get_backbones(model)
    if not backbones:
        total = schedule.epochs + schedule.fine_tune_epochs
        return [Phase(classifier.BASELINE_CNN_NAME, 0, total, learning_rate, schedule.optimizer, None)]
    # The shallowest cut over the ensemble's members, as a share of the layers, for the stages before the last.
    fine_tune_fraction = min(
        classifier.resolve_fine_tune_at(member, schedule.fine_tune_at) / len(member.layers) for member in backbones
    )
    epochs, fine_tune_epochs = schedule.epochs, schedule.fine_tune_epochs
    optimizer = schedule.fine_tune_optimizer or schedule.optimizer
    phases = []
    if epochs > 0:
        phases.append(Phase("phase1", 0, epochs, learning_rate, schedule.optimizer, None))
    if fine_tune_epochs <= 0:
        return phases
    stages = min(schedule.unfreeze_stages, fine_tune_epochs)
    first_epoch = epochs
    for stage in range(1, stages + 1):
        last_epoch = epochs + round(fine_tune_epochs * stage / stages)
        start = schedule.fine_tune_at if stage == stages else f"{1 - (1 - fine_tune_fraction) * stage / stages:.4f}"
        name = "phase2" if stage == 1 else f"phase2-stage{stage}"
        phases.append(Phase(name, first_epoch, last_epoch, fine_tune_learning_rate, optimizer, start))
        first_epoch = last_epoch
    return phases


def replaced_by_later_checkpoint(model_dir: str, phases: list[Phase], index: int) -> bool:
    """True when a later phase has a checkpoint: it holds the whole model, so phase `index` is done."""
    return any(checkpoints.has_checkpoint(model_dir, later.name) for later in phases[index + 1:])


def unfreeze(model: keras.Model, phase: Phase, *, strategy) -> None:
    """Unfreezes the backbone for a fine-tuning phase, in strategy.scope()."""
    with strategy.scope():
        frozen = classifier.unfreeze_backbone(model, phase.fine_tune_at)
    logging.info("%s: backbone unfrozen from layer %s, %d layers left frozen below "
                 "(BatchNormalization stays frozen)", phase.name, phase.fine_tune_at, frozen)





@dataclasses.dataclass
class PhaseData:
    """What one phase trains and on what.

    model: the trained model (the whole classifier, its head on cached features, or its top on cached activations).
    train_dataset: distributed, endless (images or features, labels) batches.
    validation_dataset: distributed, one pass of (inputs, labels, weights) batches.
    evaluation_step: steps.make_evaluation_step of `model`.
    finish(): called once the phase is trained (removes spilled feature files).
    checkpoint_model: what the phase's checkpoints hold; None: `model`. Phase 2 on cached activations checkpoints
        the whole classifier, so a rerun may resume it either way (cached or not).
    pass_model: the feature model phase 1's pass ran (its traced step is reused by the data-quality report).
    """

    model: keras.Model
    train_dataset: object
    validation_dataset: object
    evaluation_step: object
    finish: object = lambda: None
    checkpoint_model: keras.Model | None = None
    pass_model: keras.Model | None = None


def phase_data(phase: Phase, *, model: keras.Model, evaluation_step, splits, schedule: PhaseSchedule,
               augmented: bool, seed, collector=None, activations: activations_lib.ActivationCache | None = None,
               frozen_pass: lite_pass.Decision | None = None, on_augmented_sample=None) -> PhaseData:
    """The whole model on images, (phase 1 with --cache_features) its head on cached backbone features, or
    (phase 2 given an activation cache) its top on cached activations at the cut.

    Args:
        evaluation_step: the whole model's steps.make_evaluation_step, traced once for the run:
            unfreezing layers does not change inference.
        splits: the run's data.DistributedSplits.
        augmented: training images are augmented (random crops, flips or layers): then
            schedule.feature_views views per image are cached, else one.
        collector: the data-quality report's collector (quality.Collector), given when this process sees every
            image: the train and validation passes also hand it each image's unaugmented features and thumbnail
            (cached_feature_data), so the report needs no backbone pass of its own over them.
        activations: phase 2's cache (activations.plan chose a cut), or None. Phase 1's feature pass fills it;
            a phase 2 that finds it empty (phase 1 ran before a restart, or not on cached features) fills it first.
        frozen_pass: which engine runs phase 1's pass (lite_pass.plan); None: Keras.
        on_augmented_sample: called with the first batch of augmented training images phase 1's pass decodes (as
            the pipeline gives them), when it decodes any; the caller sees whether it was.
    """
    views = schedule.feature_views if augmented else 1
    if phase.fine_tune_at is None and schedule.cache_features and classifier.get_backbones(model):
        return cached_feature_data(
            model=model, splits=splits, views=views, augmented=augmented, seed=seed,
            budget=schedule.feature_cache, collector=collector, activations=activations, frozen_pass=frozen_pass,
            on_augmented_sample=on_augmented_sample,
        )
    if phase.fine_tune_at is not None and activations is not None:
        return cached_activation_data(model=model, splits=splits, views=views, augmented=augmented, seed=seed,
                                      budget=schedule.feature_cache, activations=activations)
    return PhaseData(
        model=model,
        train_dataset=splits.images("train", training=True),
        validation_dataset=splits.images("validation", training=False),
        evaluation_step=evaluation_step,
    )


def cached_feature_data(
    *, model, splits, views: int, augmented: bool, seed, budget: features_lib.CacheBudget, collector=None,
    activations: activations_lib.ActivationCache | None = None, frozen_pass: lite_pass.Decision | None = None,
    on_augmented_sample=None,
) -> PhaseData:
    """Computes phase 1's features once; the head then trains on them (features.py).

    With a collector, one of each training image's `views` is its unaugmented evaluation view (central crop,
    no flip), computed in order over the split with its thumbnail, which the collector also gets; the other
    views are augmented as usual. Without augmentation that one view is all phase 1 trains on.
    With an activation cache, the same pass also fills it with the cut activations of the same views.
    frozen_pass: the engine of the pass (lite_pass.plan): with LiteRT, its frozen part runs converted.
    """
    head = features_lib.split_model(model)[1]
    # With an activation cache, the same pass emits the cut activations as a second output.
    feature_model = lite_pass.pass_model(
        model, cut=activations.cut if activations is not None else None,
        decision=frozen_pass or lite_pass.Decision("keras", ""),
        batch_size=splits.batch_size // splits.strategy.num_replicas_in_sync,
    )
    width = head.input.shape[-1]
    train_features, train_activations = _cached_pass(
        feature_model, splits, views=views, augmented=augmented, budget=budget, collector=collector, width=width,
        second_shape=activations.cut.shape if activations is not None else None,
        on_augmented_sample=on_augmented_sample,
    )
    try:
        validation_features, validation_activations = _cached_pass(
            feature_model, splits, views=1, augmented=False, budget=budget, collector=collector, width=width,
            second_shape=activations.cut.shape if activations is not None else None, split="validation",
        )
    except BaseException:
        for cached in (train_features, train_activations):
            if cached is not None:
                cached.delete()
        raise
    if activations is not None:
        activations.fill(train_activations, validation_activations, views=views)
        _log_activations(activations)

    def delete_spilled():
        for cached in (train_features, validation_features):
            cached.delete()

    return PhaseData(
        model=head,
        train_dataset=_cached_dataset(splits, train_features, training=True, seed=seed),
        validation_dataset=_cached_dataset(splits, validation_features, training=False, seed=seed),
        evaluation_step=steps.make_evaluation_step(model=head, strategy=splits.strategy),
        finish=delete_spilled,
        pass_model=feature_model,
    )


def cached_activation_data(*, model, splits, views: int, augmented: bool, seed, budget: features_lib.CacheBudget,
                           activations: activations_lib.ActivationCache) -> PhaseData:
    """Phase 2's top trains on the cut activations (activations.py), computed first if phase 1's pass did not."""
    cut_models = activations_lib.split_at_cut(model, activations.cut)
    if not activations.filled:
        started = time.perf_counter()
        width = int(np.prod(activations.cut.shape))
        train, _ = _cached_pass(cut_models.bottom, splits, views=views, augmented=augmented, budget=budget, width=width,
                                shape=activations.cut.shape)
        try:
            validation, _ = _cached_pass(cut_models.bottom, splits, views=1, augmented=False, budget=budget,
                                         width=width, shape=activations.cut.shape, split="validation")
        except BaseException:
            train.delete()
            raise
        activations.fill(train, validation, views=views, seconds=time.perf_counter() - started)
        _log_activations(activations)

    return PhaseData(
        model=cut_models.top,
        train_dataset=_cached_dataset(splits, activations.train, training=True, seed=seed),
        validation_dataset=_cached_dataset(splits, activations.validation, training=False, seed=seed),
        evaluation_step=steps.make_evaluation_step(model=cut_models.top, strategy=splits.strategy),
        checkpoint_model=model,
    )


def _cached_dataset(splits, cached: features_lib.CachedFeatures, *, training: bool, seed):
    """A cache as a distributed dataset: endless shuffled (rows, labels) batches, or one pass with weights."""
    return splits.strategy.distribute_datasets_from_function(lambda context: features_lib.make_feature_dataset(
        cached=cached, batch_size=splits.batch_size, training=training, seed=seed, input_context=context,
    ))


def _cached_pass(feature_model, splits, *, views: int, augmented: bool, budget: features_lib.CacheBudget, width: int,
                 collector=None, split: str = "train", shape: tuple = (), second_shape: tuple | None = None,
                 on_augmented_sample=None):
    """One split through the feature model into caches: (first output's, second output's or None).

    train: `views` rows per image (one of them the unaugmented evaluation view when there is a collector, in order,
    handed to it too); validation: one evaluation pass, padded to whole global batches (data.make_dataset).
    shape: of the first output's rows as the model takes them; second_shape: of the second output's (pass_model's
    activations), None when the feature model has one output.
    """
    strategy, batch_size = splits.strategy, splits.batch_size
    num_examples = splits.manifest["splits"][split]["num_examples"]
    started = time.perf_counter()
    if split == "train":
        augmented_views = views - (collector is not None)
        augmented_batches = max(1, augmented_views * num_examples // batch_size) if augmented_views else 0
        rows = num_examples * (collector is not None) + augmented_batches * batch_size
    else:
        augmented_batches, rows = 0, -(-num_examples // batch_size) * batch_size
    kind = "phase1_features" if not shape else "phase2_activations"
    writers = [budget.writer(rows=rows, width=width, kind=kind)]
    if second_shape:
        writers.append(budget.writer(rows=rows, width=int(np.prod(second_shape)), kind="phase2_activations"))
    writer, second_writer = writers[0], writers[1] if second_shape else None
    try:
        if collector is not None or split != "train":  # the evaluation views, in order
            features_lib.compute_features(
                feature_model=feature_model, strategy=strategy,
                dataset=splits.images(split, training=False, thumbnail_side=collector.thumbnail_side if collector else 0),
                num_batches=-(-num_examples // batch_size), training=False, writer=writer, second_writer=second_writer,
                collect=collector.add_function(split) if collector else None, drop_padding=split == "train",
            )
        if augmented_batches:
            features_lib.compute_features(
                feature_model=feature_model, strategy=strategy, dataset=splits.images("train", training=True),
                num_batches=augmented_batches, training=augmented, writer=writer, second_writer=second_writer,
                on_first_batch=on_augmented_sample if augmented else None,
            )
        finished = [each.finish() for each in writers]
    except BaseException:  # a full disk, an interrupt: nothing half-written stays behind
        for each in writers:
            each.delete()
        raise
    first, second = finished[0], finished[1] if second_shape else None
    for cached, row_shape in ((first, shape), (second, second_shape)):
        if cached is not None:
            cached.shape = tuple(row_shape or ())
            cached.shuffle_rows = budget.shuffle_rows(cached.width)
    if not shape:
        training = split == "train"
        features_lib.log_cached("training" if training else split, first, views=views if training else 1,
                                seconds=time.perf_counter() - started, budget=budget)
    return first, second


def _log_activations(activations: activations_lib.ActivationCache) -> None:
    cut = activations.cut
    for name, cached in (("training", activations.train), ("validation", activations.validation)):
        logging.info(
            "phase2: cached %d %s activations at layer %s (%s, %.0f KiB each%s), %.0f MiB%s", cached.count, name,
            cut.layer, "x".join(map(str, cut.shape)), cut.bytes_per_image / 1024,
            f", {activations.views} view(s) per image" if name == "training" else "", cached.nbytes / 2**20,
            f", spilled to {len(cached.paths)} file(s) in {cached.folder}" if cached.paths else " in memory",
        )
