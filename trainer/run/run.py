"""One training run, top to bottom: datasets -> model -> phases -> best weights -> evaluate -> export.

`trainer/train.py` (the entry point) reads the flags into a RunOptions and calls train_and_evaluate,
which calls loop.train_phase once per phase: two hops from main to the epoch loop. Each stage's options
are its own module's small frozen dataclass (data.PipelineOptions, model.ModelSpec, ...).
"""

# The options' fields are named after their modules (recipe: recipe.Recipe): annotations stay unevaluated.
from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import keras
import tensorflow as tf
from absl import logging

from tfrecords import schema
from trainer.exports import export
from trainer.fit import activations as activations_lib
from trainer.fit import checkpoints
from trainer.fit import distribute
from trainer.fit import lite_pass
from trainer.fit import loop
from trainer.fit import recipe
from trainer.fit import run_dir
from trainer.fit import steps
from trainer.fit import transfer
from trainer.input import data
from trainer.models import classifier
from trainer.reports import evaluation
from trainer.reports import export_accuracy
from trainer.reports import model_card
from trainer.reports import quality
from trainer.reports import training_log

METRICS_FILE = "metrics.json"
SAMPLE_IMAGES = 8  # augmented training images shown in TensorBoard
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Everything one run needs, each stage's part in its own options (built by train.py from the flags).

    data_dir, model_dir: the converted data and the run folder (local or gs://).
    batch_size: global batch size, divided across replicas.
    precision: the Keras dtype policy (mixed_float16 for GPUs, mixed_bfloat16 for TPUs).
    seed: seed of weights initialisation, shuffling and augmentation.
    """

    data_dir: str
    model_dir: str
    # A factory: the default backbone's ImageNet weights are checked for when a spec is made, not at import.
    model: classifier.ModelSpec = dataclasses.field(default_factory=classifier.ModelSpec)
    pipeline: data.PipelineOptions = data.PipelineOptions()
    augmentation: data.LayerAugmentation = data.LayerAugmentation()
    schedule: transfer.PhaseSchedule = transfer.PhaseSchedule()
    recipe: recipe.Recipe = recipe.Recipe()
    loop: loop.LoopOptions = loop.LoopOptions()
    export: export.ExportOptions = export.ExportOptions()
    # None: no data-quality report (--nodata_quality).
    quality: quality.QualityOptions | None = quality.QualityOptions()
    batch_size: int = 32
    precision: str = "float32"
    seed: int = 42

    def __post_init__(self):
        if not self.data_dir or not self.model_dir:
            raise ValueError("--data_dir and --model_dir are required")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size {self.batch_size} must be at least 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r} is not one of {PRECISIONS}")

    @property
    def augmented(self) -> bool:
        """Training images are augmented (random crops, flips or layers)."""
        return self.pipeline.augments or self.augmentation.any()

    def hyperparameters(self) -> dict:
        """Every scalar setting of the run's stages, as TensorBoard's HParams dashboard takes them.

        Named <stage>.<field> (model.backbone, schedule.learning_rate, ...), plus batch_size, precision
        and seed; a None becomes "default" (HParams takes only bool, int, float and str).
        """
        values = {"batch_size": self.batch_size, "precision": self.precision, "seed": self.seed}
        for field in dataclasses.fields(self):
            stage = getattr(self, field.name)
            if not dataclasses.is_dataclass(stage):
                continue
            for stage_field in dataclasses.fields(stage):
                value = getattr(stage, stage_field.name)
                if value is None:
                    value = "default"
                if isinstance(value, (bool, int, float, str)):
                    values[f"{field.name}.{stage_field.name}"] = value
        return values

    def identity(self, manifest: dict) -> dict:
        """What defines this run's model (run_dir.check_identity): a rerun into the same --model_dir must match it."""
        # Layers on the device are part of the model and its checkpoints (with their random-seed state).
        on_device = self.augmentation.on == "device"
        return {
            "classes": manifest["classes"],
            "data_fingerprint": run_dir.manifest_fingerprint(manifest),
            "backbone": self.model.backbone,
            "backbone_layer": self.model.backbone_layer,
            "weights": self.model.weights,
            "preprocess": self.model.preprocess_modes,
            "image_size": self.model.image_size,
            "dropout": self.model.dropout,
            "augmentation_in_model": {name: value for name, value in self.augmentation.factors().items()
                                      if on_device and value},
            "baseline_cnn": self.model.baseline_cnn,
        }


@dataclasses.dataclass
class _Run:
    """What the stages of one run share once it is set up (train_and_evaluate's own state)."""

    options: RunOptions
    strategy: tf.distribute.Strategy
    manifest: dict
    stopwatch: training_log.Stopwatch
    lock: run_dir.Lock | None
    splits: data.DistributedSplits
    model: keras.Model
    loop_options: loop.LoopOptions
    evaluation_step: object
    phases: list
    phase2_cache: activations_lib.Decision
    activations: activations_lib.ActivationCache | None
    frozen_pass: lite_pass.Decision  # which engine runs phase 1's pass (lite_pass.plan)
    report_pending: bool  # the data-quality report is still to be written (by this worker, the chief)
    device_augmentation: object  # the model's augmentation layers (augment_on=device), or None
    sample_pending: bool  # TensorBoard's augmented training images are still to be written (the chief, augmented)
    shares_phase1: bool  # ... from phase 1's feature pass (shares_phase1_pass)
    frozen_pass_ran: dict = dataclasses.field(default_factory=dict)  # lite_pass.describe of phase 1's pass, once run

    @property
    def chief(self) -> bool:
        return distribute.is_chief(self.strategy)

    def check_lock(self) -> None:
        """Raises run_dir.LockLost when another run took the model_dir over (before each of the run's writes)."""
        if self.lock is not None:
            self.lock.check()


def train_and_evaluate(
    options: RunOptions, *, strategy: tf.distribute.Strategy, manifest: dict,
    stopwatch: training_log.Stopwatch | None = None, lock: run_dir.Lock | None = None,
) -> dict:
    """Trains the phases, restores the best weights, evaluates, exports; returns what metrics.json holds.

    stopwatch: times the stages (metrics.json "time_seconds"); started with the program by train.py.
    lock: the chief's run_dir.Lock, checked before the run's writes (checkpoints, history, export, metrics); None:
        not checked (other workers, tests).

    Raises:
        checkpoints.Preempted: a SIGTERM stopped training after saving a checkpoint.
        FloatingPointError: the training loss stopped being finite.
        run_dir.LockLost: another run took the model_dir over (this one was paused); nothing more was written.
    """
    run = _set_up(options, strategy=strategy, manifest=manifest, stopwatch=stopwatch or training_log.Stopwatch(),
                  lock=lock)
    if run.report_pending and not run.shares_phase1:  # the report makes a pass of its own, now
        with run.stopwatch.stage("data-quality report"):
            collector = quality.Collector.for_model(run.model, manifest=manifest, max_images=options.quality.max_images)
            write_quality_report(run.options, model=run.model, manifest=manifest, splits=run.splits, collector=collector)
    reporter = training_log.EpochReporter(
        model_dir=options.model_dir, chief=run.chief,
        class_names=manifest["classes"] if run.loop_options.confusion_matrix_images else None,
    )
    phase_results = _train_phases(run, reporter=reporter, shares_phase1=run.shares_phase1)
    return _evaluate_and_export(run, phase_results=phase_results, history=reporter.history.epochs)


def _set_up(options: RunOptions, *, strategy, manifest: dict, stopwatch, lock) -> _Run:
    """Seeds, precision, the datasets, the model (with its on-device augmentation) and the phases."""
    # Spilled caches go to a folder of this model_dir and worker: what a killed run left there goes first.
    budget = options.schedule.feature_cache.owned_by(options.model_dir, worker=distribute.worker_name(strategy))
    removed = budget.remove_stale()
    if removed:
        logging.warning("removed %.0f MiB of cached features that an earlier run of this --model_dir left in %s "
                        "(it was stopped before it could delete them)", removed / 2**20, budget.spill_parent)
    options = dataclasses.replace(options, pipeline=options.pipeline.for_host(strategy),
                                  schedule=dataclasses.replace(options.schedule, feature_cache=budget))
    keras.utils.set_random_seed(options.seed)
    keras.mixed_precision.set_global_policy(options.precision)
    loop_options = dataclasses.replace(options.loop, steps_per_epoch=options.loop.steps_per_epoch or max(
        1, manifest["splits"]["train"]["num_examples"] // options.batch_size))
    splits = data.DistributedSplits(
        strategy=strategy, data_dir=options.data_dir, manifest=manifest, image_size=options.model.image_size,
        batch_size=options.batch_size, options=options.pipeline,
        augmentation=options.augmentation.make_layers(on="host", seed=options.seed),
    )
    with strategy.scope():
        device_augmentation = options.augmentation.make_layers(on="device", seed=options.seed)
        model = classifier.build_model(options.model, num_classes=len(manifest["classes"]),
                                       augmentation=device_augmentation)
    phases = transfer.plan_phases(options.schedule, batch_size=options.batch_size, model=model)  # checks --fine_tune_at
    # The data-quality report, once per model_dir (a resumed run's backbone may be fine-tuned by now), before
    # any training: a backbone fine-tuned on the labels would learn the wrong ones too and hide them. It shares
    # phase 1's feature pass when that pass runs here and sees every image; else it makes a pass of its own.
    report_pending = bool(distribute.is_chief(strategy) and options.quality and classifier.get_backbones(model)
                          and not tf.io.gfile.exists(tf.io.gfile.join(options.model_dir, quality.QUALITY_JSON)))
    shares_phase1 = report_pending and shares_phase1_pass(options, phases=phases, strategy=strategy)
    decision = plan_phase2_cache(options, model=model, manifest=manifest, phases=phases, shares_phase1=shares_phase1)
    frozen_pass = plan_frozen_pass(options, model=model, manifest=manifest, strategy=strategy, phases=phases,
                                   shares_phase1=shares_phase1)
    return _Run(
        options=options, strategy=strategy, manifest=manifest, stopwatch=stopwatch, lock=lock, splits=splits,
        model=model, loop_options=loop_options,
        evaluation_step=steps.make_evaluation_step(model=model, strategy=strategy),  # traced once per run
        phases=phases, phase2_cache=decision,
        activations=activations_lib.ActivationCache(decision.cut) if decision.cut else None, frozen_pass=frozen_pass,
        report_pending=report_pending, shares_phase1=shares_phase1, device_augmentation=device_augmentation,
        # Once per model_dir: a resumed run (its first phase has a checkpoint) wrote its sample before.
        sample_pending=(distribute.is_chief(strategy) and options.augmented
                        and not (phases and checkpoints.epochs_done(options.model_dir, phases[0].name))),
    )


def plan_phase2_cache(options: RunOptions, *, model: keras.Model, manifest: dict, phases: list,
                      shares_phase1: bool = False) -> activations_lib.Decision:
    """Whether phase 2 trains on cached activations at the cut (activations.plan), said in one line of the log.

    Not when every fine-tuning phase has already finished (a rerun): nothing would read the cache.
    shares_phase1: the data-quality report takes its features from phase 1's pass (then one of the views cached
    per training image is the unaugmented one).
    """
    fine_tuning = [phase for phase in phases if phase.fine_tune_at is not None]
    if fine_tuning and all(checkpoints.epochs_done(options.model_dir, phase.name) >= phase.last_epoch
                           for phase in fine_tuning):
        return activations_lib.Decision(None, "phase 2 already finished")
    views = options.schedule.feature_views if options.augmented else 1
    decision = activations_lib.plan(
        model, mode=options.schedule.phase2_cache, fine_tune_at=fine_tuning[-1].fine_tune_at if fine_tuning else None,
        image_size=options.model.image_size, rows=manifest["splits"]["train"]["num_examples"] * views,
        budget=options.schedule.feature_cache, unaugmented_only=options.augmented and views == 1 and shares_phase1,
    )
    if fine_tuning:
        where = (f"on cached activations at layer {decision.cut.layer} ({'x'.join(map(str, decision.cut.shape))}, "
                 f"{decision.cut.bytes_per_image / 1024:.0f} KiB per image)" if decision.cut else "on images")
        mode = f"--phase2_cache={options.schedule.phase2_cache}"
        line = f"phase2 trains {where}: {decision.reason}" + ("" if decision.reason.startswith(mode) else f" ({mode})")
        # Forced against auto's judgement: said as a warning.
        (logging.warning if "auto would not cache" in decision.reason else logging.info)("%s", line)
    return decision


def plan_frozen_pass(options: RunOptions, *, model: keras.Model, manifest: dict, strategy: tf.distribute.Strategy,
                     phases: list, shares_phase1: bool) -> lite_pass.Decision:
    """Which engine runs phase 1's frozen pass (lite_pass.plan), from the images and views that pass sees: the
    training views, the validation images, and the test images when the data-quality report shares it. Said in
    the log when that pass will run (not on a rerun past phase 1); a forced litert that has no pass, warned."""
    counts = {split: manifest["splits"].get(split, {}).get("num_examples", 0) for split in ("train", "validation")}
    views = counts["train"] * (options.schedule.feature_views if options.augmented else 1) + counts["validation"]
    if shares_phase1:
        views += sum(manifest["splits"][split]["num_examples"] for split in manifest["splits"]
                     if split not in ("train", "validation"))
    decision = lite_pass.plan(options.schedule.frozen_pass_engine, model=model, strategy=strategy, views=views,
                              image_size=options.model.image_size)
    pass_runs = (options.schedule.cache_features and bool(classifier.get_backbones(model)) and bool(phases)
                 and phases[0].fine_tune_at is None
                 and not transfer.replaced_by_later_checkpoint(options.model_dir, phases, 0))
    if pass_runs:
        engine = "LiteRT" if decision.engine == "litert" else "Keras"
        (logging.warning if "cannot run" in decision.reason else logging.info)(
            "frozen pass: %s: %s", engine, decision.reason)
    elif options.schedule.frozen_pass_engine == "litert" and not options.schedule.cache_features:
        logging.warning("--frozen_pass_engine=litert has no frozen pass to run: with --nocache_features phase 1 "
                        "trains on images (in Keras)")
    return decision


def _train_phases(run: _Run, *, reporter: training_log.EpochReporter, shares_phase1: bool) -> dict:
    """Trains each phase a rerun has not finished yet; returns each phase's last validation accuracy."""
    options, model = run.options, run.model
    loss_function = options.recipe.loss_function(run.manifest)
    # A resumed run skips finished phases: their results come from the metrics.json of the run before.
    phase_results = read_metrics(options.model_dir).get("phases", {})
    try:
        _train_each_phase(run, reporter=reporter, shares_phase1=shares_phase1, phase_results=phase_results,
                          loss_function=loss_function)
    finally:  # spilled activations are removed whatever stopped the phases (preemption, a lost lock, an error)
        if run.activations is not None:
            run.activations.delete()
    return phase_results


def _train_each_phase(run: _Run, *, reporter, shares_phase1: bool, phase_results: dict, loss_function) -> None:
    """_train_phases' loop: each phase's data (its caches), its training, its result into phase_results."""
    options, model = run.options, run.model
    with checkpoints.PreemptionWatcher() as preemption:
        for index, phase in enumerate(run.phases):
            if transfer.replaced_by_later_checkpoint(options.model_dir, run.phases, index):
                # A run killed before it wrote metrics.json: the phase's last epoch is in the history.
                earlier = loop.phase_result(phase, reporter.history.epochs)
                if phase.name not in phase_results and earlier["validation_accuracy"] is not None:
                    phase_results[phase.name] = {"validation_accuracy": earlier["validation_accuracy"]}
                continue
            if phase.fine_tune_at is not None:
                transfer.unfreeze(model, phase, strategy=run.strategy)
            started = time.perf_counter()
            collector = (quality.Collector.for_model(model, manifest=run.manifest, max_images=options.quality.max_images)
                         if shares_phase1 and index == 0 else None)
            trained = transfer.phase_data(phase, model=model, evaluation_step=run.evaluation_step, splits=run.splits,
                                          schedule=options.schedule, augmented=options.augmented, seed=options.seed,
                                          collector=collector, activations=run.activations,
                                          frozen_pass=run.frozen_pass,
                                          on_augmented_sample=lambda images: _write_sample(run, images))
            if run.sample_pending:  # phase 1's pass decoded no augmented batch: one of its own
                _write_sample(run, run.splits.sample(SAMPLE_IMAGES))
            try:
                if trained.model is not model and phase.fine_tune_at is None:
                    conversion = lite_pass.conversion_seconds(trained.pass_model)
                    if conversion:
                        run.stopwatch.add(f"{phase.name}: LiteRT conversion of the frozen pass", conversion)
                    run.stopwatch.add(f"{phase.name}: caching backbone features",
                                      time.perf_counter() - started - conversion)
                    run.frozen_pass_ran = lite_pass.describe(trained.pass_model, run.frozen_pass)
                if run.activations is not None and run.activations.seconds:  # phase 2's own pass (phase 1's did not run)
                    run.stopwatch.add(f"{phase.name}: caching activations at the cut", run.activations.seconds)
                    run.activations.seconds = 0.0
                if collector is not None:
                    with run.stopwatch.stage("data-quality report"):
                        write_quality_report(options, model=model, manifest=run.manifest, splits=run.splits,
                                             collector=collector, feature_model=trained.pass_model)
                    collector = None  # its arrays are not kept through training
                with run.stopwatch.stage(f"{phase.name}: training and validation"):
                    result = loop.train_phase(
                        phase, trained, optimizer=_optimizer(run, phase, trained.model), loss_function=loss_function,
                        global_batch_size=options.batch_size, strategy=run.strategy, model_dir=options.model_dir,
                        reporter=reporter, preemption=preemption, weights_model=model, lock=run.lock,
                        # Profiling traces steps of the first phase only.
                        options=(run.loop_options if index == 0
                                 else dataclasses.replace(run.loop_options, profile_steps=None)),
                    )
            finally:  # spilled features are removed whatever stopped the phase
                trained.finish()
            # The validation accuracy of the phase's last epoch. The evaluation split is measured once, after the
            # phases, on the weights kept: numbers per phase on it would invite choosing a phase by the split we report.
            phase_results[phase.name] = {"validation_accuracy": result["validation_accuracy"],
                                         **({"stopped_early": result["stopped_early"]} if result.get("stopped_early") else {})}
            logging.info("%s done: validation accuracy %.4f", phase.name, result["validation_accuracy"])


def _optimizer(run: _Run, phase: transfer.Phase, trained_model: keras.Model):
    """The phase's fresh optimizer (its warmup and decay over the phase's steps), made under the strategy."""
    steps_per_epoch = run.loop_options.steps_per_epoch
    with run.strategy.scope():
        return run.options.recipe.optimizer(
            name=phase.optimizer, learning_rate=phase.learning_rate, precision=run.options.precision,
            total_steps=(phase.last_epoch - phase.first_epoch) * steps_per_epoch, model=trained_model,
            ema_steps_per_epoch=steps_per_epoch if phase.fine_tune_at is not None else None,
        )


def _evaluate_and_export(run: _Run, *, phase_results: dict, history: list) -> dict:
    """The best weights on the evaluation split, the exports, metrics.json and the reports."""
    options, model, manifest, model_dir = run.options, run.model, run.manifest, run.options.model_dir
    eval_split = data.evaluation_split(manifest)
    # The evaluation report comes from this same pass where this process sees the whole split on its host.
    report = evaluation.ReportCollector(num_classes=len(manifest["classes"]), top_k=options.export.top_k) if (
        run.chief and distribute.num_workers(run.strategy) == 1
        and not isinstance(run.strategy, tf.distribute.TPUStrategy)) else None
    with run.stopwatch.stage(f"{eval_split} evaluation"):
        restored = checkpoints.restore_best_weights(model=model, model_dir=model_dir, epochs=history)
        evaluated = steps.evaluate(run.evaluation_step, run.splits.images(eval_split, training=False),
                                   strategy=run.strategy, on_batch=report.add if report else None)
    metrics = make_metrics(options, manifest=manifest, evaluated=evaluated, split=eval_split, phases=phase_results,
                           restored=restored, history=history, strategy=run.strategy)
    if run.frozen_pass_ran:
        metrics["frozen_pass"] = run.frozen_pass_ran
    metrics["phase2_cache"] = {
        "used": run.activations is not None, "reason": run.phase2_cache.reason,
        **(run.activations.describe() if run.activations is not None else {}),
    }
    logging.info("%s accuracy %.4f, loss %.4f", eval_split, metrics["accuracy"], metrics["loss"])
    # Every worker logs this; under multi_worker they must agree (the tests compare them).
    logging.info("weights fingerprint %s", weights_fingerprint(model))
    run.check_lock()
    with run.stopwatch.stage("export"):
        calibration_images = export.read_calibration_images(
            data_dir=options.data_dir, manifest=manifest, image_size=options.model.image_size,
            count=options.export.calibration_images,
        ) if run.chief and "int8" in options.export.tflite else None
        export.export_run(model=model, class_names=manifest["classes"], model_dir=model_dir, options=options.export,
                          strategy=run.strategy, calibration_images=calibration_images)
    run.check_lock()  # the export took a while: evaluation.json and metrics.json must still be this run's
    if run.chief:
        write_metrics(model_dir, metrics)
        with run.stopwatch.stage("reports (evaluation report, plots, model card)"):
            write_reports(options, model=model, manifest=manifest, metrics=metrics, collected=report)
        metrics["time_seconds"] = run.stopwatch.summary()
        write_metrics(model_dir, metrics)  # again, with the time of everything
    return metrics


def shares_phase1_pass(options: RunOptions, *, phases: list, strategy: tf.distribute.Strategy) -> bool:
    """True when phase 1 will compute cached features in this process for every image (one worker), so the
    data-quality report can take each image's unaugmented features from that pass (transfer.cached_feature_data)."""
    return (
        distribute.num_workers(strategy) == 1 and options.schedule.cache_features and bool(phases)
        and phases[0].fine_tune_at is None and not transfer.replaced_by_later_checkpoint(options.model_dir, phases, 0)
    )


def write_quality_report(options: RunOptions, *, model: keras.Model, manifest: dict, splits: data.DistributedSplits,
                         collector: quality.Collector, feature_model: keras.Model | None = None) -> None:
    """The chief's data-quality report (quality.py): embeds the splits the collector lacks, then writes it.
    feature_model: phase 1's pass model, when the collector came from that pass (its traced step is reused).

    One worker embeds them with the run's own strategy and pipelines; the chief of several (whose pipelines
    read only its share) reads every image through a pipeline of its own.
    """
    missing = collector.missing_splits()
    started = time.perf_counter()
    if missing:
        if distribute.num_workers(splits.strategy) > 1:
            splits = data.DistributedSplits(
                strategy=tf.distribute.get_strategy(), data_dir=options.data_dir, manifest=manifest,
                image_size=options.model.image_size, batch_size=options.quality.batch_size, options=options.pipeline,
            )
        quality.embed_splits(model=model, splits=splits, collector=collector, names=missing,
                             feature_model=feature_model if distribute.num_workers(splits.strategy) == 1 else None)
        logging.info("data-quality report: embedded the %s split(s) in %.1fs", ", ".join(missing),
                     time.perf_counter() - started)
    report = quality.make_report(collector=collector, data_dir=options.data_dir, manifest=manifest,
                                 options=options.quality)
    started = time.perf_counter()
    summary = quality.write_report(quality=report, output_dir=options.model_dir, data_dir=options.data_dir,
                                   manifest=manifest, image_size=options.model.image_size)
    logging.info("data-quality report: written with its PNG in %.1fs; %s", time.perf_counter() - started, summary)


def write_reports(options: RunOptions, *, model: keras.Model, manifest: dict, metrics: dict,
                  collected: evaluation.ReportCollector | None = None) -> None:
    """The chief's reports of a finished run: the evaluation report and plots, the learning curves, the
    HParams entry and MODEL_CARD.md. collected: the report collected in the run's evaluation pass; None: the
    report makes a pass of its own (several workers, each of which saw a share of the split, or a TPU)."""
    split = metrics["evaluated_split"]
    if collected is not None:
        report = evaluation.write_report(collected, split=split, data_dir=options.data_dir,
                                         class_names=manifest["classes"], output_dir=options.model_dir)
    else:
        report = evaluation.evaluate_model(
            model=model, data_dir=options.data_dir, manifest=manifest, split=split,
            image_size=options.model.image_size, batch_size=options.batch_size, class_names=manifest["classes"],
            top_k=options.export.top_k, output_dir=options.model_dir,
        )
    evaluation.write_learning_curves(options.model_dir)
    final_metrics = {f"{split}_accuracy": metrics["accuracy"], f"{split}_loss": metrics["loss"],
                     f"{split}_top_{report['top_k']}_accuracy": report["top_k_accuracy"]}
    if metrics["history"]:
        final_metrics["best_validation_accuracy"] = training_log.best_validation_accuracy(metrics["history"])
    training_log.write_hparams(model_dir=options.model_dir, hyperparameters=options.hyperparameters(),
                            final_metrics=final_metrics)
    if options.export.tflite or options.export.onnx:  # the SavedModel alone has nothing to be compared with
        rows = export_accuracy.evaluate_exports(
            model_dir=options.model_dir, data_dir=options.data_dir, manifest=manifest, split=split,
            image_size=options.model.image_size, tolerance=options.export.tolerance,
        )
        export_accuracy.add_to_report(output_dir=options.model_dir, rows=rows, report=report)
    model_card.write_model_card(model_dir=options.model_dir, manifest=manifest, metrics=metrics, evaluation=report)


def make_metrics(options: RunOptions, *, manifest, evaluated, split, phases, restored, history, strategy) -> dict:
    """What metrics.json holds: the final accuracy on `split` (with its size), per-phase results, history."""
    return {
        "evaluated_split": split,
        "num_examples": manifest["splits"][split]["num_examples"],
        "loss": evaluated["loss"],
        "accuracy": evaluated["accuracy"],
        "backbone": options.model.name,
        "image_size": options.model.image_size,
        "num_classes": len(manifest["classes"]),
        "num_replicas": strategy.num_replicas_in_sync,
        "phases": phases,
        "restored_best_weights_of_epoch": restored["epoch"] if restored else None,
        "history": history,
    }


def read_metrics(model_dir: str) -> dict:
    path = tf.io.gfile.join(model_dir, METRICS_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as file:
        return json.load(file)


def write_metrics(model_dir: str, metrics: dict) -> None:
    schema.write_text(tf.io.gfile.join(model_dir, METRICS_FILE), json.dumps(metrics, indent=2))


def weights_fingerprint(model: keras.Model) -> str:
    """A short digest of every weight's bytes: equal on all workers when they are in sync."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(keras.ops.convert_to_numpy(weight).tobytes())
    return digest.hexdigest()[:16]


def _write_sample(run: _Run, images) -> None:
    """Puts a few augmented training images in TensorBoard (step 0), so users see what the model sees: the first
    batch of phase 1's pass when it decodes augmented views (the images cost nothing more), else a sample of its
    own (data.DistributedSplits.sample: about 1 s on flowers_small). Once per run, by the chief."""
    if not run.sample_pending:
        return
    run.sample_pending = False
    images = images[:SAMPLE_IMAGES]  # a pass's batch holds more: only these are augmented and written
    if run.device_augmentation is not None:
        images = run.device_augmentation(images, training=True)
    training_log.write_image_summary(model_dir=run.options.model_dir, name="augmented_training_images", images=images)
