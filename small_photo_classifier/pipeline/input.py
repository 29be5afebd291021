"""tf.data input graphs: a deterministic eval path and an augmented train path.

Order (why it matters): list -> read -> decode -> resize -> shuffle -> repeat ->
batch -> augment -> mean-centre -> prefetch. Shuffling the (path, label, name)
list before decoding keeps the shuffle buffer tiny; augmenting whole batches
turns per-image random transforms into one vectorised op.
"""

from typing import Sequence

import numpy as np
import tensorflow as tf

from small_photo_classifier.pipeline import augment as augment_lib
from small_photo_classifier.pipeline import ops

AUTOTUNE = tf.data.AUTOTUNE


def _source(paths: Sequence[str], labels, names: Sequence[str], weights=None):
    if labels is None:
        labels = [-1] * len(paths)  # unlabelled (prediction): -1 is never a real label
    if not (len(paths) == len(labels) == len(names)):
        raise ValueError(f"paths, labels and names must have equal lengths; got "
                         f"{len(paths)}, {len(labels)}, {len(names)}")
    columns = {
        "path": tf.constant(list(paths), tf.string),
        # [N] for one label per image, [N, K] for one-hot or multi-label targets.
        "label": tf.constant(np.asarray(labels, np.float32)),
        "name": tf.constant(list(names), tf.string),
    }
    if weights is not None:
        columns["weight"] = tf.constant(np.asarray(weights, np.float32))
    return tf.data.Dataset.from_tensor_slices(columns)


def decode_and_resize(image_size: int):
    """The shared front of both paths: read -> decode -> resize (RGB float32 in [0, 255])."""
    return ops.chain(ops.read(), ops.decode(image_size), ops.resize(image_size))


def image_from_bytes(contents, image_size: int = 224):
    """One image file's bytes as the eval path makes it (decode, resize, mean-centre):
    float32 ``[image_size, image_size, 3]``, the same ops as `eval_dataset` so the same
    numbers (serve.py predicts uploads from their bytes, decoded once)."""
    element = ops.chain(ops.decode(image_size), ops.resize(image_size),
                        ops.vgg_mean_centre())({"bytes": contents})
    return element["image"]


def eval_dataset(paths, labels, names, image_size=224, batch_size=32):
    """Deterministic batches of ``{"image", "label", "name", "path"}``, in input order.

    Never shuffles, never augments, never drops the last partial batch: this is
    the path used for feature extraction, validation and prediction.
    ``image`` is VGG mean-centred float32 ``[N, image_size, image_size, 3]``.
    """
    front = decode_and_resize(image_size)
    return (_source(paths, labels, names)
            .map(ops.chain(front, ops.vgg_mean_centre()), num_parallel_calls=AUTOTUNE,
                 deterministic=True)
            .batch(batch_size, drop_remainder=False)
            .prefetch(AUTOTUNE))


def train_dataset(paths, labels, names, image_size=224, batch_size=32, augment="none",
                  seed=0, weights=None):
    """Shuffled, repeated, augmented batches for training (fit with ``steps_per_epoch``).

    Args:
      augment: preset name (see `pipeline.augment.PRESETS`); "none" when an
        `augment.Augment` layer in the model augments instead (on the accelerator).
      seed: drives both the shuffle order and the augmentation draws.
      weights: optional per-image sample weights (element key ``weight``).
    """
    preset = augment_lib.get_preset(augment)
    front = decode_and_resize(image_size)
    ds = _source(paths, labels, names, weights).shuffle(len(paths), seed=seed,
                                               reshuffle_each_iteration=True).repeat()
    ds = ds.map(front, num_parallel_calls=AUTOTUNE).batch(batch_size)
    if not preset.is_identity:
        # One stateless seed per batch, drawn from a seeded stream: reproducible
        # even though the map runs in parallel.
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda batch, s: {**batch, "image": augment_lib.augment_batch(
                batch["image"], preset, s)},
            num_parallel_calls=AUTOTUNE)
    return ds.map(ops.vgg_mean_centre(), num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def to_inputs_targets(element):
    """Maps an element dict to the ``(image, label[, weight])`` that ``Model.fit`` expects."""
    if "weight" in element:
        return element["image"], element["label"], element["weight"]
    return element["image"], element["label"]
