"""Where the model looked: a class-activation heatmap on the backbone's last spatial
feature map, for any backbone.

The classifier is stem -> last stage -> head (`features.backbone.Classifier`); the last
stage's output is the backbone's ``feature_layer`` (named by its description, not by
VGG's layer names), the map the head reads. The heatmap is HiResCAM (Draelos and Carin
2020): the ReLU of the channel sum of the map times the gradient of the class's
logit at each position, scaled to [0, 1]. Behind an average-pooling head the
gradient is the same at every position, and this is Grad-CAM (Selvaraju et al. 2017)
exactly; behind VGG16's flatten head each position has its own weights, and averaging
the gradient over positions (Grad-CAM) mixes them: on random-weight test networks it
pointed away from the evidence, HiResCAM at it."""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class Parts:
    """An exported model's three sub-models: the stem, the last stage (whose output is
    the feature map the head reads) and the head (a scenario's, or the linear probe's),
    and the whole model."""
    stem: object
    last: object
    head: object
    model: object


def parts_of(model) -> Parts:
    """`Parts` of a model this tool exported (``model.keras``), or one clear error."""
    import keras
    from small_photo_classifier.pipeline.errors import ConfigError
    subs = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(subs) != 3:
        raise ConfigError(f"{model.name}: a heatmap needs the tool's three sub-models (stem, "
                          f"last stage, head); found {[s.name for s in subs] or 'none'}.")
    return Parts(*subs, model)


def class_logits(head, features, kind: str, index: int):
    """Class ``index``'s score before the output's sigmoid or softmax (Grad-CAM's y^c):
    the head's layers up to its last Dense, then that layer's kernel and bias alone. The
    gradient of a probability, or of its log, vanishes where the model is sure (a
    saturated sigmoid gives an all-zero map on the photos it is surest of); the logit's
    does not. Binary: one unit, index 1 the positive class, 0 its negative."""
    x = features
    for layer in head.layers[1:]:
        if layer is head.layers[-1]:
            x = tf.matmul(x, tf.cast(layer.kernel, x.dtype)) + tf.cast(layer.bias, x.dtype)
            break
        x = layer(x, training=False)
    if kind == "binary":
        return x[:, 0] if index == 1 else -x[:, 0]
    return x[:, index]


def grad_cam(classifier, images, kind: str, index: int) -> np.ndarray:
    """Heatmaps [N, h, w] in [0, 1] at the feature map's resolution for eval-path
    ``images`` ([N, S, S, 3]) and class ``index``; ``classifier``: `Parts` or a
    `features.backbone.Classifier`. A map with no positive evidence is
    all zeros."""
    images = tf.convert_to_tensor(images)
    below = classifier.stem(images, training=False)
    with tf.GradientTape() as tape:
        fmap = classifier.last(below, training=False)
        tape.watch(fmap)
        score = class_logits(classifier.head, fmap, kind, index)
    grads = tf.cast(tape.gradient(score, fmap), tf.float32)
    cam = tf.nn.relu(tf.reduce_sum(grads * tf.cast(fmap, tf.float32), axis=-1)).numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1)
    return cam / np.maximum(peak, EPS)[:, None, None]


def upsampled(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """One heatmap [h, w] resized (bilinear) to a photo's ``height`` x ``width``."""
    return tf.image.resize(cam[..., None], [height, width], method="bilinear").numpy()[..., 0]


def overlay(photo: np.ndarray, cam: np.ndarray, alpha: float = 0.45,
            title: Optional[str] = None):
    """A matplotlib figure: the photo (RGB, 0..255) with the heatmap over it."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone
    figure = Figure(figsize=(4, 4))
    axes = figure.subplots()
    axes.imshow(np.asarray(photo, np.uint8))
    axes.imshow(upsampled(cam, *photo.shape[:2]), cmap="jet", alpha=alpha, vmin=0, vmax=1)
    axes.set_axis_off()
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure
