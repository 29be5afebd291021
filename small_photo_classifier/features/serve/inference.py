"""Exporting the trained classifier, loading it safely, and batch prediction.

The exported model is a plain Keras functional model (``model.keras``, no
Lambda layers, so it loads with ``safe_mode=True``) and ``model_info.json``
beside it holds what prediction needs to preprocess exactly as in training,
and the class order of its outputs.
"""

import json
import os
import weakref
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from small_photo_classifier.features import backbone, distribute, precision
from small_photo_classifier.features.choose import bag as bag_lib
from small_photo_classifier.features.store import cache as cache_lib, extract
from small_photo_classifier.features.task import Task
from small_photo_classifier.pipeline import input as input_lib
from small_photo_classifier.pipeline import run_info
from small_photo_classifier.pipeline import progress as progress_lib
from small_photo_classifier.pipeline.atomic import atomic_path, atomic_write_text
from small_photo_classifier.pipeline.errors import ConfigError, DataError

MODEL_FILE, BAG_FILE, INFO_FILE = run_info.MODEL_FILE, run_info.BAG_FILE, run_info.INFO_FILE
check_tta = run_info.check_tta  # the one check, TensorFlow-free, in pipeline.run_info
# (y0, x0, y1, x1) crop boxes in relative coordinates, and whether to mirror.
_TTA_VIEWS = (
    ((0.0, 0.0, 1.0, 1.0), False),
    ((0.0, 0.0, 1.0, 1.0), True),
    ((0.0625, 0.0625, 0.9375, 0.9375), False),
    ((0.0625, 0.0625, 0.9375, 0.9375), True),
    ((0.0, 0.0, 0.875, 0.875), False),
    ((0.0, 0.125, 0.875, 1.0), False),
    ((0.125, 0.0, 1.0, 0.875), False),
    ((0.125, 0.125, 1.0, 1.0), False),
)


def export_model(model: keras.Model, workdir: str, info: dict) -> str:
    """Saves ``model`` as ``workdir/model.keras`` plus ``model_info.json`` (both atomically)."""
    path = os.path.join(workdir, MODEL_FILE)
    with atomic_path(path) as tmp, backbone.without_training_state(model):
        model.save(tmp)
        precision.store_float32(tmp)  # whatever policy it was trained under
    atomic_write_text(os.path.join(workdir, INFO_FILE), json.dumps(info, indent=2) + "\n")
    return path


def task_of(info: dict) -> Task:
    """The task an exported model was trained for (binary for models from before tasks)."""
    return Task.of_model(info)


def read_info(workdir: str) -> dict:
    """``model_info.json`` of an exported model (see `pipeline.run_info.read_info`)."""
    return run_info.read_info(workdir, need_model=False)


def load_exported(workdir: str, bag: bool = False, policy: Optional[str] = None):
    """Loads ``model.keras`` (or, with ``bag``, the bag: ``model.keras`` joined with the
    fold members in ``bag.keras``, see `features.choose.bag`) in safe mode (no deserialised
    code), and its info dict.

    ``policy`` (a `features.precision` policy name) makes the model compute in it
    instead of the precision it was trained in (e.g. a model trained in bfloat16
    on a GPU predicts in float32 on a CPU without bfloat16).
    """
    info_path = os.path.join(workdir, INFO_FILE)
    needed = [MODEL_FILE, INFO_FILE] + ([BAG_FILE] if bag else [])
    missing = [n for n in needed if not os.path.isfile(os.path.join(workdir, n))]
    if missing:
        raise ConfigError(f"No exported model in {workdir}: expected {' and '.join(needed)} "
                          f"(written by train.py at the end of fine-tuning); missing "
                          f"{', '.join(missing)}.")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        model = keras.models.load_model(os.path.join(workdir, MODEL_FILE), safe_mode=True,
                                        compile=False)
        if bag:
            model = bag_lib.load(model, os.path.join(workdir, BAG_FILE),
                                 info.get("bag", {}).get("start", ""))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"Cannot load the model in {workdir}: {err}") from err
    if policy is not None:
        model = precision.with_policy(model, policy)
    return model, info


def load_predictor(workdir: str, bag: bool, policy: Optional[str], features: bool):
    """(model, info, units): the network predict.py runs, its model_info.json, and how
    many of its output columns are the model's outputs.

    With ``features`` the network also returns the backbone's pooled features after those
    columns, from the same pass (`features.trust_layers.with_features`), for the
    unfamiliar score; a bag stored as a whole network (an old run) cannot, and comes
    back without them (check ``model.output.shape[-1] == units``)."""
    model, info = load_exported(workdir, bag=False, policy=policy)
    units = int(model.output.shape[-1])
    members = bag_lib.load_members(os.path.join(workdir, BAG_FILE)) if bag else None
    whole_bag = (members is not None
                 and tuple(members.input.shape[1:]) == tuple(model.input.shape[1:]))
    if not features or whole_bag:
        return (load_exported(workdir, bag=True, policy=policy)[0] if bag else model), info, units
    from small_photo_classifier.features import trust_layers
    above, start = None, ""
    if members is not None:
        start = info.get("bag", {}).get("start", "")
        above = bag_lib.on_features(backbone.from_model(model), start, members)
    return trust_layers.with_features(model, above, start), info, units


def tta_views(images, n_views: int):
    """The first ``n_views`` deterministic views of a batch (image, mirror, crops)."""
    size = tf.shape(images)[1:3]
    views = []
    for box, mirror in _TTA_VIEWS[:n_views]:
        view = images
        if box != (0.0, 0.0, 1.0, 1.0):
            n = tf.shape(images)[0]
            view = tf.image.crop_and_resize(images, tf.tile([box], [n, 1]), tf.range(n), size)
        if mirror:
            view = view[:, :, ::-1]
        views.append(view)
    return views


_PREDICTORS = weakref.WeakKeyDictionary()


def predictor(model: keras.Model):
    """The model's one compiled inference function (split over replicas under a
    mirrored strategy), traced once per batch shape however often it is called."""
    strategy = tf.distribute.get_strategy()
    cached = _PREDICTORS.get(model)
    if cached is None or cached[0] is not strategy:
        cached = (strategy, distribute.sharded(lambda x: model(x, training=False),
                                               model.input.shape[1:]))
        _PREDICTORS[model] = cached
    return cached[1]


def predict_paths(model: keras.Model, paths: Sequence[str], names: Sequence[str],
                  image_size: int, batch_size: int = 32, tta: int = 1,
                  progress: bool = True) -> np.ndarray:
    """Model outputs [N, units] for each path, in order, streaming batches through the
    eval pipeline and averaging ``tta`` views.

    Mean-centring is linear, so crops and mirrors of the mean-centred batch equal
    the views of the raw image, centred.
    """
    check_tta(tta)
    # Batches as small as extraction's on a CPU: a batch's activations are the memory.
    dataset = input_lib.eval_dataset(list(paths), None, list(names), image_size,
                                     extract.extraction_batch(batch_size))
    bar = progress_lib.bar(len(paths), "image", "predicted") if progress else None
    outputs = _predict_batches(model, (b["image"] for b in dataset), tta, bar)
    if len(outputs) != len(paths):
        raise DataError(f"Predicted {len(outputs)} images but expected {len(paths)}.")
    return outputs


def predict_images(model: keras.Model, images: np.ndarray, batch_size: int = 32,
                   tta: int = 1) -> np.ndarray:
    """`predict_paths` of images already through the eval path (decoded, resized,
    mean-centred: `pipeline.input.image_from_bytes`), [N, S, S, 3]."""
    check_tta(tta)
    size = extract.extraction_batch(batch_size)
    return _predict_batches(model, (tf.constant(images[i:i + size])
                                    for i in range(0, len(images), size)), tta)


def _predict_batches(model, batches, tta: int, bar=None) -> np.ndarray:
    """Model outputs (float64 [N, units]) of eval-path batches, ``tta`` views averaged."""
    run = predictor(model)
    out = []
    for images in batches:
        views = tta_views(images, tta)
        outputs = tf.add_n([tf.cast(run(v), tf.float32) for v in views]) / len(views)
        out.append(outputs.numpy())
        if bar is not None:
            bar.add(len(outputs))
    units = model.output.shape[-1]
    return (np.concatenate(out) if out else np.zeros([0, units], np.float32)).astype(np.float64)


def predict_frame(model: keras.Model, frame, image_size: int, batch_size: int = 32,
                  tta: int = 1, progress: bool = True, remote=None) -> np.ndarray:
    """Like `predict_paths` for a frame with ``path, name`` and optionally a boolean ``bad``
    column; bad rows get NaN: an image that could not be read has no prediction.

    With ``remote`` (a `features.serve.ray_engine.RemoteModel`), Ray workers load the run's
    exported model and predict instead of ``model`` (which may then be None).
    """
    units = model.output.shape[-1] if model is not None else 1
    outputs = np.full((len(frame), units), np.nan, np.float64)
    good = ~frame["bad"].to_numpy(bool) if "bad" in frame else np.ones(len(frame), bool)
    if good.any() and remote is not None:
        outputs[good] = remote.predict(frame[good], image_size, batch_size, tta)
    elif good.any():
        outputs[good] = predict_paths(model, frame.path[good].tolist(),
                                      frame.name[good].tolist(), image_size, batch_size, tta,
                                      progress)
    return outputs


class HeldOut:
    """Outputs, on one fixed set of images, of models that share the classifier's frozen
    layers below some layer: each image goes through those layers once per view.

    The export compares several such models on the validation images (the final model,
    the bag, each with and without a mirrored view); they differ only above the cached
    layer they train from. Their inputs there are the cached features (``cached``: layer
    -> array, the images' rows in order) for the plain view; any other (layer, view) is
    computed once, through the classifier's own trunk, when first asked for.

    `outputs` equals `predict_paths` of the whole model (image -> frozen trunk -> part):
    the same views, averaged the same way.
    """

    def __init__(self, classifier: backbone.Classifier, paths: Sequence[str], image_size: int,
                 batch_size: int = 32, cached: Optional[dict] = None):
        self.classifier, self.paths = classifier, list(paths)
        self.image_size, self.batch_size = image_size, batch_size
        self._features = {(layer, 0): np.asarray(v) for layer, v in (cached or {}).items()}

    def features(self, layer: str, view: int = 0) -> np.ndarray:
        """The images' features at ``layer`` for TTA view ``view`` (0: the image itself)."""
        key = (layer, view)
        net = self.classifier.net
        if key not in self._features and layer not in (net.stem_layer, net.feature_layer):
            # A head layer (e.g. the bag's members start at ``flatten``): from the view's
            # feature-map features, cached or computed once, through the head's layers.
            span, below = self.classifier.head_span(layer), self.features(net.feature_layer, view)
            size = self.batch_size
            self._features[key] = np.concatenate(
                [np.asarray(span(tf.constant(below[i:i + size]), training=False))
                 for i in range(0, len(below), size)] or
                [np.zeros((0, *span.output.shape[1:]), np.float32)])
        if key not in self._features:
            self._through_trunk(view)
        return self._features[key]

    def _through_trunk(self, view: int) -> None:
        """Every cached layer's features of view ``view``, in one pass of the images
        through the extraction's compiled function at its batch size (`extract.extractor`).
        Never an eager call: that holds every intermediate activation of a batch at once
        (EfficientNet-Lite0, 64 images: +5 GB RSS); nor a trace of its own (+0.3 GB)."""
        layers = cache_lib.cached_layers(self.classifier.include_top, self.classifier.net)
        run = extract.extractor(self.classifier, layers)
        dataset = input_lib.eval_dataset(self.paths, None, self.paths, self.image_size,
                                         extract.extraction_batch(self.batch_size))
        out = {layer: [] for layer in layers}
        for batch in dataset:
            got = run(tta_views(batch["image"], view + 1)[view])
            for layer in layers:
                out[layer].append(np.asarray(got[layer]))
        for layer in layers:
            self._features.setdefault((layer, view), np.concatenate(out[layer]) if out[layer]
                                      else np.zeros((0, *self.classifier.trunk(
                                          layer).output.shape[1:]), np.float32))

    def outputs(self, part: keras.Model, layer: str, tta: int = 1) -> np.ndarray:
        """``part``'s outputs [N, units] on the features at ``layer``, averaged over the
        first ``tta`` views as `predict_paths` averages them."""
        check_tta(tta)
        size = self.batch_size
        views = []
        for v in range(tta):
            x = self.features(layer, v)
            views.append(np.concatenate(
                [np.asarray(part(tf.constant(x[i:i + size]), training=False), np.float32)
                 for i in range(0, len(x), size)] or [np.zeros((0, part.output.shape[-1]))]))
        return (np.add.reduce(views) / len(views)).astype(np.float64)
