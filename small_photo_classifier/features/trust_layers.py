"""The calibration map and the unfamiliar score of `features.trust` as Keras graphs.

predict.py runs one network pass per image that yields the model's raw output and the
backbone's pooled features side by side (`with_features`); the rest is NumPy
(`features.trust`). The exports carry the same computation inside their graph
(`trusted_model`): the calibrated probabilities and the unfamiliar score as two named
outputs, the reference features a constant of the graph. Both use only ops that
SavedModel, ONNX and TFLite run (matmul, top-k, log, exp).
"""

from typing import Optional

import keras
import numpy as np
from keras import ops

from small_photo_classifier.features import trust

PROBABILITIES, UNFAMILIAR_SCORE = "probabilities", "unfamiliar_score"


def parts(model: keras.Model):
    """(stem, last stage, head) of an exported ``model.keras``: its three sub-models."""
    subs = [l for l in model.layers if isinstance(l, keras.Model)]
    if len(subs) != 3:
        raise ValueError(f"{model.name}: expected three sub-models (stem, last stage, head), "
                         f"found {[s.name for s in subs]}.")
    return subs


def _pool(feature_map):
    if len(feature_map.shape) == 4:
        return keras.layers.GlobalAveragePooling2D(name="pooled_features",
                                                   dtype="float32")(feature_map)
    return keras.layers.Activation("linear", name="pooled_features",
                                   dtype="float32")(feature_map)


def with_features(model: keras.Model, above: Optional[keras.Model] = None,
                  start: str = "") -> keras.Model:
    """image -> ``[outputs, pooled features]`` concatenated on the last axis, one pass.

    ``above``: the bag above its trunk (`features.choose.bag.on_features`), fed at the
    layer ``start`` (the stem layer, the feature layer, or a head layer computed from
    the feature map by ``head_span``); None for the single model."""
    stem, last, head = parts(model)
    image = keras.Input(model.input.shape[1:], name="image")
    below = stem(image, training=False)
    feature_map = last(below, training=False)
    if above is None:
        outputs = head(feature_map, training=False)
    else:
        from small_photo_classifier.features import backbone
        classifier = backbone.from_model(model)
        if start == classifier.net.stem_layer:
            x = below
        elif start == classifier.net.feature_layer:
            x = feature_map
        else:
            x = classifier.head_span(start)(feature_map, training=False)
        outputs = above(x, training=False)
    outputs = ops.cast(outputs, "float32")
    joined = keras.layers.Concatenate(name="outputs_and_features", dtype="float32")(
        [outputs, _pool(feature_map)])
    return keras.Model(image, joined, name=f"{model.name}_with_features")


def _float32(kwargs: dict) -> dict:
    """``kwargs`` with the layer's dtype policy float32, whatever was asked or is global:
    these layers' outputs are the product (probabilities, scores), and a global
    ``mixed_bfloat16`` policy would otherwise round them to 3 significant digits."""
    return {**kwargs, "dtype": "float32"}


class Calibrate(keras.layers.Layer):
    """`features.trust.Calibration.apply` in the graph (always in float32); ``shift``:
    also move the probabilities to the field's prior (the exported probabilities), or
    not (what the unfamiliar score's uncertainty is measured on)."""

    def __init__(self, task_kind: str, calibration: dict, shift: bool = True, **kwargs):
        super().__init__(**_float32(kwargs))
        self.task_kind, self.calibration, self.shift = task_kind, dict(calibration), shift

    def call(self, p):
        c = trust.Calibration.from_json(self.calibration)
        p = ops.clip(ops.cast(p, "float32"), trust.EPS, 1.0 - trust.EPS)
        moved = self.shift and c.prior_shift
        if self.task_kind == "multiclass":
            z = ops.log(p) / (float(c.temperature[0]) if c.kind != "none" else 1.0)
            if moved:
                z = z + np.asarray(c.prior_shift, np.float32)
            return p if c.kind == "none" and not moved else ops.softmax(z, axis=-1)
        logit = ops.log(p) - ops.log(1.0 - p)
        if c.kind == "platt":
            logit = c.slope * logit + c.bias
        elif c.kind != "none":
            t = np.asarray(c.temperature, np.float32)
            logit = logit / (t if self.task_kind == "multilabel" else float(t[0]))
        if moved:
            logit = logit + float(c.prior_shift[0])
        return p if c.kind == "none" and not moved else ops.sigmoid(logit)

    def get_config(self):
        return {**super().get_config(), "task_kind": self.task_kind,
                "calibration": self.calibration, "shift": self.shift}


class UnfamiliarScore(keras.layers.Layer):
    """`features.trust.Unfamiliar.score` of pooled features and calibrated probabilities,
    the reference features held as a constant weight (always in float32)."""

    def __init__(self, task_kind: str, unfamiliar: dict, reference: np.ndarray, **kwargs):
        super().__init__(**_float32(kwargs))
        self.task_kind, self.unfamiliar = task_kind, dict(unfamiliar)
        self.reference = np.asarray(reference, np.float32)
        self.ref = self.add_weight(shape=self.reference.shape, trainable=False,
                                   initializer="zeros", name="reference")
        self.ref.assign(self.reference)

    def call(self, inputs):
        pooled, p = inputs
        fitted = trust.Unfamiliar.from_json(self.unfamiliar)
        q = ops.cast(pooled, "float32")
        q = q / ops.maximum(ops.sqrt(ops.sum(q * q, axis=-1, keepdims=True)), 1e-12)
        sims = ops.matmul(q, ops.transpose(self.ref))
        k = max(1, min(int(fitted.k), int(self.reference.shape[0])))
        kth = ops.top_k(sims, k)[0][:, k - 1]
        d = ops.maximum(1.0 - kth, trust.MIN_DISTANCE)
        p = ops.cast(p, "float32")
        if self.task_kind == "multiclass":
            # The other classes' probabilities summed: exact in float32 where 1 - max is
            # not. One top class is left out, as 1 - max does: on a tie the other top
            # classes count (leaving out every class equal to the max would give 0). No
            # argmax: Keras' TensorFlow argmax bit-casts floats, which neither tf2onnx nor
            # TFLite converts.
            top = ops.max(p, axis=-1, keepdims=True)
            at_top = ops.cast(ops.greater_equal(p, top), p.dtype)
            u = (ops.sum(p * (1.0 - at_top), axis=-1)
                 + (ops.sum(at_top, axis=-1) - 1.0) * top[:, 0])
        elif self.task_kind == "multilabel":
            u = ops.mean(1.0 - ops.maximum(p, 1.0 - p), axis=-1)
        else:
            u = 1.0 - ops.maximum(p[:, 0], 1.0 - p[:, 0])
        return (fitted.distance_weight * (ops.log(d) - fitted.log_d_mean) / fitted.log_d_std
                + (ops.log(u + trust.UNCERTAINTY_FLOOR) - fitted.log_u_mean)
                / fitted.log_u_std)


def trusted_model(model: keras.Model, info: dict, reference: np.ndarray) -> keras.Model:
    """image -> {"probabilities": calibrated [N, units], "unfamiliar_score": [N]}: the
    single exported model with its calibration and unfamiliar score inside the graph."""
    stem, last, head = parts(model)
    kind = info.get("task", "binary")
    image = keras.Input(model.input.shape[1:], name="image")
    feature_map = last(stem(image, training=False), training=False)
    raw = ops.cast(head(feature_map, training=False), "float32")
    probs = Calibrate(kind, info.get("calibration") or {}, name=PROBABILITIES)(raw)
    # The uncertainty is measured before the prior's shift, as it was fitted.
    unshifted = Calibrate(kind, info.get("calibration") or {}, shift=False,
                          name="calibrated_training_prior")(raw)
    score = UnfamiliarScore(kind, info["unfamiliar"], reference,
                            name=UNFAMILIAR_SCORE)([_pool(feature_map), unshifted])
    return keras.Model(image, {PROBABILITIES: probs, UNFAMILIAR_SCORE: score},
                       name=f"{model.name}_trusted")


def calibrated_model(model: keras.Model, info: dict) -> keras.Model:
    """image -> calibrated probabilities: a model with a calibration but no reference
    features (e.g. its reference file is missing)."""
    image = keras.Input(model.input.shape[1:], name="image")
    probs = Calibrate(info.get("task", "binary"), info.get("calibration") or {},
                      name=PROBABILITIES)(model(image, training=False))
    return keras.Model(image, probs, name=f"{model.name}_calibrated")
