"""The classifier: a pretrained backbone with a new head, and the switch to fine-tuning.

    inputs (float RGB pixels in [0, 255]) -> Preprocess(backbone's mode) -> backbone(training=False)
    -> GlobalAveragePooling2D -> Dropout -> Dense(num_classes, softmax, float32)

The backbone is always called with `training=False`, so its BatchNormalization layers stay in inference
mode in both phases (the classic fine-tuning failure is letting a small dataset overwrite their ImageNet
statistics). Preprocessing lives inside the model so an exported model takes plain pixels.
"""

import keras
import tensorflow as tf
from keras import layers

# Each backbone: (constructor, preprocess mode of its own `preprocess_input`, default image size).
# The mode is the `mode` that backbone's keras.applications module passes to
# imagenet_utils.preprocess_input ("none": the backbone rescales inside itself);
# tests/test_model.py checks that Preprocess(mode) equals that module's preprocess_input.
BACKBONES = {
    "densenet121": (keras.applications.DenseNet121, "torch", 224),
    "efficientnet_b0": (keras.applications.EfficientNetB0, "none", 224),
    "inception_v3": (keras.applications.InceptionV3, "tf", 299),
    "mobilenet_v2": (keras.applications.MobileNetV2, "tf", 224),
    "mobilenet_v3_small": (keras.applications.MobileNetV3Small, "none", 224),
    "nasnet_large": (keras.applications.NASNetLarge, "tf", 331),
    "resnet50": (keras.applications.ResNet50, "caffe", 224),
    "vgg19": (keras.applications.VGG19, "caffe", 224),
    "xception": (keras.applications.Xception, "tf", 299),
}
PREPROCESS_MODES = ("tf", "torch", "caffe", "none")
BACKBONE_FILE_SUFFIX = ".keras"
DEFAULT_FILE_IMAGE_SIZE = 224


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


def is_backbone_file(backbone: str) -> bool:
    """True when --backbone names a saved Keras model file rather than a built-in backbone."""
    return backbone.endswith(BACKBONE_FILE_SUFFIX)


def default_image_size(backbone: str) -> int:
    """The image size a backbone was trained at (for a backbone file: its fixed input size, else 224)."""
    if is_backbone_file(backbone):
        return DEFAULT_FILE_IMAGE_SIZE
    check_backbone_name(backbone)
    return BACKBONES[backbone][2]


def check_backbone_name(backbone: str) -> None:
    """Raises ValueError naming the choices when `backbone` is neither built in nor a .keras file."""
    if backbone not in BACKBONES and not is_backbone_file(backbone):
        raise ValueError(
            f"--backbone {backbone!r} is not a known backbone; use one of {sorted(BACKBONES)} "
            f"or a path to a {BACKBONE_FILE_SUFFIX} feature-extractor file"
        )


def resolve_preprocess(backbone: str, preprocess: str) -> str:
    """Returns the preprocess mode: the backbone's own for "auto", else the one asked for."""
    if preprocess != "auto":
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"--preprocess {preprocess!r} is not one of auto, {', '.join(PREPROCESS_MODES)}")
        return preprocess
    if is_backbone_file(backbone):
        raise ValueError(
            f"--preprocess=auto cannot know how backbone file {backbone!r} expects its pixels scaled; "
            "pass --preprocess=tf ([-1, 1]), torch (ImageNet mean/std), caffe (BGR minus mean) or none ([0, 255])"
        )
    check_backbone_name(backbone)
    return BACKBONES[backbone][1]


def make_backbone(backbone: str, *, image_size: int, weights: str) -> keras.Model:
    """Creates the feature extractor (no classifier top, no pooling).

    Args:
        backbone: a key of BACKBONES, or a path to a `.keras` model file (local or gs://).
        image_size: input height and width.
        weights: "imagenet", "none" (random initialisation) or a path to a weights file; a backbone
            file carries its own weights, so only "imagenet" (meaning "as stored") is accepted for it.
    """
    check_backbone_name(backbone)
    if is_backbone_file(backbone):
        if weights != "imagenet":
            raise ValueError(
                f"--weights {weights!r} cannot apply to backbone file {backbone!r}: it carries its own weights"
            )
        if not tf.io.gfile.exists(backbone):
            raise ValueError(f"--backbone file {backbone!r} does not exist")
        return keras.saving.load_model(backbone, compile=False)
    constructor = BACKBONES[backbone][0]
    return constructor(
        include_top=False,
        weights=None if weights == "none" else weights,
        input_shape=(image_size, image_size, 3),
    )


def build_model(
    *,
    backbone: str,
    num_classes: int,
    image_size: int,
    weights: str,
    preprocess: str,
    dropout: float,
    augmentation: keras.Sequential | None = None,
) -> keras.Model:
    """Builds the phase-1 classifier: frozen backbone, new trainable head.

    Build it inside `strategy.scope()`, after setting the mixed-precision policy.

    Args:
        backbone: a key of BACKBONES or a path to a `.keras` backbone file.
        num_classes: number of output classes.
        image_size: input height and width in pixels.
        weights: see make_backbone.
        preprocess: a mode of PREPROCESS_MODES, already resolved (see resolve_preprocess).
        dropout: dropout rate before the classifier.
        augmentation: Keras preprocessing layers (data.make_augmentation) to run on the accelerator,
            right after the input; they act only in training and pass images through at inference.
            None: no augmentation in the model (it happens in tf.data, or not at all).

    Returns:
        An uncompiled functional model taking float RGB [0, 255] images and returning probabilities.
    """
    feature_extractor = make_backbone(backbone, image_size=image_size, weights=weights)
    feature_extractor.trainable = False
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    # float32 even under mixed precision: ImageNet mean subtraction in bfloat16 would round pixels.
    x = inputs
    if augmentation is not None:
        # Its layers one by one rather than the Sequential: the backbone stays the one nested model.
        for layer in augmentation.layers:
            x = layer(x)
    x = Preprocess(preprocess, name="preprocess", dtype="float32")(x)
    x = feature_extractor(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    # float32 output: softmax and the loss stay accurate under mixed precision.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="classifier")(x)
    return keras.Model(inputs, outputs, name="classifier_model")


def get_backbone(model: keras.Model) -> keras.Model:
    """Returns the backbone: the one nested model inside the classifier."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert len(nested) == 1, f"expected one backbone inside the model, found {len(nested)}"
    return nested[0]


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
            raise ValueError(
                f"--fine_tune_at {fine_tune_at!r} is not a layer of backbone {backbone.name!r} "
                f"(it has {num_layers} layers, e.g. {names[num_layers // 2]!r}); give a name, an index or a fraction"
            ) from None
        return names.index(text)
    if text.lstrip("-").isdigit():
        index = int(text)
        index = index + num_layers if index < 0 else index
        if not 0 <= index <= num_layers:
            raise ValueError(f"--fine_tune_at {fine_tune_at!r} is outside the backbone's {num_layers} layers")
        return index
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"--fine_tune_at {fine_tune_at!r}: a fraction must be within [0, 1]")
    return int(round(number * num_layers))


def unfreeze_backbone(model: keras.Model, fine_tune_at: str) -> int:
    """Makes the backbone trainable from layer `fine_tune_at` up, BatchNormalization excepted.

    Recompile the model afterwards: Keras reads `trainable` at compile time.

    Returns:
        The number of backbone layers left frozen below the cut.
    """
    backbone = get_backbone(model)
    start = resolve_fine_tune_at(backbone, fine_tune_at)
    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        # BatchNormalization stays frozen: with training=False its statistics are never updated,
        # and freezing its scale/offset too keeps the features the head was trained on.
        layer.trainable = index >= start and not isinstance(layer, layers.BatchNormalization)
    return start
