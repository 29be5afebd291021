"""Images to rows of cached features: the tf.data graph and the loop that runs it.

The same code runs in this process (`features.store.cache`) and, unchanged, inside Ray
workers (`features.serve.ray_engine`), so both compute the same rows: the eval path
(decode, resize, mean-centre) and, for augmented views, a per-image augmentation
seeded by (name, view).
"""

import weakref
from typing import Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from features import distribute
from pipeline import augment as augment_lib
from pipeline import input as input_lib
from pipeline import ops


def _extraction_dataset(items: pd.DataFrame, image_size: int, batch_size: int,
                        preset_name: str):
    """The eval path, plus (for views > 0) a per-image seeded augmentation."""
    if preset_name == "none" or (items.view == 0).all():
        return input_lib.eval_dataset(items.path.tolist(), None, items.name.tolist(),
                                      image_size, batch_size)
    preset = augment_lib.get_preset(preset_name)
    front = input_lib.decode_and_resize(image_size)

    def augment_one(element):
        # Seed from (name, view): the same view of the same image is identical
        # whenever it is (re)computed, e.g. after a resume.
        seed = tf.stack([tf.strings.to_hash_bucket_fast(element["name"], 2**31 - 1),
                         tf.cast(element["view"], tf.int64)])
        image = augment_lib.augment_batch(element["image"][None], preset, seed)[0]
        image = tf.where(element["view"] > 0, image, element["image"])
        return {**element, "image": ops.vgg_mean_centre_image(image)}

    source = tf.data.Dataset.from_tensor_slices({
        "path": items.path.tolist(), "name": items.name.tolist(),
        "view": items.view.astype(np.int64).tolist()})
    return (source.map(ops.chain(front, augment_one), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def compute_features(predict, items: pd.DataFrame, spec, batch_size: int):
    """Yields ``(rows of items, {layer: features})`` batch by batch, in order.

    ``predict`` maps a batch of mean-centred images to the dict of ``spec.layers``
    outputs. Used on this machine and, unchanged, inside Ray workers, so both
    compute the same rows.
    """
    offset = 0
    for batch in _extraction_dataset(items, spec.image_size, batch_size, spec.augment):
        n = int(batch["image"].shape[0])
        outputs = predict(batch["image"])
        yield items.iloc[offset:offset + n], {l: np.asarray(outputs[l]) for l in spec.layers}
        offset += n


# At most this many images per extraction batch on a CPU: what extraction holds in memory
# is mostly one batch's activations (244 photos at 224 px, peak RSS above the model:
# VGG16 +576 MB at 32 images, +282 MB at 16; Lite0 +410 / +196 MB), and on two cores 16
# extracted as fast as 32 (VGG16 20.9 vs 18.3 s, Lite0 4.6 vs 5.5 s). A GPU keeps
# --batch_size.
CPU_EXTRACTION_BATCH = 16


def extraction_batch(batch_size: int) -> int:
    """Images per extraction batch: ``--batch_size``, capped on a CPU."""
    if tf.config.list_physical_devices("GPU"):
        return batch_size
    return min(batch_size, CPU_EXTRACTION_BATCH)


_EXTRACTORS = weakref.WeakKeyDictionary()


def extractor(classifier, layers: Sequence[str]):
    """The classifier's compiled image -> {layer: features} function (split over the
    replicas of a mirrored strategy), built once per classifier, layers and strategy: the
    extraction and whatever else needs features of new images (the near-duplicate
    threshold's mirror images) share one trace instead of paying for another (Lite0:
    +0.3 GB and 2 s each)."""
    strategy = tf.distribute.get_strategy()
    made = _EXTRACTORS.setdefault(classifier.model, {})  # the dataclass is unhashable
    key = (tuple(layers), strategy)
    if key not in made:
        model = classifier.feature_model(layers)
        made[key] = distribute.sharded(lambda x: model(x, training=False),
                                       model.input.shape[1:])
    return made[key]
