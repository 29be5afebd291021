"""The calibration and unfamiliar score of an exported model, applied: its stored
reference features, and what predict.py gives for given inputs (the numbers every
export is checked against). Fitted at export by `workflow.train.trusting`."""

import os
from typing import Optional

import numpy as np

from small_photo_classifier.features import trust


def load_reference(workdir: str, info: dict) -> Optional[np.ndarray]:
    """The stored reference features (float32, unit rows), or None for a model without
    them (a run exported before unfamiliar scores)."""
    if not info.get("unfamiliar"):
        return None
    path = os.path.join(workdir, info["unfamiliar"].get("reference_file", trust.REFERENCE_FILE))
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        # Unit rows again after float16 storage: predict.py and every export's graph use
        # exactly these rows (renormalising in one and not the other moved scores by 1e-2).
        return trust.normalise(z["features"].astype(np.float32))


def expected_outputs(model, info: dict, task, x: np.ndarray, reference=None) -> dict:
    """What predict.py gives for the inputs ``x`` (one view, the single model): the
    probabilities, calibrated as stored, and with ``reference`` the unfamiliar scores."""
    from small_photo_classifier.features import trust_layers
    units = int(model.output.shape[-1])
    network = trust_layers.with_features(model) if reference is not None else model
    raw = np.asarray(network.predict(x, verbose=0, batch_size=16), np.float64)
    probs, unfamiliar = apply(task, info, raw, units, reference)
    return {"probabilities": probs, **({"unfamiliar_score": unfamiliar["score"]}
                                       if unfamiliar is not None else {})}


def apply(task, info: dict, outputs, units: int, reference=None):
    """(probabilities, unfamiliar) from the network's outputs: the calibrated
    probabilities (as the model was stored, for a model without a calibration), and
    with ``reference`` the unfamiliar scores and flags (a dict of arrays; NaN / False
    for unreadable rows), else None."""
    outputs = np.asarray(outputs, np.float64)
    calibration = trust.Calibration.from_json(info.get("calibration"))
    unshifted = calibration.apply(task.kind, task.probabilities(outputs[:, :units]),
                                  shift=False)
    probs = calibration.shift(task.kind, unshifted)
    if reference is None:
        return probs, None
    fitted = trust.Unfamiliar.from_json(info["unfamiliar"])
    good = ~np.isnan(outputs).any(axis=1)
    score = np.full(len(outputs), np.nan)
    if good.any():
        d = trust.distance(reference, outputs[good, units:], fitted.k)
        # The uncertainty as it was fitted: before the field's prior moved it.
        score[good] = fitted.score(d, trust.uncertainty(task.kind, unshifted[good]))
    return probs, {"score": score, "flagged": good & (np.nan_to_num(score) > fitted.threshold),
                   "threshold": fitted.threshold, "rate": fitted.rate}
