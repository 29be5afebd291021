"""The VGG16 backbone, its weights, and the classifier built on it.

The classifier is split into three Keras sub-models that share layers with the
whole, so each stage can run from where the feature cache stops:

    image --[vgg16_stem: block1..block4]--> block4_pool
          --[vgg16_block5: block5]-------> block5_pool
          --[head: flatten, fc1, (fc2), predictions]--> P(positive)

A head trained on cached ``block5_pool`` features therefore *is* the head of the
full model: it drops onto the conv base unchanged for fine-tuning and export.

Head choice: one sigmoid unit named ``predictions`` (it replaces VGG16's
1000-way layer). Its output is the probability of the positive class, so the
standard binary cross-entropy, accuracy and ROC AUC apply directly.
"""

import dataclasses
import hashlib
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence

import h5py
import keras
import numpy as np

from pipeline.errors import ConfigError, UserError

# What keras.applications downloads into ~/.keras/models for each variant.
IMAGENET_FILES = {
    True: "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
    False: "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
}
BLOCKS = ("block1", "block2", "block3", "block4", "block5", "fc", "predictions")


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One row of the scenario table: what trains, where it starts, how fast it learns.

    Attributes:
      name: "A", "B" or "C".
      blocks: the blocks that train (names from `BLOCKS`).
      learning_rate: default heads-stage learning rate. Measured on real photos with
        ImageNet-derived weights (docs/benchmarks.md): the output layer alone (A)
        wants 1e-3, as in the reference write-up; training the dense layers (B) or
        block5 (C) from the cache at 1e-3 overfits within an epoch or two (C
        collapsed to AUC 0.65), so they get the reference's 1e-4.
      description: one line for --help and logs.
    """
    name: str
    blocks: tuple
    learning_rate: float
    description: str

    def start_layer(self, include_top: bool) -> str:
        """The cached layer this scenario trains from (see `start_layer`)."""
        return start_layer(self.blocks, include_top)


SCENARIOS = {
    "A": Scenario("A", ("predictions",), 1e-3, "only the new output layer"),
    "B": Scenario("B", ("fc", "predictions"), 1e-4, "all dense layers"),
    "C": Scenario("C", ("block5", "fc", "predictions"), 1e-4,
                  "dense layers plus the last conv block (block5)"),
}
SCENARIO_HELP = "; ".join(f"{s.name} = {s.description}" for s in SCENARIOS.values())
# Without the ImageNet top, the head gets one new hidden layer of this width.
NO_TOP_HIDDEN_UNITS = 256
TOP_IMAGE_SIZE = 224


class WeightsError(UserError):
    """VGG16 weights could not be obtained or do not fit the model."""


def weights_identity(weights: str, seed: int) -> str:
    """A string that changes whenever the backbone's initial weights would change."""
    if weights == "none":
        return f"none(seed={seed})"
    if weights == "imagenet":
        return "imagenet"
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"file:{os.path.basename(weights)}:sha256={digest.hexdigest()}"


def _imagenet_vgg16(include_top, input_shape):
    try:
        return keras.applications.VGG16(weights="imagenet", include_top=include_top,
                                        input_shape=input_shape)
    except Exception as err:  # Keras raises a bare Exception for fetch failures.
        fname = IMAGENET_FILES[include_top]
        cached = os.path.join(os.path.expanduser("~"), ".keras", "models", fname)
        raise WeightsError(
            f"Could not load the ImageNet VGG16 weights ({type(err).__name__}: {err}). Keras "
            f"looks for {cached} and downloads it when it is missing, which needs internet "
            f"access. Alternatives: copy {fname} to {os.path.dirname(cached)}/ from a machine "
            "that has it; pass --weights=/path/to/vgg16_weights.h5 (a VGG16 weights file, "
            "with or without top); or pass --weights=none to train from random "
            "initialisation (much lower accuracy).") from err


def _read_legacy_h5(path) -> Optional[Dict[str, List[np.ndarray]]]:
    """Reads a Keras-2 style weights file (the ImageNet download) by layer name."""
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            return None
        weights = {}
        for raw in group.attrs["layer_names"]:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            g = group[name]
            names = [n.decode() if isinstance(n, bytes) else str(n)
                     for n in g.attrs.get("weight_names", [])]
            if names:
                weights[name] = [np.asarray(g[n]) for n in names]
        return weights


def _read_weights_file(path) -> Dict[str, List[np.ndarray]]:
    """Reads VGG16 weights from ``.h5`` (Keras 2 layout) or ``.weights.h5`` (Keras 3)."""
    if not os.path.isfile(path):
        raise WeightsError(f"--weights={path!r}: no such file. Expected 'imagenet', 'none', "
                           "or the path of a VGG16 .h5 / .weights.h5 file.")
    try:
        legacy = _read_legacy_h5(path)
    except OSError as err:
        raise WeightsError(f"--weights={path}: not a readable HDF5 weights file ({err}).") from err
    if legacy is not None:
        return legacy
    # Keras 3 files name variables by position, not by layer: load them into a
    # plain VGG16 of each variant and read back by layer name.
    errors = []
    for include_top in (False, True):
        shape = (TOP_IMAGE_SIZE, TOP_IMAGE_SIZE, 3) if include_top else (32, 32, 3)
        source = keras.applications.VGG16(weights=None, include_top=include_top,
                                          input_shape=shape)
        try:
            source.load_weights(path)
        except Exception as err:  # Keras raises ValueError or KeyError on mismatch.
            errors.append(f"{'with' if include_top else 'without'} top: {err}")
            continue
        return {layer.name: layer.get_weights() for layer in source.layers if layer.weights}
    raise WeightsError(f"--weights={path} does not hold VGG16 weights ("
                       + "; ".join(errors) + ").")


def _assign_weights(model: keras.Model, weights: Dict[str, List[np.ndarray]], path: str):
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            hint = (" The file has no dense top: pass --noinclude_top."
                    if layer.name.startswith("fc") else "")
            raise WeightsError(f"--weights={path} has no weights for layer {layer.name!r}."
                               + hint)
        expected = [tuple(w.shape) for w in layer.weights]
        found = [tuple(w.shape) for w in weights[layer.name]]
        if expected != found:
            raise WeightsError(f"--weights={path}: layer {layer.name!r} expects weight shapes "
                               f"{expected} but the file has {found}.")
        layer.set_weights(weights[layer.name])


def _he_initialise(model: keras.Model, seed: int) -> None:
    """Re-draws kernels with He-normal scaling (biases stay zero).

    Keras' default Glorot init shrinks activations about 100-fold by block5 in
    a 13-layer ReLU stack; He scaling keeps them at the magnitude pretrained
    VGG16 features have, so the "none" path exercises the same numerics as real
    weights and its features stay usable.
    """
    for i, layer in enumerate(l for l in model.layers if l.weights):
        init = keras.initializers.HeNormal(seed=seed * 1000 + i)
        layer.kernel.assign(init(layer.kernel.shape))


def load_vgg16(weights: str, include_top: bool, image_size: int, seed: int = 0) -> keras.Model:
    """VGG16 from keras.applications without the 1000-way layer.

    Args:
      weights: "imagenet" (Keras' download and cache under ~/.keras/models),
        "none" (random initialisation, seeded), or the path of a VGG16
        ``.h5``/``.weights.h5`` file, with or without top.
      include_top: keep the ImageNet dense layers ``fc1``, ``fc2`` (requires
        ``image_size`` 224).
      image_size: square input size.
      seed: seeds random initialisation.

    Returns:
      A model from the image to ``fc2`` (with top) or ``block5_pool`` (without).

    Raises:
      WeightsError: weights unavailable or not fitting; never falls back silently.
      ConfigError: include_top with an image size other than 224.
    """
    if include_top and image_size != TOP_IMAGE_SIZE:
        raise ConfigError(
            f"--include_top keeps VGG16's fc1/fc2, which need {TOP_IMAGE_SIZE}x"
            f"{TOP_IMAGE_SIZE} input; got --image_size={image_size}. Use "
            f"--image_size={TOP_IMAGE_SIZE} or --noinclude_top.")
    if image_size < 32:
        raise ConfigError(f"--image_size must be at least 32 (VGG16 halves it five times); "
                          f"got {image_size}.")
    shape = (image_size, image_size, 3)
    keras.utils.set_random_seed(seed)
    if weights == "imagenet":
        vgg = _imagenet_vgg16(include_top, shape)
    else:
        vgg = keras.applications.VGG16(weights=None, include_top=include_top, input_shape=shape)
        if weights == "none":
            _he_initialise(vgg, seed)
        else:
            _assign_weights(vgg, _read_weights_file(weights), weights)
    if include_top:  # drop the 1000-way "predictions" layer
        vgg = keras.Model(vgg.input, vgg.get_layer("fc2").output, name="vgg16")
    return vgg


@dataclasses.dataclass
class Classifier:
    """VGG16 conv base plus a binary head, as shareable sub-models.

    Attributes:
      stem: image -> block4_pool (blocks 1-4).
      block5: block4_pool -> block5_pool.
      head: block5_pool -> P(positive) (flatten, fc1, [fc2], predictions).
      model: image -> P(positive), the composition of the three.
      include_top: whether fc1/fc2 are VGG16's ImageNet layers.
    """
    stem: keras.Model
    block5: keras.Model
    head: keras.Model
    model: keras.Model
    include_top: bool

    def layers(self) -> List[keras.layers.Layer]:
        """Every leaf layer with weights, in network order."""
        return [l for sub in (self.stem, self.block5, self.head) for l in sub.layers if l.weights]

    def model_from(self, layer_name: str) -> keras.Model:
        """The part of the network that runs after ``layer_name`` (a cached layer).

        "input" gives the whole model; "block4_pool" gives block5 + head;
        "block5_pool" the head; "fc2" only the output layer.
        """
        if layer_name == "input":
            return self.model
        if layer_name == "block4_pool":
            inputs = keras.Input(self.block5.input.shape[1:], name="block4_pool_features")
            return keras.Model(inputs, self.head(self.block5(inputs)), name="block5_and_head")
        if layer_name == "block5_pool":
            return self.head
        if layer_name == "fc2" and self.include_top:
            inputs = keras.Input(self.head.get_layer("fc2").output.shape[1:], name="fc2_features")
            return keras.Model(inputs, self.head.get_layer("predictions")(inputs),
                               name="predictions_only")
        raise ConfigError(f"Cannot start the network at {layer_name!r}.")

    def trunk(self, layer_name: str) -> keras.Model:
        """The frozen part below ``layer_name``: image -> that layer's output.

        The complement of `model_from`: ``model_from(l)(trunk(l)(x)) == model(x)``.
        """
        if layer_name == "input":
            raise ConfigError("The whole network trains: there is no frozen trunk.")
        return keras.Model(self.model.input, self.feature_model([layer_name]).output[layer_name],
                           name=f"trunk_to_{layer_name}")

    def feature_model(self, layer_names: Sequence[str]) -> keras.Model:
        """A model from the image to a dict of the named intermediate outputs."""
        image = self.model.input
        block4 = self.stem(image)
        block5 = self.block5(block4)
        outputs = {"block4_pool": block4, "block5_pool": block5}
        if self.include_top:
            x = block5
            for name in ("flatten", "fc1", "fc2"):
                x = self.head.get_layer(name)(x)
            outputs["fc2"] = x
        unknown = [n for n in layer_names if n not in outputs]
        if unknown:
            raise ConfigError(f"Cannot cache layer(s) {', '.join(unknown)}; available: "
                              f"{', '.join(outputs)}.")
        return keras.Model(image, {n: outputs[n] for n in layer_names}, name="features")


def build_classifier(weights: str = "imagenet", include_top: bool = True, image_size: int = 224,
                     seed: int = 0, dropout: float = 0.5) -> Classifier:
    """Builds the VGG16 binary classifier (see the module docstring).

    Without ``include_top``, the head is flatten -> ``fc1`` (256 units, ReLU, new)
    -> dropout -> ``predictions``. With it, VGG16's own ``fc1``/``fc2`` are kept
    and only ``predictions`` is new, as in the reference write-up.
    """
    vgg = load_vgg16(weights, include_top, image_size, seed)
    stem_input = keras.Input((image_size, image_size, 3), name="image")

    def chain(inputs, names):
        x = inputs
        for name in names:
            x = vgg.get_layer(name)(x)
        return x

    stem_names = [l.name for l in vgg.layers if l.name.split("_")[0] in
                  ("block1", "block2", "block3", "block4")]
    block5_names = [l.name for l in vgg.layers if l.name.startswith("block5_")]
    stem = keras.Model(stem_input, chain(stem_input, stem_names), name="vgg16_stem")
    block4 = keras.Input(stem.output.shape[1:], name="block4_pool_features")
    block5 = keras.Model(block4, chain(block4, block5_names), name="vgg16_block5")
    features = keras.Input(block5.output.shape[1:], name="block5_pool_features")
    # The head computes in float32 whatever the precision policy: the conv base is
    # where the FLOPs are (bfloat16 halves extraction time on AVX512-BF16), the
    # dense layers cost next to nothing either way, and a 16-bit head draws other
    # dropout masks and rounds the small logit differences training lives on
    # (docs/benchmarks.md, "precision per part"). A 16-bit sigmoid also saturates.
    x = keras.layers.Flatten(name="flatten", dtype="float32")(features)
    if include_top:
        for name in ("fc1", "fc2"):
            source = vgg.get_layer(name)
            dense = keras.layers.Dense(source.units, activation="relu", name=name,
                                       dtype="float32")
            x = dense(x)
            dense.set_weights(source.get_weights())
    else:
        x = keras.layers.Dense(NO_TOP_HIDDEN_UNITS, activation="relu", name="fc1",
                               dtype="float32")(x)
        x = keras.layers.Dropout(dropout, name="dropout", seed=seed, dtype="float32")(x)
    # Small initial weights keep the first predictions near 0.5 even when the
    # incoming features are large (VGG activations reach the thousands).
    outputs = keras.layers.Dense(1, activation="sigmoid", name="predictions", dtype="float32",
                                 kernel_initializer=keras.initializers.RandomNormal(
                                     stddev=1e-3, seed=seed))(x)
    head = keras.Model(features, outputs, name="head")
    # The frozen base runs in inference mode; VGG16 has no BatchNorm, but this is
    # what keeps a future backbone with BatchNorm from silently updating it.
    image = keras.Input((image_size, image_size, 3), name="image")
    model = keras.Model(image, head(block5(stem(image, training=False))), name="vgg16_binary")
    return Classifier(stem=stem, block5=block5, head=head, model=model, include_top=include_top)


def block_of(layer_name: str) -> Optional[str]:
    """The trainable block a layer belongs to (``block1``..``block5``, ``fc``, ``predictions``)."""
    prefix = layer_name.split("_")[0]
    if prefix in BLOCKS[:5]:
        return prefix
    if layer_name in ("fc1", "fc2"):
        return "fc"
    if layer_name == "predictions":
        return "predictions"
    return None


def parse_blocks(spec: str) -> List[str]:
    """Parses ``--trainable_blocks`` such as "block4,block5,fc" (``predictions`` is implied)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in BLOCKS]
    if not names or unknown:
        raise ConfigError(
            f"--trainable_blocks={spec!r}: {', '.join(map(repr, unknown)) or 'nothing given'} "
            f"matches no block; choose from {', '.join(BLOCKS)}.")
    return sorted(set(names) | {"predictions"}, key=BLOCKS.index)


def get_scenario(scenario: str) -> Scenario:
    """The scenario table's row for a name such as "b" or " C "."""
    try:
        return SCENARIOS[scenario.strip().upper()]
    except KeyError:
        raise ConfigError(f"Unknown scenario {scenario!r}; choose from "
                          f"{', '.join(SCENARIOS)} ({SCENARIO_HELP}).") from None


def scenario_blocks(scenario: str) -> List[str]:
    """The blocks that train in a named scenario."""
    return list(get_scenario(scenario).blocks)


def start_layer(blocks: Sequence[str], include_top: bool) -> str:
    """The highest cached layer below every trainable block ("input" if none is cached).

    Scenario A (output layer only) starts from ``fc2`` when the ImageNet top is
    kept, else from ``block5_pool``; B from ``block5_pool``; C from ``block4_pool``.
    """
    blocks = set(blocks)
    if blocks & {"block1", "block2", "block3", "block4"}:
        return "input"
    if "block5" in blocks:
        return "block4_pool"
    if "fc" in blocks or not include_top:
        return "block5_pool"
    return "fc2"


def set_trainable(classifier: Classifier, blocks: Iterable[str], log: bool = True) -> List[str]:
    """Makes exactly the layers of ``blocks`` trainable and freezes the rest.

    Returns the names of the trainable layers. Remember to (re)compile after.
    """
    blocks = set(blocks)
    unknown = blocks - set(BLOCKS)
    if unknown:
        raise ConfigError(f"Unknown block(s) {', '.join(sorted(unknown))}; choose from "
                          f"{', '.join(BLOCKS)}.")
    trainable = []
    for layer in classifier.layers():
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


OPTIMIZERS = ("adam", "sgd", "rmsprop")


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """Adam, SGD with Nesterov momentum 0.9 (the reference's fine-tuning choice), or RMSprop."""
    name = name.strip().lower()
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    raise ConfigError(f"Unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}.")


def compile_model(model: keras.Model, learning_rate: float,
                  optimizer: str = "adam") -> keras.Model:
    """Binary cross-entropy with accuracy and ROC AUC (named ``auc``); Adam by default."""
    model.compile(optimizer=make_optimizer(optimizer, learning_rate),
                  loss=keras.losses.BinaryCrossentropy(),
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy"),
                           keras.metrics.AUC(name="auc")])
    return model
