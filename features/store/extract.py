"""Images to rows of cached features: the tf.data graph and the loop that runs it.

The same code runs in this process (`features.store.cache`) and, unchanged, inside Ray
workers (`features.serve.ray_engine`), so both compute the same rows: the eval path
(decode, resize, mean-centre) and, for augmented views, a per-image augmentation
seeded by (name, view).
"""

import numpy as np
import pandas as pd
import tensorflow as tf

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
