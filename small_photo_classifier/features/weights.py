"""Where the VGG16 weights come from: Keras' ImageNet download, a weights file, or none.

Every source ends in the same ``keras.applications.VGG16`` graph with its stable
layer names (``block1_conv1`` .. ``block5_pool``, ``fc1``, ``fc2``). A source that
cannot deliver raises `WeightsError` naming the alternatives; nothing ever falls
back to random weights silently.
"""

import hashlib
import os
from typing import Dict, List, Optional

import h5py
import keras
import numpy as np

from small_photo_classifier.features import networks
from small_photo_classifier.pipeline.errors import ConfigError, UserError

# What keras.applications downloads into ~/.keras/models for each variant.
IMAGENET_FILES = {
    True: "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
    False: "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
}
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
    if image_size < networks.VGG16.min_image_size:
        raise ConfigError(f"--image_size must be at least {networks.VGG16.min_image_size} "
                          f"(VGG16 halves it five times); got {image_size}.")
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
