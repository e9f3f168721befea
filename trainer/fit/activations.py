"""Phase 2 on cached activations at the cut: the frozen bottom of the backbone runs once per image and view.

In phase 2 only the top of the backbone (from --fine_tune_at up) trains; the frozen bottom, in inference mode,
computes the same function of the same augmented pixels every epoch. Here the model is cut at a single-tensor
boundary of the backbone at or below its first unfrozen layer (every path from the input to the output passes
through it: a residual block cannot be cut inside):

    full model = bottom (input -> [augmentation] -> preprocess -> backbone up to the cut)
                 + top (backbone from the cut -> pooling -> dropout -> classifier),

the bottom's output (the cut activations) is cached like phase 1's features (features.py: in memory under
--feature_cache_memory_mb, spilled to files past it, under any strategy), and phase 2 trains the top on it,
validating on cached validation activations too. The top's layers are the full model's own layers, so training
the top trains the full model; BatchNormalization stays in inference mode. Phase 1's feature pass computes the
activations at the same time as its pooled features (one pass model with two outputs), so the bottom costs
phase 2 nothing beyond the pass phase 1 already makes. With augmentation, phase 2 then trains on the same
--feature_views views per image as phase 1, instead of a new view each epoch.

--phase2_cache=auto decides with plan(): the cache pays where the bottom holds a fair share of the backbone's
multiply-adds and reading its activations back costs less than recomputing them (docs/training.md has the
measurements behind the two thresholds below), and where a cache past the memory budget fits in half the free
space of a local spill folder; always / never force it.
"""

import dataclasses
import os
import shutil
import tempfile
import weakref

import keras
import numpy as np
import tensorflow as tf

from trainer.fit import features as features_lib
from trainer.models import classifier

MODES = ("auto", "always", "never")
# auto caches only when the frozen bottom holds at least this share of the backbone's multiply-adds ...
MIN_BOTTOM_SHARE = 0.25
# ... and at least this many multiply-adds per cached byte: reading a byte back (memory or a local spill file)
# costs about what 20 multiply-adds of the bottom cost on a CPU (benchmarks/phase2.py measures both).
MIN_MACS_PER_BYTE = 20

_SPLITS = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Cut:
    """Where the backbone is cut for phase 2.

    layer: the backbone layer whose output is cached; index: its position in backbone.layers.
    shape: the activations of one image (height, width, channels).
    bottom_macs, total_macs: multiply-adds of the backbone below the cut and in all (per image, estimated from
        the convolution and dense kernels and their output sizes).
    """

    layer: str
    index: int
    shape: tuple
    bottom_macs: int
    total_macs: int

    @property
    def bytes_per_image(self) -> int:
        return int(np.prod(self.shape)) * 4

    @property
    def bottom_share(self) -> float:
        return self.bottom_macs / max(self.total_macs, 1)

    def describe(self) -> dict:
        """What metrics.json and the log say about the cut."""
        return {
            "layer": self.layer, "shape": list(self.shape), "bytes_per_image": self.bytes_per_image,
            "bottom_share_of_multiply_adds": round(self.bottom_share, 3),
        }


def _graph_nodes(model: keras.Model) -> dict:
    """{layer: its node in model's graph} (a layer called elsewhere too has other nodes, not of this graph); {} for a
    model without a graph of layers (then boundaries finds none)."""
    graph = getattr(model, "_functional", None) or model  # a keras.Sequential keeps its graph in a Functional
    if not hasattr(graph, "_nodes_by_depth"):
        return {}
    in_graph = {node for nodes in graph._nodes_by_depth.values() for node in nodes}
    return {node.operation: node for node in in_graph}


def boundaries(backbone: keras.Model) -> list[int]:
    """Indices of the backbone's layers whose one output tensor every path from input to output passes through.

    A layer j is such a boundary when no layer after it reads a tensor made before it. [] when the layers are not
    in topological order or the graph is not a plain one-input, one-output chain of blocks (then nothing is cut).
    """
    layers = backbone.layers
    nodes = _graph_nodes(backbone)
    position = {layer: index for index, layer in enumerate(layers)}
    if len(backbone.outputs) != 1 or position.get(backbone.outputs[0]._keras_history.operation) != len(layers) - 1:
        return []
    earliest_source = []
    for index, layer in enumerate(layers):
        node = nodes.get(layer)
        if node is None or len(node.outputs) != 1:
            return []
        sources = [position.get(tensor._keras_history.operation) for tensor in node.arguments.keras_tensors]
        if None in sources or any(source >= index for source in sources):
            return []
        earliest_source.append(min(sources, default=index))
    found, earliest_after = [], len(layers)
    for index in range(len(layers) - 1, -1, -1):
        if earliest_after >= index:
            found.append(index)
        earliest_after = min(earliest_after, earliest_source[index])
    return sorted(found)


def output_shapes(backbone: keras.Model, image_size: int) -> list[tuple]:
    """Each backbone layer's output shape for one image of image_size (symbolic: nothing is computed)."""
    nodes = _graph_nodes(backbone)
    probe = keras.Model(backbone.inputs, [nodes[layer].outputs[0] for layer in backbone.layers])
    specs = probe.compute_output_spec(keras.KerasTensor((1, image_size, image_size, 3)))
    return [tuple(int(size) for size in spec.shape[1:]) for spec in specs]


def layer_macs(backbone: keras.Model, shapes: list[tuple]) -> list[int]:
    """Estimated multiply-adds per image of each backbone layer: kernel size x output positions (convolutions,
    depthwise convolutions, dense layers; the rest is counted as 0). shapes: from output_shapes."""
    macs = []
    for layer, shape in zip(backbone.layers, shapes):
        kernel = sum(int(np.prod(weight.shape)) for weight in layer.weights if "kernel" in weight.path.split("/")[-1])
        positions = int(np.prod(shape[:-1])) if len(shape) == 3 else 1
        macs.append(kernel * positions)
    return macs


def find_cut(backbone: keras.Model, *, first_trainable: int, image_size: int) -> Cut | None:
    """The boundary nearest below layer `first_trainable` (the first unfrozen one), or None when there is none
    above the input (the backbone's output layer is never a cut: the top would have no layer of the backbone)."""
    last = len(backbone.layers) - 1
    candidates = [index for index in boundaries(backbone) if 1 <= index < min(first_trainable, last)]
    if not candidates:
        return None
    index = candidates[-1]
    shapes = output_shapes(backbone, image_size)
    macs = layer_macs(backbone, shapes)
    return Cut(layer=backbone.layers[index].name, index=index, shape=shapes[index],
               bottom_macs=sum(macs[: index + 1]), total_macs=sum(macs))


@dataclasses.dataclass(frozen=True)
class Decision:
    """plan()'s answer: cut (None: phase 2 trains on images) and why, in one line for the log."""

    cut: Cut | None
    reason: str


def plan(model: keras.Model, *, mode: str, fine_tune_at: str | None, image_size: int, rows: int,
         budget: features_lib.CacheBudget, unaugmented_only: bool = False) -> Decision:
    """Decides whether phase 2 trains on cached activations, and at which cut.

    Args:
        mode: --phase2_cache: "auto", "always" or "never".
        fine_tune_at: the deepest phase-2 stage's --fine_tune_at; None: no phase 2.
        rows: training rows the cache would hold (images x views).
        budget: where the cache is kept (features.CacheBudget).
        unaugmented_only: the cache's one view per training image would be the unaugmented one (--feature_views=1
            with the data-quality report sharing phase 1's pass), while training images are augmented.
    """
    if mode not in MODES:
        raise ValueError(f"--phase2_cache {mode!r} is not one of {MODES}")
    if fine_tune_at is None:
        return Decision(None, "no phase 2")
    if mode == "never":
        return Decision(None, "--phase2_cache=never")
    backbones = classifier.get_backbones(model)
    if len(backbones) != 1:
        return Decision(None, "an ensemble fine-tunes on images (one cut per backbone is not supported)")
    backbone = backbones[0]
    first_trainable = classifier.resolve_fine_tune_at(backbone, fine_tune_at)
    if first_trainable >= len(backbone.layers):
        return Decision(None, f"--fine_tune_at={fine_tune_at} unfreezes no layer of the backbone")
    cut = find_cut(backbone, first_trainable=first_trainable, image_size=image_size)
    if cut is None:
        if not boundaries(backbone):
            return Decision(None, f"backbone {backbone.name!r} cannot be cut: its graph is not a chain of Keras layers "
                                  "listed in order (e.g. operations outside layers, as in MobileNetV3)")
        return Decision(None, f"backbone {backbone.name!r} has no single-tensor boundary below layer {first_trainable}")
    refusal = _refusal(cut, rows=rows, budget=budget, unaugmented_only=unaugmented_only)
    if mode == "always":
        return Decision(cut, "--phase2_cache=always" + (f" (auto would not cache: {refusal})" if refusal else ""))
    if refusal:
        return Decision(None, refusal)
    return Decision(cut, f"the frozen bottom holds {cut.bottom_share:.0%} of the backbone's multiply-adds")


def _refusal(cut: Cut, *, rows: int, budget: features_lib.CacheBudget, unaugmented_only: bool) -> str:
    """Why auto does not cache at this cut, or "" when it does."""
    if unaugmented_only:
        return ("its one view per training image (--feature_views=1) is the unaugmented one the data-quality report "
                "reads: phase 2 would train without augmentation (--feature_views=2 caches an augmented view too)")
    if cut.bottom_share < MIN_BOTTOM_SHARE:
        return (f"the frozen bottom holds only {cut.bottom_share:.0%} of the backbone's multiply-adds "
                f"(auto caches from {MIN_BOTTOM_SHARE:.0%})")
    if cut.bottom_macs < MIN_MACS_PER_BYTE * cut.bytes_per_image:
        return (f"reading {cut.bytes_per_image / 1024:.0f} KiB per image back would cost more than recomputing its "
                f"{cut.bottom_macs / 1e6:.0f} M multiply-adds")
    size = rows * cut.bytes_per_image
    if size > budget.memory_mb * 2**20:
        if budget.directory.startswith("gs://"):
            return (f"{size / 2**20:.0f} MiB of activations would be spilled to {budget.directory} and read back from "
                    "it every epoch")
        folder = budget.directory or tempfile.gettempdir()
        free = shutil.disk_usage(_nearest_existing(folder)).free
        if size > free / 2:
            return (f"{size / 2**30:.1f} GiB of activations would be spilled to {folder}, more than half its "
                    f"{free / 2**30:.1f} GiB free (--feature_cache_dir chooses the folder)")
    return ""


def _nearest_existing(folder: str) -> str:
    """The folder, or its nearest parent that exists (a --feature_cache_dir is created when first written)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


@dataclasses.dataclass(frozen=True)
class CutModels:
    """The full model split at a cut; every part shares the full model's layers.

    pass_model: images -> [pooled features, cut activations] (phase 1's pass, with both outputs).
    bottom: images -> cut activations.
    top: cut activations -> probabilities (what phase 2 trains).
    front, frozen: pass_model in two, at the backbone's input: images -> [augmentation] -> preprocessed pixels, and
        preprocessed pixels -> [pooled features, cut activations] (the part lite_pass.py converts).
    """

    pass_model: keras.Model
    bottom: keras.Model
    top: keras.Model
    front: keras.Model
    frozen: keras.Model


def split_at_cut(model: keras.Model, cut: Cut) -> CutModels:
    """Splits a single-backbone classifier at the cut; the same models for every call with the same model and cut."""
    splits = _SPLITS.setdefault(model, {})
    if cut.layer in splits:
        return splits[cut.layer]
    backbone = classifier.get_backbone(model)
    inner_cut = _graph_nodes(backbone)[backbone.get_layer(cut.layer)].outputs[0]
    backbone_bottom = keras.Model(backbone.input, inner_cut, name=f"{backbone.name}_bottom")
    backbone_top = keras.Model(inner_cut, backbone.output, name=f"{backbone.name}_top")
    outer = _graph_nodes(model)[backbone]
    before = keras.Model(model.input, outer.arguments.keras_tensors[0], name="before_backbone")
    dropout, dense = (model.get_layer(name) for name in features_lib.HEAD_LAYERS)
    after = keras.Model(outer.outputs[0], dropout.input, name="after_backbone")

    activations = backbone_bottom(before(model.input), training=False)
    pooled = after(backbone_top(activations, training=False))
    cut_input = keras.Input(shape=cut.shape, name="activations")
    top = keras.Model(cut_input, dense(dropout(after(backbone_top(cut_input, training=False)))), name="top")
    pixels = keras.Input(shape=before.output.shape[1:], name="pixels")
    frozen_activations = backbone_bottom(pixels, training=False)
    splits[cut.layer] = CutModels(
        pass_model=keras.Model(model.input, [pooled, activations], name="pass_model"),
        bottom=keras.Model(model.input, activations, name="bottom"),
        top=top,
        front=before,
        frozen=keras.Model(pixels, [after(backbone_top(frozen_activations, training=False)), frozen_activations],
                           name="frozen"),
    )
    return splits[cut.layer]


def split_front(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """features.split_model's feature model in two at the backbone's input (a single-backbone classifier):
    (front: images -> [augmentation] -> preprocessed pixels, frozen: preprocessed pixels -> pooled features)."""
    splits = _SPLITS.setdefault(model, {})
    if None not in splits:
        backbone = classifier.get_backbone(model)
        outer = _graph_nodes(model)[backbone]
        front = keras.Model(model.input, outer.arguments.keras_tensors[0], name="before_backbone")
        after = keras.Model(outer.outputs[0], model.get_layer(features_lib.HEAD_LAYERS[0]).input, name="after_backbone")
        pixels = keras.Input(shape=front.output.shape[1:], name="pixels")
        splits[None] = (front, keras.Model(pixels, after(backbone(pixels, training=False)), name="frozen"))
    return splits[None]


@dataclasses.dataclass
class ActivationCache:
    """Phase 2's cached activations, filled by phase 1's pass or by phase 2's own, kept until the run's phases end.

    cut: where the model is cut. train, validation: features.CachedFeatures of the activations (flattened rows).
    views: the views per training image. seconds: time phase 2 spent computing them itself (0 when phase 1's pass
    made them). sizes: what describe() adds once filled (rows, MiB, spilled), kept after delete().
    """

    cut: Cut
    train: features_lib.CachedFeatures | None = None
    validation: features_lib.CachedFeatures | None = None
    views: int = 1
    seconds: float = 0.0
    sizes: dict = dataclasses.field(default_factory=dict)

    def fill(self, train: features_lib.CachedFeatures, validation: features_lib.CachedFeatures, *, views: int,
             seconds: float = 0.0) -> None:
        self.train, self.validation, self.views, self.seconds = train, validation, views, seconds
        self.sizes = {"train_rows": train.count, "validation_rows": validation.count,
                      "cache_mib": round((train.nbytes + validation.nbytes) / 2**20, 1),
                      "spilled": bool(train.paths or validation.paths)}

    @property
    def filled(self) -> bool:
        return self.train is not None and self.validation is not None

    def delete(self) -> None:
        """Removes spilled files and lets go of the arrays."""
        for cached in (self.train, self.validation):
            if cached is not None:
                cached.delete()
        self.train = self.validation = None

    def describe(self) -> dict:
        """What metrics.json says about the cache."""
        return {**self.cut.describe(), "views_per_image": self.views, **self.sizes}
