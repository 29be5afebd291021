"""The classifier: a backbone (VGG16 by default) with a new head.

The classifier is split into three Keras sub-models that share layers with the
whole, so each stage can run from where the feature cache stops. For VGG16:

    image --[vgg16_stem: block1..block4]--> block4_pool
          --[vgg16_block5: block5]-------> block5_pool
          --[head: flatten, fc1, (fc2 | dropout), predictions]--> probabilities

and for any other backbone the same shape with the names its description
(`features.networks.Backbone`) gives: stem -> ``stem_layer`` -> last stage ->
``feature_layer`` -> head (global average pooling, fc1, dropout, predictions).

A head trained on cached feature-map features therefore *is* the head of the
full model: it drops onto the conv base unchanged for fine-tuning and export.

The output layer ``predictions`` replaces the ImageNet 1000-way layer: one sigmoid
unit for a binary task (P(positive class)), K softmax units for K classes, K
sigmoid units for K labels (see `features.task`).
"""

import contextlib
import dataclasses
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Union

import keras

from small_photo_classifier.features import networks, zoo
from small_photo_classifier.features import weights as weights_lib
from small_photo_classifier.features.scenarios import (BLOCK5, DROPOUT, FC1, FC2, FLATTEN, GAP,
                                                       HEAD, INPUT, NO_TOP_HIDDEN_UNITS,
                                                       PREDICTIONS, STEM, block_of, check_optimizer)
from small_photo_classifier.pipeline.errors import ConfigError

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

    def get_config(self):
        # For TensorBoard's graph summary (``model.to_json()``) only: the class is not
        # registered, so a model holding it still cannot be loaded back, on purpose.
        return {**super().get_config(),
                "inner": keras.saving.serialize_keras_object(self.inner)}


@dataclasses.dataclass
class Classifier:
    """A backbone's conv base plus a new head, as shareable sub-models.

    Attributes:
      stem: image -> ``net.stem_layer`` (every stage but the last; VGG16: blocks 1-4).
      last: ``net.stem_layer`` -> ``net.feature_layer`` (the last stage; VGG16: block5).
      head: feature map -> probabilities (pool, fc1, [fc2 | dropout], predictions).
      model: image -> probabilities, the composition of the three.
      include_top: whether fc1/fc2 are VGG16's ImageNet layers.
      net: the backbone's description (`features.networks.Backbone`).
      stage_of: layer name -> stage for the backbone's layers (VGG16: by name).
    """
    stem: keras.Model
    last: keras.Model
    head: keras.Model
    model: keras.Model
    include_top: bool
    net: networks.Backbone
    stage_of: Optional[Dict[str, str]] = None

    @property
    def units(self) -> int:
        """Outputs of the ``predictions`` layer (1 for a binary task)."""
        return int(self.head.get_layer(PREDICTIONS).units)

    def layers(self) -> List[keras.layers.Layer]:
        """Every leaf layer with weights, in network order."""
        return [l for sub in (self.stem, self.last, self.head) for l in leaves(sub)
                if l.weights]

    @property
    def computes_in(self) -> str:
        """The dtype policy the backbone computes in (a loaded file keeps its own)."""
        return next(l for l in leaves(self.stem) if l.weights).dtype_policy.name

    def block_of(self, layer_name: str) -> Optional[str]:
        """The stage (or ``fc``, ``predictions``) a layer belongs to, or None."""
        if self.stage_of is None or layer_name in (FC1, FC2, PREDICTIONS):
            return block_of(layer_name)
        return self.stage_of.get(layer_name)

    def start_layer(self, blocks: Iterable[str]) -> str:
        """The cached layer training ``blocks`` starts from (`networks.Backbone.start_layer`)."""
        return self.net.start_layer(list(blocks), self.include_top)

    def model_from(self, layer_name: str) -> keras.Model:
        """The part of the network that runs after ``layer_name``.

        `INPUT` gives the whole model; the stem layer (VGG16: ``block4_pool``) the last
        stage + head; the feature layer (``block5_pool``) the head; a head layer
        (``fc1``, ``fc2``, ...) the head layers after it, e.g. ``fc2`` -> only
        ``predictions``. Sub-models share their layers with the whole.
        """
        if layer_name == INPUT:
            return self.model
        if layer_name == self.net.stem_layer:
            inputs = keras.Input(self.last.input.shape[1:], name=f"{layer_name}_features")
            return keras.Model(inputs, self.head(self.last(inputs, training=False)),
                               name="last_stage_and_head")
        if layer_name == self.net.feature_layer:
            return self.head
        names = [l.name for l in self.head.layers[1:]]  # a chain: input, pool, ...
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
        sub-model (stem, last stage) run as one XLA-compiled function when
        ``compiled_convs`` (see `precision.compile_convs`) and the backbone is one
        where that was measured faster (`networks.Backbone.xla_convs`). The dense head stays
        outside XLA, so dropout draws the same masks either way. Never saved: it
        holds a `CompiledConvs` layer, which is not serialisable on purpose."""
        if not (compiled_convs and self.net.xla_convs) \
                or layer_name not in (INPUT, self.net.stem_layer):
            return self.model_from(layer_name)
        if layer_name == INPUT:
            inputs = keras.Input(self.model.input.shape[1:], name="image")
            x = CompiledConvs(self.last)(CompiledConvs(self.stem)(inputs))
        else:
            inputs = keras.Input(self.last.input.shape[1:], name=f"{layer_name}_features")
            x = CompiledConvs(self.last)(inputs)
        return keras.Model(inputs, self.head(x), name=f"train_from_{layer_name}")

    def _head_chain(self, x, layer_name: str):
        names = [l.name for l in self.head.layers[1:]]
        if layer_name not in names:
            raise ConfigError(f"{layer_name!r} is not a layer of the head.")
        for name in names[:names.index(layer_name) + 1]:
            x = self.head.get_layer(name)(x, training=False) if name == DROPOUT \
                else self.head.get_layer(name)(x)
        return x

    def head_span(self, layer_name: str) -> keras.Model:
        """The frozen head layers from the feature map to ``layer_name``'s output (a head
        layer such as ``flatten``): ``trunk(layer) == head_span(layer)(trunk(feature))``."""
        inputs = keras.Input(self.head.input.shape[1:], name=f"{self.net.feature_layer}_features")
        return keras.Model(inputs, self._head_chain(inputs, layer_name),
                           name=f"{self.net.feature_layer}_to_{layer_name}")

    def trunk(self, layer_name: str) -> keras.Model:
        """The frozen part below ``layer_name``: image -> that layer's output.

        The complement of `model_from`: ``model_from(l)(trunk(l)(x)) == model(x)``.
        """
        if layer_name == INPUT:
            raise ConfigError("The whole network trains: there is no frozen trunk.")
        image = keras.Input(self.model.input.shape[1:], name="image")
        x = self.stem(image, training=False)
        if layer_name != self.net.stem_layer:
            x = self.last(x, training=False)
        if layer_name not in (self.net.stem_layer, self.net.feature_layer):
            try:
                x = self._head_chain(x, layer_name)
            except ConfigError:
                raise ConfigError(f"Cannot end a trunk at {layer_name!r}.") from None
        return keras.Model(image, x, name=f"trunk_to_{layer_name}")

    def feature_model(self, layer_names: Sequence[str]) -> keras.Model:
        """A model from the image to a dict of the named intermediate outputs."""
        image = self.model.input
        stem = self.stem(image, training=False)
        features = self.last(stem, training=False)
        outputs = {self.net.stem_layer: stem, self.net.feature_layer: features}
        if self.include_top:
            x = features
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

        ``blocks`` are the backbone's stage names (``last`` = its last stage), ``fc``
        and ``predictions``. BatchNormalization layers stay frozen (and run on their
        ImageNet statistics): a few hundred photos in batches of 32 are too few to
        re-estimate them, and unfreezing them is the classic way fine-tuning breaks
        a pretrained network. Returns the names of the trainable layers; remember to
        (re)compile after.
        """
        blocks = set(self.net.resolve_blocks(list(blocks)))
        trainable = []
        for layer in self.layers():
            layer.trainable = (self.block_of(layer.name) in blocks
                               and not isinstance(layer, keras.layers.BatchNormalization))
            if layer.trainable:
                trainable.append(layer.name)
        missing = [b for b in blocks if not any(self.block_of(n) == b for n in trainable)]
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


def leaves(model: keras.Model) -> List[keras.layers.Layer]:
    """The layers of ``model`` with nested models opened, in order."""
    out = []
    for layer in model.layers:
        out += leaves(layer) if isinstance(layer, keras.Model) else [layer]
    return out


def _vgg16_parts(weights, include_top, image_size, seed):
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
    return vgg, stem, block5


def build_classifier(weights: str = "imagenet", include_top: bool = True, image_size: int = 224,
                     seed: int = 0, dropout: float = 0.5, units: int = 1,
                     activation: str = "sigmoid", *,
                     backbone: Union[str, networks.BackboneChoice]) -> Classifier:
    """Builds the classifier on ``backbone`` (always named; see the module docstring).

    VGG16's head: without ``include_top``, flatten -> ``fc1`` (256 units, ReLU,
    new) -> dropout -> ``predictions``; with it, VGG16's own ``fc1``/``fc2`` are
    kept and only ``predictions`` is new, as in the reference write-up. Every other
    backbone: global average pooling -> ``fc1`` -> dropout -> ``predictions``
    (``include_top`` means nothing there). ``units`` and ``activation`` shape the
    output layer (`features.task.Task.units`/``activation``).
    """
    choice = (backbone if isinstance(backbone, networks.BackboneChoice)
              else networks.check_choice(backbone))
    vgg, stage_of = None, None
    net = choice.described()
    if net is not None and net.own_loader:
        vgg, stem, last = _vgg16_parts(weights, include_top, image_size, seed)
    else:
        net, stage_of, stem, last = zoo.build(choice, weights, image_size, seed)
        include_top = False
        # The new head's initial weights follow --seed (VGG16's loader seeds before
        # building; a file loads without drawing anything).
        keras.utils.set_random_seed(seed)
    features = keras.Input(last.output.shape[1:], name=f"{net.feature_layer}_features")
    # The head computes in float32 whatever the precision policy: the conv base is
    # where the FLOPs are (bfloat16 halves extraction time on AVX512-BF16), the
    # dense layers cost next to nothing either way, and a 16-bit head draws other
    # dropout masks and rounds the small logit differences training lives on
    # (docs/benchmarks.md, "precision per part"). A 16-bit sigmoid also saturates.
    if net.pooling == "flatten":
        x = keras.layers.Flatten(name=FLATTEN, dtype="float32")(features)
    else:
        x = keras.layers.GlobalAveragePooling2D(name=GAP, dtype="float32")(features)
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
    # The frozen base runs in inference mode, and so does a training last stage:
    # BatchNorm keeps its ImageNet statistics (see `Classifier.set_trainable`).
    image = keras.Input((image_size, image_size, 3), name="image")
    model = keras.Model(image, head(last(stem(image, training=False), training=False)),
                        name=f"{net.slug}_classifier")
    return Classifier(stem=stem, last=last, head=head, model=model, include_top=include_top,
                      net=net, stage_of=stage_of)


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


def _contract_of(layers) -> str:
    """The input contract a loaded stem's first layers implement (`zoo._contract_layers`)."""
    names = {layer.name: layer for layer in layers}
    if "input_contract_standardise" in names:
        return networks.IMAGENET_MEAN_STD
    if "input_contract" in names:
        return (networks.MINUS_ONE_TO_ONE if names["input_contract"].offset
                else networks.ZERO_TO_ONE)
    if any(isinstance(layer, zoo.CaffeToRGB) for layer in layers):
        return networks.RGB255
    return networks.CAFFE


def from_model(model: keras.Model) -> Classifier:
    """The `Classifier` view of a loaded ``model.keras``: its three sub-models (stem,
    last stage, head, in that order) and the backbone's description read back from
    them (the sub-models' input names carry the cached layers' names)."""
    subs = [l for l in model.layers if isinstance(l, keras.Model)]
    names = [s.name for s in subs]
    if len(subs) != 3 or names[2] != HEAD:
        raise ConfigError(f"{model.name} is not a classifier of this tool (expected three "
                          f"sub-models: stem, last stage, {HEAD}; found {names or 'none'}).")
    stem, last, head = subs
    include_top = any(l.name == FC2 for l in head.layers)
    if names[:2] == [STEM, BLOCK5]:  # the reference's own sub-model names
        return Classifier(stem=stem, last=last, head=head, model=model,
                          include_top=include_top, net=networks.VGG16)
    suffix = "_features"
    stem_layer = last.input.name[:-len(suffix)] if last.input.name.endswith(suffix) else ""
    feature_layer = head.input.name[:-len(suffix)] if head.input.name.endswith(suffix) else ""
    stem_leaves = [l.name for l in leaves(stem)[1:] if not isinstance(l, keras.layers.InputLayer)]
    stage_of = networks.stages_by_name(stem_leaves) or {n: "stem" for n in stem_leaves}
    stage_of.update({l.name: "last" for l in leaves(last)})
    stages = tuple(dict.fromkeys(stage_of.values()))
    net = networks.Backbone(
        name=model.name[:-len("_classifier")] if model.name.endswith("_classifier")
        else model.name, source=f"loaded:{model.name}", stages=stages, stem_layer=stem_layer,
        feature_layer=feature_layer,
        preprocessing=_contract_of(leaves(stem)),
        pooling="flatten" if any(l.name == FLATTEN for l in head.layers) else "avg")
    return Classifier(stem=stem, last=last, head=head, model=model, include_top=include_top,
                      net=net, stage_of=stage_of)


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """Adam, SGD with Nesterov momentum 0.9 (the reference's fine-tuning choice), or RMSprop."""
    name = check_optimizer(name)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    return keras.optimizers.RMSprop(learning_rate)
