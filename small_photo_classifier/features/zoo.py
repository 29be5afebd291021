"""Backbones other than VGG16: built from `keras.applications` or a ``.keras`` file,
split into stages, and described (`features.networks.Backbone`).

VGG16 keeps its own loader (`features.weights`), whose numbers earlier runs
reproduce; this module gives every other network the same shape: a conv base
without its classifier, the layer -> stage map, and the two cached layers.
"""

import logging
import os
from typing import Dict, Optional, Tuple

import keras

from small_photo_classifier.features import networks
from small_photo_classifier.features.weights import WeightsError, weights_identity
from small_photo_classifier.pipeline import ops
from small_photo_classifier.pipeline.errors import ConfigError


# The serialisation key keeps the project's first name: model.keras files saved by
# every earlier version name their layers by it, and load unchanged.
@keras.saving.register_keras_serializable(package="invasive_vgg")
class CaffeToRGB(keras.layers.Layer):
    """Undoes the input graph's VGG mean-centring: BGR minus the ImageNet means ->
    RGB in [0, 255]. Exact (a sign flip and an addition), so a network that
    preprocesses inside itself sees the pixels it was trained on."""

    def call(self, inputs):
        return ops.vgg_mean_uncentre_image(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape


def _imagenet(constructor, name, shape):
    try:
        return constructor(weights="imagenet", include_top=False, input_shape=shape)
    except Exception as err:  # Keras raises a bare Exception for fetch failures.
        cache = os.path.join(os.path.expanduser("~"), ".keras", "models")
        raise WeightsError(
            f"Could not load the ImageNet weights of {name} ({type(err).__name__}: {err}). "
            f"Keras looks for them in {cache}/ and downloads them when missing, which needs "
            f"internet access. Alternatives: copy the file there from a machine that has "
            f"it; pass --weights=/path/to/{name}.weights.h5; pass --backbone=PATH.keras (an "
            "image network saved with Keras, weights inside); or pass --weights=none to "
            "train from random initialisation (much lower accuracy).") from err


def load_named(name: str, weights: str, image_size: int, seed: int) -> keras.Model:
    """A `networks.NAMED` network without its classifier, at ``image_size``."""
    constructor = getattr(keras.applications, networks.NAMED[name][0])
    shape = (image_size, image_size, 3)
    keras.utils.set_random_seed(seed)
    if weights == "imagenet":
        return _imagenet(constructor, name, shape)
    model = constructor(weights=None, include_top=False, input_shape=shape)
    if weights != "none":
        try:
            model.load_weights(weights)
        except Exception as err:  # Keras raises ValueError or KeyError on mismatch.
            raise WeightsError(f"--weights={weights} does not hold {name} weights without "
                               f"the classifier top ({type(err).__name__}: {err}).") from err
    return model


def load_file(path: str) -> keras.Model:
    """A user's ``.keras`` image network, loaded safely (no Lambda layers)."""
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises many types for a bad or unsafe file.
        raise ConfigError(f"--backbone={path}: not a loadable Keras model file "
                          f"({type(err).__name__}: {err}). Expected a .keras file saved by "
                          "model.save(), without Lambda layers.") from err
    if len(model.inputs) != 1 or model.inputs[0].shape[-1] != 3:
        raise ConfigError(f"--backbone={path}: expected one RGB image input (..., 3); found "
                          f"{[tuple(i.shape) for i in model.inputs]}.")
    return model


def _spatial(layer) -> bool:
    shape = getattr(getattr(layer, "output", None), "shape", None)
    return shape is not None and len(shape) == 4


def _heights(model: keras.Model, layers, image_size: int) -> Dict[str, Optional[int]]:
    """Each layer's output height at ``image_size`` (None: not a feature map). A file's
    network may take any size, so its shapes say None: one forward pass tells."""
    spatial = [l for l in layers if _spatial(l)]
    probe = keras.Model(model.input, [l.output for l in spatial])
    import numpy as np
    outputs = probe(np.zeros((1, image_size, image_size, 3), "float32"))
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    heights = {l.name: int(o.shape[1]) for l, o in zip(spatial, outputs)}
    return {l.name: heights.get(l.name) for l in layers}


def _inbound(model: keras.Model) -> Dict[str, set]:
    """Layer name -> the names of the layers feeding it (from the functional config)."""
    def names(obj, out):
        if isinstance(obj, dict):
            history = obj.get("config", {}).get("keras_history") \
                if obj.get("class_name") == "__keras_tensor__" else None
            if history:
                out.add(history[0])
            for v in obj.values():
                names(v, out)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                names(v, out)
        return out
    return {l["name"]: names(l.get("inbound_nodes", []), set())
            for l in model.get_config()["layers"]}


def _entry(model: keras.Model, last_stage: set, name: str) -> str:
    """The one layer outside the last stage that feeds it: where the stem ends."""
    feeding = set().union(*(_inbound(model).get(n, set()) for n in last_stage)) - last_stage
    if len(feeding) != 1:
        raise ConfigError(f"--backbone={name}: the last stage is fed by "
                          f"{', '.join(sorted(feeding)) or 'nothing'}, not by one layer; name "
                          "the last layer of each stage with --stage_ends.")
    return feeding.pop()


def describe(model: keras.Model, choice: networks.BackboneChoice, preprocessing: str,
             image_size: int) -> Tuple[networks.Backbone, Dict[str, str]]:
    """The description of a built network and its layer -> stage map.

    The feature map is the last layer with a 4-D output (or ``--feature_layer``);
    layers after it (a classifier top) are not part of the backbone. The stages
    come from ``--stage_ends``, else the naming conventions, else the resolution.
    The stem layer is the last layer before the first layer of the last stage.
    """
    # Operations, not just layers: ``x + y`` in a functional model is an operation
    # (ConvNeXt's and MobileNetV3's residual adds) that belongs to a stage too.
    ops_ = list(model.operations)
    names = [l.name for l in ops_]
    if choice.feature_layer:
        if choice.feature_layer not in names:
            raise ConfigError(f"--feature_layer={choice.feature_layer!r}: no such layer in "
                              f"{choice.name}.")
        feature = choice.feature_layer
    else:
        spatial = [l.name for l in ops_ if _spatial(l)]
        if not spatial:
            raise ConfigError(f"--backbone={choice.name}: no layer with a spatial (4-D) "
                              "output; expected an image network.")
        feature = spatial[-1]
    body = names[1:names.index(feature) + 1]  # without the input layer
    how = "--stage_ends"
    if choice.stage_ends:
        stage_of = networks.stages_by_ends(body, choice.stage_ends)
    else:
        stage_of = networks.stages_by_name(body, _inbound(model))
        how = "layer names"
        if stage_of is None:
            how = "spatial resolution"
            heights = _heights(model, ops_[1:len(body) + 1], image_size)
            stage_of = networks.stages_by_resolution(list(heights.items()))
    stages = tuple(dict.fromkeys(stage_of[n] for n in body))
    if len(stages) < 2:
        raise ConfigError(f"--backbone={choice.name}: found one stage only ({stages[0]}); "
                          "name the last layer of each stage with --stage_ends.")
    stem = _entry(model, {n for n in body if stage_of[n] == stages[-1]}, choice.name)
    if choice.is_file:
        source = weights_identity(choice.name, 0)
    else:
        source = f"keras.applications.{networks.NAMED[choice.name][0]}"
    net = networks.Backbone(
        name=choice.name, source=source, stages=stages, stem_layer=stem,
        feature_layer=feature, preprocessing=preprocessing, pooling="avg",
        default_image_size=choice.trained_size()[0], min_image_size=networks.MIN_IMAGE_SIZE,
        imagenet_top=False)
    logging.info("Backbone %s: stages %s (by %s); the last stage (%s) runs from %s to the "
                 "feature map %s; input: %s.", net.slug, ", ".join(stages), how, stages[-1],
                 stem, feature, net.describe_input())
    return net, {n: stage_of[n] for n in body}


def split(model: keras.Model, net: networks.Backbone, image_size: int, prefix: str
          ) -> Tuple[keras.Model, keras.Model]:
    """The stem (image -> `stem_layer`, with `CaffeToRGB` first when the network
    preprocesses inside itself) and the last stage (`stem_layer` -> `feature_layer`)."""
    image = keras.Input((image_size, image_size, 3), name="image")
    x = _contract_layers(net.preprocessing, image)
    inner = keras.Model(model.input, model.get_layer(net.stem_layer).output,
                        name=f"{prefix}_base_stem")
    stem = keras.Model(image, inner(x), name=f"{prefix}_stem")
    try:
        last = keras.Model(model.get_layer(net.stem_layer).output,
                           model.get_layer(net.feature_layer).output, name=f"{prefix}_base_last")
    except Exception as err:  # Keras: the last stage needs tensors from before the stem.
        raise ConfigError(f"--backbone={net.name}: the last stage ({net.stages[-1]}) does "
                          f"not run from {net.stem_layer} alone ({err}); name its stages with "
                          "--stage_ends.") from err
    shape = stem.output.shape[1:]
    start = keras.Input(shape, name=f"{net.stem_layer}_features")
    last = keras.Model(start, last(start), name=f"{prefix}_last_stage")
    return stem, last


def _contract_layers(contract: str, image):
    """The first layers that turn the input graph's "caffe" images into what the network
    expects (`networks.CONTRACTS`): nothing for caffe, `CaffeToRGB` for RGB 0..255, then
    Keras' Rescaling (and Normalization) for the scaled contracts."""
    if contract == networks.CAFFE:
        return image
    x = CaffeToRGB(name="caffe_to_rgb")(image)
    if contract == networks.MINUS_ONE_TO_ONE:
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="input_contract")(x)
    if contract == networks.ZERO_TO_ONE:
        return keras.layers.Rescaling(1 / 255.0, name="input_contract")(x)
    if contract == networks.IMAGENET_MEAN_STD:
        x = keras.layers.Rescaling(1 / 255.0, name="input_contract")(x)
        return keras.layers.Normalization(mean=[0.485, 0.456, 0.406],
                                          variance=[0.229 ** 2, 0.224 ** 2, 0.225 ** 2],
                                          name="input_contract_standardise")(x)
    return x


def build(choice: networks.BackboneChoice, weights: str, image_size: int, seed: int
          ) -> Tuple[networks.Backbone, Dict[str, str], keras.Model, keras.Model]:
    """(description, layer -> stage, stem, last stage) of a non-VGG16 backbone."""
    if choice.is_file:
        if weights not in ("imagenet", "file"):
            raise ConfigError(f"--backbone={choice.name} brings its own weights; drop "
                              f"--weights={weights} (it applies to networks by name).")
        model, preprocessing = load_file(choice.name), choice.contract or networks.RGB255
    else:
        model = load_named(choice.name, weights, image_size, seed)
        preprocessing = networks.NAMED[choice.name][1]
    if image_size < 32:
        raise ConfigError(f"{os.path.basename(choice.name)} at {image_size} px: below the 32 px "
                          "its five halvings need.")
    fixed = model.inputs[0].shape[1]
    if fixed is not None and fixed != image_size:
        raise ConfigError(f"{os.path.basename(choice.name)} takes {fixed} x {fixed} px input "
                          f"only; asked for {image_size} px. Leave out --image_size (and "
                          "@SIZE): its own size is the default.")
    net, stage_of = describe(model, choice, preprocessing, image_size)
    stem, last = split(model, net, image_size, net.slug)
    return net, stage_of, stem, last
