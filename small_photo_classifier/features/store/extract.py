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

from small_photo_classifier.features import distribute
from small_photo_classifier.pipeline import augment as augment_lib
from small_photo_classifier.pipeline import input as input_lib
from small_photo_classifier.pipeline import ops


def image_major(items: pd.DataFrame) -> pd.DataFrame:
    """``items`` with the rows of one image together (its views in order), images in the
    order they first appear: the views of an image are then made from one decode."""
    first = pd.factorize(items.path)[0]
    order = np.lexsort((items.view.to_numpy(), first))
    return items.iloc[order]


def _extraction_dataset(items: pd.DataFrame, image_size: int, batch_size: int,
                        preset_name: str):
    """The eval path, plus (for views > 0) a per-image seeded augmentation.

    Augmented views are made from one decode of each image (``items`` image-major, see
    `image_major`; decoding a 1154 x 866 JPEG costs about what augmenting it does), and
    the drawn transforms are applied a batch at a time (one resampling op per batch,
    not per view). Each view's parameters are drawn from (name, view) alone, so a view
    is the same whichever rows are computed with it (a resume, another batch size).
    """
    if preset_name == "none" or (items.view == 0).all():
        return input_lib.eval_dataset(items.path.tolist(), None, items.name.tolist(),
                                      image_size, batch_size)
    if (items.view <= 0).any():
        raise ValueError("Rows of augmented views are numbered from 1.")
    preset = augment_lib.get_preset(preset_name)
    front = input_lib.decode_and_resize(image_size)
    starts = np.flatnonzero(np.r_[True, items.path.to_numpy()[1:] != items.path.to_numpy()[:-1]])
    views = tf.RaggedTensor.from_row_starts(items.view.astype(np.int64).to_numpy(), starts)

    def split_views(element):
        return tf.data.Dataset.from_tensor_slices(element["view"]).map(
            lambda view: {"image": element["image"], "name": element["name"], "view": view})

    def draw(element):
        # Seed from (name, view): the same view of the same image is identical
        # whenever it is (re)computed, e.g. after a resume.
        seed = tf.stack([tf.strings.to_hash_bucket_fast(element["name"], 2**31 - 1),
                         element["view"]])
        params = augment_lib.sample_params(1, preset, seed)
        # Per view, as one view at a time computes it (a batch of matrices rounds alike
        # only to ~0.01 grey level), so that rows match those cached before.
        params["transforms"] = augment_lib.projective_transforms(params, image_size, image_size)
        return {"image": element["image"], "params": {k: v[0] for k, v in params.items()}}

    def apply(batch):
        image = augment_lib.apply_params(batch["image"], batch["params"], preset)
        return {"image": ops.vgg_mean_centre_image(image)}

    source = tf.data.Dataset.from_tensor_slices({
        "path": items.path.to_numpy()[starts].tolist(),
        "name": items.name.to_numpy()[starts].tolist(), "view": views})
    return (source.map(front, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .flat_map(split_views)
            .map(draw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size)
            .map(apply, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def compute_features(predict, items: pd.DataFrame, spec, batch_size: int):
    """Yields ``(rows of items, {layer: features})`` batch by batch, the rows of one
    image together (`image_major`).

    ``predict`` maps a batch of mean-centred images to the dict of ``spec.layers``
    outputs. Used on this machine and, unchanged, inside Ray workers, so both
    compute the same rows.
    """
    items = image_major(items)
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
