"""The classifier built on VGG16, its layer names, and the scenario table.

The classifier is split into three Keras sub-models that share layers with the
whole, so each stage can run from where the feature cache stops:

    image --[vgg16_stem: block1..block4]--> block4_pool
          --[vgg16_block5: block5]-------> block5_pool
          --[head: flatten, fc1, (fc2 | dropout), predictions]--> probabilities

A head trained on cached ``block5_pool`` features therefore *is* the head of the
full model: it drops onto the conv base unchanged for fine-tuning and export.

The output layer ``predictions`` replaces VGG16's 1000-way layer: one sigmoid
unit for a binary task (P(positive class)), K softmax units for K classes, K
sigmoid units for K labels (see `features.task`).
"""

import contextlib
import dataclasses
import logging
from typing import Iterable, List, Optional, Sequence

import keras

from features import weights as weights_lib
from features.scenarios import (BLOCK4_POOL, BLOCK5, BLOCK5_POOL, BLOCKS, DROPOUT, FC1, FC2,
                                FLATTEN, HEAD, INPUT, NO_TOP_HIDDEN_UNITS, PREDICTIONS,
                                STEM, block_of, check_optimizer)
from pipeline.errors import ConfigError

class CompiledConvs(keras.layers.Layer):
    """Runs a conv sub-model (its forward pass, and so its gradients) as one
    XLA-compiled function. Its weights are the sub-model's own.

    Why: TensorFlow's stock CPU kernels for convolution gradients are built for a
    generic x86-64, while XLA compiles for the CPU at hand; in float32 on an AVX2
    machine, scenario C's training step (block5 + head) ran in 64 instead of 128 ms
    per image (docs/benchmarks.md). Only the convolutions are compiled: under XLA
    dropout draws other masks than outside it, and the head's dropout stays outside.
    """

    def __init__(self, inner: keras.Model, **kwargs):
        super().__init__(name=f"compiled_{inner.name}", **kwargs)
        self.inner = inner
        import tensorflow as tf  # only this layer needs TensorFlow itself
        self._run = tf.function(lambda x: self.inner(x, training=False), jit_compile=True)

    def call(self, x):
        return self._run(x)

    def compute_output_spec(self, x):
        return self.inner.compute_output_spec(x)


@dataclasses.dataclass
class Classifier:
    """VGG16 conv base plus a new head, as shareable sub-models.

    Attributes:
      stem: image -> block4_pool (blocks 1-4).
      block5: block4_pool -> block5_pool.
      head: block5_pool -> probabilities (flatten, fc1, [fc2 | dropout], predictions).
      model: image -> probabilities, the composition of the three.
      include_top: whether fc1/fc2 are VGG16's ImageNet layers.
    """
    stem: keras.Model
    block5: keras.Model
    head: keras.Model
    model: keras.Model
    include_top: bool

    @property
    def units(self) -> int:
        """Outputs of the ``predictions`` layer (1 for a binary task)."""
        return int(self.head.get_layer(PREDICTIONS).units)

    def layers(self) -> List[keras.layers.Layer]:
        """Every leaf layer with weights, in network order."""
        return [l for sub in (self.stem, self.block5, self.head) for l in sub.layers if l.weights]

    def model_from(self, layer_name: str) -> keras.Model:
        """The part of the network that runs after ``layer_name``.

        `INPUT` gives the whole model; ``block4_pool`` block5 + head; ``block5_pool``
        the head; a head layer (``fc1``, ``fc2``, ...) the head layers after it, e.g.
        ``fc2`` -> only ``predictions``. Sub-models share their layers with the whole.
        """
        if layer_name == INPUT:
            return self.model
        if layer_name == BLOCK4_POOL:
            inputs = keras.Input(self.block5.input.shape[1:], name="block4_pool_features")
            return keras.Model(inputs, self.head(self.block5(inputs)), name="block5_and_head")
        if layer_name == BLOCK5_POOL:
            return self.head
        names = [l.name for l in self.head.layers[1:]]  # a chain: input, flatten, ...
        if layer_name not in names[:-1]:
            raise ConfigError(f"Cannot start the network at {layer_name!r}.")
        inputs = keras.Input(self.head.get_layer(layer_name).output.shape[1:],
                             name=f"{layer_name}_features")
        x = inputs
        for name in names[names.index(layer_name) + 1:]:
            x = self.head.get_layer(name)(x)
        return keras.Model(inputs, x, name=f"after_{layer_name}")

    def training_model(self, layer_name: str, compiled_convs: bool = False) -> keras.Model:
        """`model_from` for training: the same layers and weights, with each conv
        sub-model (stem, block5) run as one XLA-compiled function when
        ``compiled_convs`` (see `precision.compile_convs`). The dense head stays
        outside XLA, so dropout draws the same masks either way. Never saved: it
        holds a `CompiledConvs` layer, which is not serialisable on purpose."""
        if not compiled_convs or layer_name not in (INPUT, BLOCK4_POOL):
            return self.model_from(layer_name)
        if layer_name == INPUT:
            inputs = keras.Input(self.model.input.shape[1:], name="image")
            x = CompiledConvs(self.block5)(CompiledConvs(self.stem)(inputs))
        else:
            inputs = keras.Input(self.block5.input.shape[1:], name="block4_pool_features")
            x = CompiledConvs(self.block5)(inputs)
        return keras.Model(inputs, self.head(x), name=f"train_from_{layer_name}")

    def head_span(self, layer_name: str) -> keras.Model:
        """The frozen head layers from ``block5_pool``'s output to ``layer_name``'s (a head
        layer such as ``flatten``): ``trunk(layer) == head_span(layer)(trunk(block5_pool))``."""
        names = [l.name for l in self.head.layers[1:]]
        if layer_name not in names:
            raise ConfigError(f"{layer_name!r} is not a layer of the head.")
        inputs = keras.Input(self.head.input.shape[1:], name="block5_pool_features")
        x = inputs
        for name in names[:names.index(layer_name) + 1]:
            x = self.head.get_layer(name)(x, training=False) if name == DROPOUT \
                else self.head.get_layer(name)(x)
        return keras.Model(inputs, x, name=f"block5_pool_to_{layer_name}")

    def trunk(self, layer_name: str) -> keras.Model:
        """The frozen part below ``layer_name``: image -> that layer's output.

        The complement of `model_from`: ``model_from(l)(trunk(l)(x)) == model(x)``.
        """
        if layer_name == INPUT:
            raise ConfigError("The whole network trains: there is no frozen trunk.")
        image = keras.Input(self.model.input.shape[1:], name="image")
        x = self.stem(image, training=False)
        if layer_name != BLOCK4_POOL:
            x = self.block5(x, training=False)
        if layer_name not in (BLOCK4_POOL, BLOCK5_POOL):
            names = [l.name for l in self.head.layers[1:]]
            if layer_name not in names:
                raise ConfigError(f"Cannot end a trunk at {layer_name!r}.")
            for name in names[:names.index(layer_name) + 1]:
                x = self.head.get_layer(name)(x, training=False) if name == DROPOUT \
                    else self.head.get_layer(name)(x)
        return keras.Model(image, x, name=f"trunk_to_{layer_name}")

    def feature_model(self, layer_names: Sequence[str]) -> keras.Model:
        """A model from the image to a dict of the named intermediate outputs."""
        image = self.model.input
        block4 = self.stem(image)
        block5 = self.block5(block4)
        outputs = {BLOCK4_POOL: block4, BLOCK5_POOL: block5}
        if self.include_top:
            x = block5
            for name in (FLATTEN, FC1, FC2):
                x = self.head.get_layer(name)(x)
            outputs[FC2] = x
        unknown = [n for n in layer_names if n not in outputs]
        if unknown:
            raise ConfigError(f"Cannot cache layer(s) {', '.join(unknown)}; available: "
                              f"{', '.join(outputs)}.")
        return keras.Model(image, {n: outputs[n] for n in layer_names}, name="features")

    def set_trainable(self, blocks: Iterable[str], log: bool = True) -> List[str]:
        """Makes exactly the layers of ``blocks`` trainable and freezes the rest.

        Returns the names of the trainable layers. Remember to (re)compile after.
        """
        blocks = set(blocks)
        unknown = blocks - set(BLOCKS)
        if unknown:
            raise ConfigError(f"Unknown block(s) {', '.join(sorted(unknown))}; choose from "
                              f"{', '.join(BLOCKS)}.")
        trainable = []
        for layer in self.layers():
            layer.trainable = block_of(layer.name) in blocks
            if layer.trainable:
                trainable.append(layer.name)
        missing = [b for b in blocks if not any(block_of(n) == b for n in trainable)]
        if missing:
            raise ConfigError(f"Block(s) {', '.join(sorted(missing))} match no layer of this "
                              "model.")
        if log:
            logging.info("Trainable layers: %s", ", ".join(trainable))
        return trainable

    @property
    def dropout(self) -> Optional[keras.layers.Dropout]:
        """The head's dropout layer (only without the ImageNet top), or None."""
        return next((l for l in self.head.layers if isinstance(l, keras.layers.Dropout)), None)

    def set_dropout(self, rate: Optional[float]) -> None:
        """Sets the head's dropout rate (no-op for ``None`` or a head without dropout).

        Keras reads ``Dropout.rate`` when it traces a training step, so set it before
        compiling the model that trains.
        """
        if rate is None or self.dropout is None:
            return
        if not 0 <= rate < 1:
            raise ConfigError(f"Dropout rate must be in [0, 1); got {rate}.")
        self.dropout.rate = float(rate)

    @contextlib.contextmanager
    def dropout_rate(self, rate: Optional[float]):
        """`set_dropout` for the duration of a ``with`` block."""
        old = self.dropout.rate if self.dropout is not None else None
        self.set_dropout(rate)
        try:
            yield
        finally:
            self.set_dropout(old)


def build_classifier(weights: str = "imagenet", include_top: bool = True, image_size: int = 224,
                     seed: int = 0, dropout: float = 0.5, units: int = 1,
                     activation: str = "sigmoid") -> Classifier:
    """Builds the VGG16 classifier (see the module docstring).

    Without ``include_top``, the head is flatten -> ``fc1`` (256 units, ReLU, new)
    -> dropout -> ``predictions``. With it, VGG16's own ``fc1``/``fc2`` are kept
    and only ``predictions`` is new, as in the reference write-up. ``units`` and
    ``activation`` shape the output layer (`features.task.Task.units`/``activation``).
    """
    vgg = weights_lib.load_vgg16(weights, include_top, image_size, seed)
    stem_input = keras.Input((image_size, image_size, 3), name="image")

    def chain(inputs, names):
        x = inputs
        for name in names:
            x = vgg.get_layer(name)(x)
        return x

    stem_names = [l.name for l in vgg.layers if l.name.split("_")[0] in
                  ("block1", "block2", "block3", "block4")]
    block5_names = [l.name for l in vgg.layers if l.name.startswith("block5_")]
    stem = keras.Model(stem_input, chain(stem_input, stem_names), name=STEM)
    block4 = keras.Input(stem.output.shape[1:], name="block4_pool_features")
    block5 = keras.Model(block4, chain(block4, block5_names), name=BLOCK5)
    features = keras.Input(block5.output.shape[1:], name="block5_pool_features")
    # The head computes in float32 whatever the precision policy: the conv base is
    # where the FLOPs are (bfloat16 halves extraction time on AVX512-BF16), the
    # dense layers cost next to nothing either way, and a 16-bit head draws other
    # dropout masks and rounds the small logit differences training lives on
    # (docs/benchmarks.md, "precision per part"). A 16-bit sigmoid also saturates.
    x = keras.layers.Flatten(name=FLATTEN, dtype="float32")(features)
    if include_top:
        for name in (FC1, FC2):
            source = vgg.get_layer(name)
            dense = keras.layers.Dense(source.units, activation="relu", name=name,
                                       dtype="float32")
            x = dense(x)
            dense.set_weights(source.get_weights())
    else:
        x = keras.layers.Dense(NO_TOP_HIDDEN_UNITS, activation="relu", name=FC1,
                               dtype="float32")(x)
        x = keras.layers.Dropout(dropout, name=DROPOUT, seed=seed, dtype="float32")(x)
    # Small initial weights keep the first predictions near uniform even when the
    # incoming features are large (VGG activations reach the thousands).
    outputs = keras.layers.Dense(units, activation=activation, name=PREDICTIONS,
                                 dtype="float32",
                                 kernel_initializer=keras.initializers.RandomNormal(
                                     stddev=1e-3, seed=seed))(x)
    head = keras.Model(features, outputs, name=HEAD)
    # The frozen base runs in inference mode; VGG16 has no BatchNorm, but this is
    # what keeps a future backbone with BatchNorm from silently updating it.
    image = keras.Input((image_size, image_size, 3), name="image")
    model = keras.Model(image, head(block5(stem(image, training=False))), name="vgg16_classifier")
    return Classifier(stem=stem, block5=block5, head=head, model=model, include_top=include_top)


@contextlib.contextmanager
def without_training_state(model: keras.Model):
    """Within the block, saving ``model`` writes weights and architecture only.

    Training compiles the classifier's own sub-models (the head when it trains on
    cached ``block5_pool`` features, the whole model when fine-tuning from images),
    and Keras saves a compiled model's optimizer with it: Adam's two moments are
    twice the trained weights (51 MB for the 224 px head), useless to prediction,
    and its compile config makes a plain ``load_model`` warn about them.
    """
    held = []
    for sub in [model] + _nested_models(model):
        if getattr(sub, "compiled", False) or getattr(sub, "optimizer", None) is not None:
            held.append((sub, sub.optimizer, sub.compiled))
            sub.optimizer, sub.compiled = None, False
    try:
        yield model
    finally:
        for sub, optimizer, compiled in held:
            sub.optimizer, sub.compiled = optimizer, compiled


def _nested_models(model: keras.Model) -> List[keras.Model]:
    out = []
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.Model):
            out += [layer] + _nested_models(layer)
    return out


def from_model(model: keras.Model) -> Classifier:
    """The `Classifier` view of a loaded ``model.keras`` (its sub-models by name)."""
    try:
        stem, block5, head = (model.get_layer(n) for n in (STEM, BLOCK5, HEAD))
    except ValueError as err:
        raise ConfigError(f"{model.name} is not a VGG16 classifier of this tool "
                          f"(expected sub-models {STEM}, {BLOCK5}, {HEAD}).") from err
    include_top = any(l.name == FC2 for l in head.layers)
    return Classifier(stem=stem, block5=block5, head=head, model=model, include_top=include_top)


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """Adam, SGD with Nesterov momentum 0.9 (the reference's fine-tuning choice), or RMSprop."""
    name = check_optimizer(name)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    return keras.optimizers.RMSprop(learning_rate)
