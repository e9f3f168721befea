"""The training recipe's parts: optimizers, learning-rate schedules, the loss, class weights.

Each phase gets a fresh optimizer whose learning rate follows its own schedule (a linear warmup, then a
cosine decay to zero, by default): the warmup keeps the first updates of a new head, or of newly
unfrozen backbone layers, small while the optimizer's moment estimates are still noise.
"""

import dataclasses

import keras
import tensorflow as tf

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LEARNING_RATE_SCHEDULES = ("cosine", "constant")
CLASS_WEIGHT_MODES = ("none", "balanced")
# Weight decay would pull these towards zero for no benefit: biases and the scale/offset of normalization.
NO_WEIGHT_DECAY_NAMES = ("bias", "gamma", "beta")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The loss and the shape of each phase's learning rate (the flags of the same names).

    lr_schedule: "cosine" (decays to 0 at the phase's end) or "constant", after the warmup.
    warmup_fraction: share of each phase's steps spent warming the rate up linearly from 0.
    weight_decay: decoupled weight decay (biases and normalization excepted); 0 = none.
    label_smoothing: of the training loss; 0 = none.
    class_weight: "none" or "balanced" (see class_weights).
    ema_momentum: fine-tuning phases keep an exponential moving average of the weights (--ema) with this
        momentum per step, capped per phase at 1 - 2 / steps_per_epoch (see ema_momentum_for); 0 = off.
    """

    lr_schedule: str = "cosine"
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    class_weight: str = "none"
    ema_momentum: float = 0.0

    def __post_init__(self):
        if self.lr_schedule not in LEARNING_RATE_SCHEDULES:
            raise ValueError(f"--lr_schedule {self.lr_schedule!r} is not one of {LEARNING_RATE_SCHEDULES}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"--warmup_fraction {self.warmup_fraction} must be within [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"--weight_decay {self.weight_decay!r} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label_smoothing {self.label_smoothing!r} must be within [0, 1)")
        if self.class_weight not in CLASS_WEIGHT_MODES:
            raise ValueError(f"--class_weight {self.class_weight!r} is not one of {CLASS_WEIGHT_MODES}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"--ema_momentum {self.ema_momentum!r} must be within [0, 1), e.g. 0.99")

    def loss_function(self, manifest: dict):
        """The per-example training loss for the data of `manifest` (its train split's class counts)."""
        weights = class_weights(
            mode=self.class_weight, class_counts=manifest["splits"]["train"]["class_counts"],
            class_names=manifest["classes"],
        )
        return make_loss_function(label_smoothing=self.label_smoothing, class_weights=weights)

    def optimizer(self, *, name: str, learning_rate: float, total_steps: int, precision: str, model: keras.Model,
                  ema_steps_per_epoch: int | None = None):
        """A fresh optimizer for one phase: its own warmup and decay over total_steps. Call in strategy.scope().

        ema_steps_per_epoch: the phase's steps per epoch when it averages its weights (fine-tuning with --ema):
            the weights become their moving average at the end of every epoch, so each epoch's validation,
            best-weights copy and checkpoint hold the average (Keras's ema_overwrite_frequency).
        """
        schedule = make_learning_rate(
            schedule=self.lr_schedule, learning_rate=learning_rate, total_steps=total_steps,
            warmup_steps=int(round(self.warmup_fraction * total_steps)),
        )
        ema = {}
        if self.ema_momentum and ema_steps_per_epoch:
            ema = {"use_ema": True, "ema_momentum": ema_momentum_for(self.ema_momentum, ema_steps_per_epoch),
                   "ema_overwrite_frequency": ema_steps_per_epoch}
        return make_optimizer(
            name=name, learning_rate=schedule, weight_decay=self.weight_decay, precision=precision, model=model, **ema
        )


def ema_momentum_for(momentum: float, steps_per_epoch: int) -> float:
    """The moving average's momentum in a phase of steps_per_epoch steps an epoch: at most 1 - 2 / steps_per_epoch.

    The average spans about 1 / (1 - momentum) steps. Keras's average has no warm-up (it starts at the first
    step's weights), so a span longer than an epoch would leave the weights of each epoch's start, not its
    average: with 11 steps an epoch, 0.99 keeps 90% of the first step's weights at the epoch's end.
    """
    return min(momentum, max(0.0, 1.0 - 2.0 / steps_per_epoch))


def make_learning_rate(*, schedule: str, learning_rate: float, total_steps: int, warmup_steps: int):
    """Returns a phase's learning rate: a float, or a keras schedule of the optimizer's step count.

    Args:
        schedule: "cosine" (decay to 0 over the phase) or "constant".
        learning_rate: the peak rate, reached at the end of the warmup.
        total_steps: training steps of the phase, warmup included.
        warmup_steps: steps of linear warmup from 0; 0 = none.
    """
    if schedule not in LEARNING_RATE_SCHEDULES:
        raise ValueError(f"--lr_schedule {schedule!r} is not one of {LEARNING_RATE_SCHEDULES}")
    if schedule == "constant" and warmup_steps == 0:
        return learning_rate
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        # alpha is the share of the peak left at the end: 1.0 keeps the rate constant after the warmup.
        alpha=1.0 if schedule == "constant" else 0.0,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def make_optimizer(*, name: str, learning_rate, weight_decay: float, precision: str, model: keras.Model, **ema):
    """Creates and builds an optimizer for the model's trainable weights.

    Call inside strategy.scope(). The optimizer's variables are created here, not lazily in the first
    step: creating variables inside a replicated tf.function fails, and a checkpoint needs them to
    exist to be restored into.

    Args:
        name: one of OPTIMIZERS ("sgd" is SGD with Nesterov momentum 0.9).
        learning_rate: a float or a schedule (make_learning_rate).
        weight_decay: decoupled weight decay (as in AdamW); 0 = none. "adamw" with 0 is plain Adam.
        precision: the Keras dtype policy; mixed_float16 wraps the optimizer for loss scaling.
        model: the model whose trainable weights it updates.
        ema: use_ema, ema_momentum, ema_overwrite_frequency of the Keras optimizer (Recipe.optimizer).
    """
    if weight_decay < 0:
        raise ValueError(f"--weight_decay {weight_decay!r} must be >= 0")
    decay = weight_decay or None
    if name == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate, weight_decay=decay, **ema)
    elif name == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay, **ema)
    elif name == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9, nesterov=True, weight_decay=decay,
                                         **ema)
    elif name == "rmsprop":
        optimizer = keras.optimizers.RMSprop(learning_rate=learning_rate, weight_decay=decay, **ema)
    else:
        raise ValueError(f"--optimizer {name!r} is not one of {OPTIMIZERS}")
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY_NAMES))
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def class_weights(*, mode: str, class_counts: dict, class_names: list[str]) -> list[float] | None:
    """Per-class loss weights in label-id order, or None for "none".

    "balanced" weighs class c by num_examples / (num_classes * count_c) (scikit-learn's rule): every
    class then carries the same total weight, however rare.
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"--class_weight {mode!r} is not one of {CLASS_WEIGHT_MODES}")
    if mode == "none":
        return None
    counts = [class_counts.get(name, 0) for name in class_names]
    empty = [name for name, count in zip(class_names, counts) if count == 0]
    if empty:
        raise ValueError(f"--class_weight=balanced: classes {empty} have no training examples")
    total = sum(counts)
    return [total / (len(counts) * count) for count in counts]


def make_loss_function(*, label_smoothing: float, class_weights: list[float] | None):
    """Returns loss(labels, probabilities) -> per-example training loss.

    Args:
        label_smoothing: share of each target's probability spread evenly over all classes; 0 = none.
        class_weights: per-class multipliers of the loss (see class_weights), or None.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"--label_smoothing {label_smoothing!r} must be within [0, 1)")
    weights = None if class_weights is None else tf.constant(class_weights, tf.float32)

    def loss_function(labels, probabilities):
        if label_smoothing:
            targets = tf.one_hot(labels, tf.shape(probabilities)[-1], dtype=probabilities.dtype)
            losses = keras.losses.categorical_crossentropy(targets, probabilities, label_smoothing=label_smoothing)
        else:
            losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        losses = tf.cast(losses, tf.float32)
        if weights is not None:
            losses *= tf.gather(weights, labels)
        return losses

    return loss_function
