"""``--prior``: the class shares of the photos a model will meet, against those it was
trained on (Saerens, Latinne & Decaestecker 2002, "Adjusting the outputs of a classifier
to new a priori probabilities").

A model's calibrated probabilities carry the class shares of its training labels. When
the field's shares differ (5 % invasive plants in survey photos, a balanced training
set), each probability is moved by the ratio of the shares (`features.trust.prior_shift`,
applied after the calibration everywhere a probability leaves the tool). ``train.py
--prior`` stores the shift with the model (so exports carry it); ``predict.py --prior``
applies another one for one prediction, and ``--prior=estimate`` estimates the shares of
the photos given by the same paper's EM procedure and says them.
"""

import logging
from typing import Dict, Optional, Sequence

import numpy as np

from small_photo_classifier.features import trust
from small_photo_classifier.features.task import Task
from small_photo_classifier.pipeline.errors import ConfigError

ESTIMATE = "estimate"
# Fewer photos than this give the EM estimate little to stand on (it says so).
FEW_PHOTOS = 100


def check_text(text: Optional[str], allow_estimate: bool = False) -> Optional[str]:
    """``--prior``'s form, checked before TensorFlow starts (the classes are checked
    against the model later): ``CLASS:SHARE,...``, a share (binary: the positive
    class's) or, for predict.py, ``estimate``."""
    if text in (None, ""):
        return None
    text = str(text).strip()
    if text.lower() == ESTIMATE:
        if not allow_estimate:
            raise ConfigError("--prior=estimate is predict.py's: it estimates the shares of "
                              "the photos it is given. train.py takes the shares, e.g. "
                              "--prior=bees:0.2.")
        return ESTIMATE
    _parts(text)
    return text


def _parts(text: str) -> Dict[Optional[str], float]:
    parts = {}
    for item in text.split(","):
        name, _, share = item.rpartition(":")
        try:
            value = float(share)
        except ValueError:
            raise ConfigError(f"--prior={text!r}: expected CLASS:SHARE pairs such as "
                              "bees:0.2,ants:0.8 (or one share, the positive class's); "
                              f"{item!r} has no share.") from None
        if not 0 < value < 1:
            raise ConfigError(f"--prior={text!r}: a share is between 0 and 1; got {value}.")
        parts[name.strip() or None] = value
    return parts


def field_shares(text: str, task: Task) -> np.ndarray:
    """The shares ``text`` names, in the task's class order (summing to 1)."""
    if task.kind == "multilabel":
        raise ConfigError("--prior moves one label per photo among the classes; a multi-"
                          "label model's labels are not shares of one whole.")
    parts = _parts(text)
    names = list(task.class_names)
    if None in parts:
        if task.kind != "binary" or len(parts) != 1:
            raise ConfigError(f"--prior={text!r}: a share without a class name is the "
                              "positive class's, for two classes only; name each class "
                              f"(classes: {', '.join(names)}).")
        return np.array([1 - parts[None], parts[None]])
    unknown = [n for n in parts if n not in names]
    if unknown:
        raise ConfigError(f"--prior={text!r}: no class {', '.join(map(repr, unknown))}; the "
                          f"model's classes: {', '.join(names)}.")
    if task.kind == "binary" and len(parts) == 1:
        (name, share), = parts.items()
        return np.array([1 - share, share] if name == names[1] else [share, 1 - share])
    missing = [n for n in names if n not in parts]
    total = sum(parts.values())
    if missing or abs(total - 1) > 0.01:
        raise ConfigError(f"--prior={text!r}: name every class with shares that sum to 1 "
                          f"(missing: {', '.join(missing) or 'none'}; sum {total:g}).")
    return np.array([parts[n] for n in names]) / total


def training_shares(task: Task, y) -> np.ndarray:
    """The class shares of training labels ``y`` (binary and multi-class)."""
    counts = np.bincount(np.asarray(y).astype(int), minlength=len(task.class_names))
    return counts / max(1, counts.sum())


def record(task: Task, training: Sequence[float], field: Optional[Sequence[float]],
           source: str) -> dict:
    """model_info.json's ``prior``: the training shares, and the field's when applied."""
    out = {"training": {c: round(float(s), 6) for c, s in zip(task.class_names, training)}}
    if field is not None:
        out.update({"field": {c: round(float(s), 6) for c, s in zip(task.class_names, field)},
                    "source": source})
    return out


def for_prediction(text: str, task: Task, info: dict, unshifted) -> tuple:
    """(the shift to apply, the field's shares, what to say) for ``predict.py --prior``:
    the shares named, or (``estimate``) those the EM procedure finds in the calibrated
    probabilities ``unshifted`` of the photos."""
    stored = (info.get("prior") or {}).get("training")
    if not stored:
        raise ConfigError("--prior needs the class shares the model was trained on, which "
                          "model_info.json records from this version on: train the model "
                          "again to use --prior with it.")
    training = np.array([stored[c] for c in task.class_names], np.float64)
    if text == ESTIMATE:
        field = trust.estimate_prior(task.kind, unshifted, training)
        n = int((~np.isnan(np.asarray(unshifted, np.float64).reshape(len(unshifted), -1))
                 .any(axis=1)).sum())
        said = (f"estimated class shares of these {n} photos (EM, Saerens et al. 2002): "
                + ", ".join(f"{c} {s:.3f}" for c, s in zip(task.class_names, field)))
        if n < FEW_PHOTOS:
            said += (f" -- from only {n} photos: a rough estimate (it needs about "
                     f"{FEW_PHOTOS} or more)")
            logging.warning("--prior=estimate on %d photos: a rough estimate.", n)
    else:
        field = field_shares(text, task)
        said = "probabilities moved to the field's class shares " + ", ".join(
            f"{c} {s:.3f}" for c, s in zip(task.class_names, field))
    return trust.prior_shift(task.kind, training, field), field, said
