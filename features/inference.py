"""Exporting the trained classifier, loading it safely, and batch prediction.

The exported model is a plain Keras functional model (``model.keras``, no
Lambda layers, so it loads with ``safe_mode=True``) and ``model_info.json``
beside it holds what prediction needs to preprocess exactly as in training.
"""

import json
import os
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from features import distribute, precision
from pipeline import input as input_lib
from pipeline.atomic import atomic_path, atomic_write_text
from pipeline.errors import ConfigError, DataError

MODEL_FILE = "model.keras"
BAG_FILE = "bag.keras"
INFO_FILE = "model_info.json"
MAX_TTA = 8
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
    with atomic_path(path) as tmp:
        model.save(tmp)
    atomic_write_text(os.path.join(workdir, INFO_FILE), json.dumps(info, indent=2) + "\n")
    return path


def build_bag(classifier, scenario: str, members, final_model: bool = True,
              name: str = "bag") -> keras.Model:
    """One Keras model averaging a bag: the K fold heads of ``scenario`` and, with
    ``final_model``, the classifier's own head, all on the shared frozen conv base.

    The graph is image -> vgg16_stem [-> vgg16_block5] -> (members) -> Average:
    the frozen layers run once per image, and there are only plain layers, so the
    bag loads with ``safe_mode=True``. Members are clones of the part above the
    cached layer (block5 + head for C, the head otherwise) with their weights.
    """
    from features import backbone
    start = backbone.start_layer(backbone.scenario_blocks(scenario), classifier.include_top)
    if start == "input":
        raise ConfigError(f"Scenario {scenario} trains the whole network: no bag from the cache.")
    # A with the ImageNet top trains only `predictions` above fc2; its members are whole
    # heads (block5_pool in) that differ in that layer, which keeps one graph shape.
    bag_start = "block4_pool" if start == "block4_pool" else "block5_pool"
    part = classifier.model_from(bag_start)
    image = keras.Input(classifier.model.input.shape[1:], name="image")
    features = classifier.stem(image, training=False)
    if bag_start == "block5_pool":
        features = classifier.block5(features, training=False)
    outputs = [part(features)] if final_model else []
    for k, weights in enumerate(members):
        clone = keras.models.clone_model(part)
        clone.set_weights(part.get_weights())
        if start == "fc2":
            clone.get_layer("predictions").set_weights(weights)
        else:
            clone.set_weights(weights)
        inputs = keras.Input(part.input.shape[1:], name=f"member_{k}_features")
        outputs.append(keras.Model(inputs, clone(inputs), name=f"member_{k}")(features))
    if not outputs:
        raise ConfigError("A bag needs at least one member.")
    # float32 like the members' outputs, whatever the precision policy.
    average = (outputs[0] if len(outputs) == 1 else
               keras.layers.Average(name="average", dtype="float32")(outputs))
    return keras.Model(image, average, name=name)


def export_bag(bag: keras.Model, workdir: str) -> str:
    """Saves the bag as ``workdir/bag.keras`` atomically."""
    path = os.path.join(workdir, BAG_FILE)
    with atomic_path(path) as tmp:
        bag.save(tmp)
    return path


def load_exported(workdir: str, bag: bool = False, policy: Optional[str] = None):
    """Loads ``model.keras`` (or, with ``bag``, ``bag.keras``) in safe mode (no
    deserialised code), and its info dict.

    ``policy`` (a `features.precision` policy name) makes the model compute in it
    instead of the precision it was trained in (e.g. a model trained in bfloat16
    on a GPU predicts in float32 on a CPU without bfloat16).
    """
    path = os.path.join(workdir, BAG_FILE if bag else MODEL_FILE)
    info_path = os.path.join(workdir, INFO_FILE)
    if not os.path.isfile(path) or not os.path.isfile(info_path):
        raise ConfigError(f"No exported model in {workdir}: expected {MODEL_FILE} and "
                          f"{INFO_FILE} (written by train.py at the end of fine-tuning).")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        model = keras.models.load_model(path, safe_mode=True, compile=False)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"Cannot load the model in {workdir}: {err}") from err
    if policy is not None:
        model = precision.with_policy(model, policy)
    return model, info


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


def check_tta(n_views: int) -> None:
    if not 1 <= n_views <= MAX_TTA:
        raise ConfigError(f"--tta must be between 1 and {MAX_TTA}; got {n_views}.")


def predict_paths(model: keras.Model, paths: Sequence[str], names: Sequence[str],
                  image_size: int, batch_size: int = 32, tta: int = 1,
                  progress: bool = True) -> np.ndarray:
    """P(positive) for each path, in order, streaming batches through the eval pipeline.

    Mean-centring is linear, so crops and mirrors of the mean-centred batch equal
    the views of the raw image, centred.
    """
    check_tta(tta)
    dataset = input_lib.eval_dataset(list(paths), None, list(names), image_size, batch_size)
    run = distribute.sharded(lambda x: model(x, training=False))
    bar = keras.utils.Progbar(len(paths), unit_name="image") if progress else None
    out = []
    for batch in dataset:
        views = tta_views(batch["image"], tta)
        probs = tf.add_n([tf.reshape(run(v), [-1]) for v in views]) / len(views)
        out.append(probs.numpy())
        if bar is not None:
            bar.add(len(probs))
    probs = np.concatenate(out) if out else np.zeros([0], np.float32)
    if len(probs) != len(paths):
        raise DataError(f"Predicted {len(probs)} images but expected {len(paths)}.")
    return probs.astype(np.float64)


def write_predictions(names: Sequence[str], probs: Sequence[float], path: str,
                      column: str = "invasive") -> str:
    """Writes ``name,<column>`` rows atomically (never a half-written CSV)."""
    import csv
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["name", column])
            for name, p in zip(names, probs):
                writer.writerow([name, f"{float(p):.6f}"])
    return path


def labels_for(names: Sequence[str], labels_csv: str) -> np.ndarray:
    """The 0/1 label of each name from a ``name,invasive`` CSV, in the order of ``names``."""
    from pipeline import discovery
    truth = discovery.read_labels_csv(labels_csv)
    by_name = dict(zip(truth.name, truth.label))
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"{labels_csv} has no label for {len(missing)} predicted image(s), "
                        f"e.g. {missing[:3]}.")
    y = np.array([by_name[n] for n in names])
    if len(np.unique(y)) < 2:
        raise DataError(f"{labels_csv}: the predicted images are all of one class; ROC AUC "
                        "needs both.")
    return y


def score_against_labels(names: Sequence[str], probs: Sequence[float], labels_csv: str,
                         roc_png: Optional[str] = None) -> dict:
    """ROC AUC, accuracy at 0.5 and the confusion matrix against a ``name,invasive`` CSV.

    Draws the ROC curve to ``roc_png`` when given.
    """
    from sklearn import metrics as sk_metrics
    from features import interpret

    y = labels_for(names, labels_csv)
    p = np.asarray(probs, np.float64)
    auc = float(sk_metrics.roc_auc_score(y, p))
    predicted = (p >= 0.5).astype(int)
    matrix = sk_metrics.confusion_matrix(y, predicted, labels=[0, 1])
    result = {"auc": auc, "accuracy": float(np.mean(predicted == y)),
              "confusion_matrix": {"tn": int(matrix[0, 0]), "fp": int(matrix[0, 1]),
                                   "fn": int(matrix[1, 0]), "tp": int(matrix[1, 1])},
              "n": int(len(y))}
    if roc_png:
        result["roc_png"] = interpret.roc_png(y, p, roc_png)
    return result


def format_scores(scores: dict) -> str:
    """Human-readable lines for `score_against_labels` output."""
    cm = scores["confusion_matrix"]
    return (f"ROC AUC {scores['auc']:.4f}, accuracy {scores['accuracy']:.4f} on {scores['n']} "
            f"images\nconfusion matrix (rows: true 0/1, columns: predicted 0/1):\n"
            f"  {cm['tn']:6d} {cm['fp']:6d}\n  {cm['fn']:6d} {cm['tp']:6d}")


# Probability written for a test image that cannot be decoded (with --on_bad_image=skip):
# uninformative, so it neither helps nor hurts ranking metrics much.
FALLBACK_PROBABILITY = 0.5


def predict_frame(model: keras.Model, frame, image_size: int, batch_size: int = 32,
                  tta: int = 1, progress: bool = True, engine=None, workdir: str = None,
                  bag: bool = False) -> np.ndarray:
    """Like `predict_paths` for a frame with ``path, name`` and optionally a boolean ``bad``
    column; bad rows get `FALLBACK_PROBABILITY`.

    With ``engine`` (a `features.ray_engine.RayEngine`), Ray workers load the model
    exported in ``workdir`` (``bag.keras`` with ``bag``) and predict instead.
    """
    probs = np.full(len(frame), FALLBACK_PROBABILITY, np.float64)
    good = ~frame["bad"].to_numpy(bool) if "bad" in frame else np.ones(len(frame), bool)
    if good.any() and engine is not None:
        probs[good] = engine.predict(workdir, bag, frame[good], image_size, batch_size, tta)
    elif good.any():
        probs[good] = predict_paths(model, frame.path[good].tolist(), frame.name[good].tolist(),
                                    image_size, batch_size, tta, progress)
    return probs
