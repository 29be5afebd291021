"""At export: the calibration, the unfamiliar score and the decision threshold of the
exported model, fitted on held-out predictions (`features.trust`), and the reference
features stored beside the model.

Which held-out predictions: the out-of-fold predictions of the training split when the
heads stage cross-validated the very kind of model that is exported (the probe or a
head on frozen features; ``heads/oof.npz``), else the validation images' predictions of
the final model before any refit. A model that was then refit on every label gets the
maps fitted on its predecessors' held-out predictions (the way scikit-learn's
``CalibratedClassifierCV(ensemble=False)`` does), never on images it trained on.
"""

import dataclasses
import logging
import os
from typing import Optional

import numpy as np
import pandas as pd

from small_photo_classifier.features import networks, trust
from small_photo_classifier.pipeline import groups as groups_lib
from small_photo_classifier.pipeline.atomic import atomic_path
from small_photo_classifier.workflow.base import prior as prior_lib

OOF_FILE = os.path.join("heads", "oof.npz")
MIN_HELD_OUT = 10  # fewer held-out images fit nothing worth shipping


def save_oof(job, what: str, probs) -> None:
    """The heads stage's chosen out-of-fold predictions (``what``: probe or a scenario),
    for the export's calibration."""
    path = job.run.file(OOF_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, probs=np.asarray(probs, np.float64), what=np.array(what),
                     names=np.array(job.train.name.astype(str).tolist()))


def _load_oof(job, what: str) -> Optional[np.ndarray]:
    path = job.run.file(OOF_FILE)
    if not job.folds or not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["what"]) != what or list(z["names"]) != job.train.name.astype(str).tolist():
            return None
        return z["probs"]


def pooled(job, cache, frame: pd.DataFrame, start: str, batch_size: int) -> np.ndarray:
    """The globally average-pooled feature map of ``frame``'s images as the classifier
    computes it now. ``start``: where its trained part begins; above the feature map the
    cache holds it, from the stem layer it is the cached stem features through the
    (trained) last stage, below that it is computed from the images."""
    from small_photo_classifier.features.serve import inference
    from small_photo_classifier.workflow.train.job import Features
    net = job.classifier.net
    if start == net.stem_layer:
        below = Features(job, cache, batch_size).of(frame)[net.stem_layer]
        fmap = np.concatenate([np.asarray(job.classifier.last(np.asarray(
            below[i:i + batch_size]), training=False)) for i in range(0, len(frame), batch_size)]
            or [np.zeros((0, *job.classifier.last.output.shape[1:]), np.float32)])
    elif start == networks.INPUT:  # blocks below the last stage trained too
        fmap = inference.HeldOut(job.classifier, frame.path.tolist(), job.model.image_size,
                                 batch_size).features(net.feature_layer)
    else:
        fmap = np.asarray(Features(job, cache, batch_size).of(frame)[net.feature_layer])
    fmap = np.asarray(fmap, np.float32)
    return fmap.mean(axis=(1, 2)) if fmap.ndim == 4 else fmap


def _held_out(job, cache, batch_size: int, what: str, start: str, val_probs, oof_ok: bool):
    """(labels, probabilities, distances, groups or None, what they are) of the held-out
    images, or a string saying why there are too few."""
    oof = _load_oof(job, what) if oof_ok else None
    if oof is not None:
        folds = [va for _, va in job.folds]
        d = trust.fold_distances(pooled(job, cache, job.train, start, batch_size), folds,
                                 trust.K_NEAREST)
        return (job.y_train, oof, d, job.train_groups, f"out-of-fold predictions of the {len(job.y_train)} "
                f"training images ({len(folds)}-fold cross-validation of {what})")
    if len(job.val) < MIN_HELD_OUT:
        return (f"only {len(job.val)} validation image(s) and no out-of-fold predictions of "
                "this model: calibration and the unfamiliar threshold need at least "
                f"{MIN_HELD_OUT} held-out images")
    train_x = pooled(job, cache, job.train, start, batch_size)
    val_x = pooled(job, cache, job.val, start, batch_size)
    d = trust.distance(trust.deduplicate(train_x), val_x, trust.K_NEAREST)
    return (job.y_val, val_probs, d, groups_lib.of(job.val),
            f"the {len(job.y_val)} validation images, predicted by "
            "the final model before any refit")


def _calibration(kind: str, y, probs, where: str, seed: int, groups=None):
    """(the map, metrics before, cross-fitted metrics after): the identity when the map
    does not lower the cross-fitted log loss. ``groups``: each held-out photo's group
    (None: each photo its own), kept whole in every fold of both cross-validations."""
    calibration = trust.fit(kind, y, probs, where, seed, groups)
    before = trust.metrics(kind, y, probs)
    after = _cross_fitted(kind, y, probs, seed, groups)
    if after["log_loss"] >= before["log_loss"]:
        # With few errors among the held-out predictions a map fitted without them
        # sharpens, and the next error costs more than the map gains: keep the model's own.
        logging.info("Calibration: %s would not lower the cross-fitted log loss (%.4f -> "
                     "%.4f) on %s: keeping the model's own probabilities.",
                     calibration.describe(), before["log_loss"], after["log_loss"], where)
        return trust.Calibration("none", fitted_on=(
            f"{where}; {calibration.describe()} did not lower the cross-fitted log loss "
            f"({before['log_loss']:.4f} -> {after['log_loss']:.4f}): not applied")), \
            before, before
    logging.info("Calibration: %s, fitted on %s; log loss %.4f -> %.4f (cross-fitted), "
                 "ECE %.4f -> %.4f.", calibration.describe(), where, before["log_loss"],
                 after["log_loss"], before["ece"], after["ece"])
    return calibration, before, after


def fit_held_out(job, cache, batch_size: int, what: str, start: str, val_probs, predict,
                 oof_ok: bool) -> dict:
    """Calibration, unfamiliar score and threshold from held-out predictions of the
    model as it is now (before any refit). ``oof_ok``: the heads stage's out-of-fold
    predictions are of this very model kind (trained above the frozen feature map, not
    fine-tuned since). ``predict``: ``--unfamiliar_rate`` and ``--threshold``. Returns
    model_info.json's additions (key ``info``; empty when there are too few held-out
    images) and metrics.json's ``trust`` (``metrics``)."""
    kind = job.task.kind
    held = _held_out(job, cache, batch_size, what, start, val_probs, oof_ok)
    if isinstance(held, str):
        logging.info("Not calibrated, no unfamiliar score: %s.", held)
        return {"info": {}, "metrics": {"skipped": held}}
    y, probs, d, groups, where = held
    probs = job.task.probabilities(probs)  # binary: P(positive) [N], whatever produced it
    calibration, before, after = _calibration(kind, y, probs, where, job.seed, groups)
    # The uncertainty is measured before any prior's shift (predict.py may apply another).
    u = trust.uncertainty(kind, calibration.apply(kind, probs))
    calibration, weights, prior = _with_prior(job, calibration, y, predict.prior)
    calibrated = calibration.apply(kind, probs)
    unfamiliar = trust.fit_unfamiliar(d, u, predict.unfamiliar_rate, where)
    report = {"held_out": where, "images": int(len(y)), "calibration": calibration.to_json(),
              "before": before, "after_cross_fitted": after,
              "reliability_before": trust.reliability(kind, y, probs),
              "reliability_after": trust.reliability(kind, y, calibrated),
              "unfamiliar": unfamiliar.to_json(),
              "unfamiliar_scores": [round(float(s), 4) for s in unfamiliar.score(d, u)]}
    info = {"calibration": calibration.to_json(), "unfamiliar": {
        **unfamiliar.to_json(), "reference_file": trust.REFERENCE_FILE},
        **({"prior": prior} if prior else {})}
    if prior:
        report["prior"] = prior
    if kind != "multiclass":
        spec = predict.threshold or ("0.5" if kind == "binary" else "auto")
        values, expected = choose_thresholds(kind, y, calibrated, spec, job.seed, weights)
        info["threshold_rule"] = spec
        info["thresholds"] = [round(float(v), 6) for v in values]
        report["threshold"] = {"rule": spec, "values": info["thresholds"], **expected}
    return {"info": info, "metrics": report}


def _with_prior(job, calibration, y, text):
    """(the calibration moved to ``--prior``'s shares, each held-out image's weight for
    the thresholds' precision and recall there, model_info.json's ``prior``), or the
    calibration unchanged, no weights and the training shares alone without --prior."""
    if job.task.kind == "multilabel":
        return calibration, None, None
    training = prior_lib.training_shares(job.task, job.frame.label.tolist())
    if not text:
        return calibration, None, prior_lib.record(job.task, training, None, "")
    field = prior_lib.field_shares(text, job.task)
    shifted = dataclasses.replace(calibration, prior_shift=trust.prior_shift(
        job.task.kind, training, field))
    # A held-out image of class c stands for field_c / training_c images in the field.
    weights = (field / np.maximum(training, 1e-12))[np.asarray(y).astype(int)]
    logging.info("--prior=%s: probabilities moved from the training shares (%s) to the "
                 "field's (%s); the threshold's precision and recall are for the field's.",
                 text, ", ".join(f"{c} {s:.3f}" for c, s in zip(job.task.class_names, training)),
                 ", ".join(f"{c} {s:.3f}" for c, s in zip(job.task.class_names, field)))
    return shifted, weights, prior_lib.record(job.task, training, field, f"--prior={text}")


def _cross_fitted(kind: str, y, probs, seed: int, groups=None) -> dict:
    """The calibrated predictions' metrics where each held-out image's map was fitted on
    the other images (5 folds, a group never on both sides): an honest 'after', unlike
    refitting on the same images."""
    from sklearn.model_selection import GroupKFold, KFold
    y, p = np.asarray(y), np.asarray(probs, np.float64)
    if len(y) < 10 or (groups is not None and len(set(groups)) < 5):
        return trust.metrics(kind, y, p)
    splitter = (KFold(5, shuffle=True, random_state=seed) if groups is None
                else GroupKFold(5, shuffle=True, random_state=seed))
    out = np.zeros_like(p)
    for tr, va in splitter.split(p, y, groups):
        out[va] = trust.fit(kind, y[tr], p[tr], "", seed,
                            None if groups is None else np.asarray(groups)[tr]).apply(kind, p[va])
    return trust.metrics(kind, y, out)


def _one_threshold(y, p, spec: str, weights=None) -> float:
    from sklearn.metrics import precision_recall_curve
    if spec not in ("auto",) and ":" not in spec:
        return float(spec)
    if y.min() == y.max():
        return 0.5
    precision, recall, cuts = precision_recall_curve(y, p, sample_weight=weights)
    precision, recall = precision[:-1], recall[:-1]
    if spec == "auto":
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        return float(cuts[int(np.argmax(f1))])
    what, target = spec.split(":")
    target = float(target)
    if what == "precision":
        ok = np.where(precision >= target)[0]
        return float(cuts[ok[0]]) if len(ok) else float(cuts[-1])
    ok = np.where(recall >= target)[0]
    return float(cuts[ok[-1]]) if len(ok) else float(cuts[0])


def choose_thresholds(kind: str, y, probs, spec: str, seed: int, weights=None):
    """The threshold(s) by ``spec`` on held-out calibrated probabilities (one per label for
    multi-label), with the precision and recall to expect there and 95 % bootstrap
    intervals. ``weights``: each held-out image's weight (the field's class shares over
    the training's, with ``--prior``), so that precision is the field's."""
    y, p = np.asarray(y), np.asarray(probs, np.float64)
    if kind == "binary":
        y, p = y.reshape(-1, 1), p.reshape(-1, 1)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    values = [_one_threshold(y[:, j].astype(int), p[:, j], spec, w)
              for j in range(p.shape[1])]
    hits = (p >= np.asarray(values)).astype(int)
    rng = np.random.default_rng(seed)
    draws = {"precision": [], "recall": []}

    def pr(rows):
        ww = w[rows][:, None]
        tp = float((ww * hits[rows] * y[rows]).sum())
        return (tp / max(1e-12, float((ww * hits[rows]).sum())) if hits[rows].any() else 0.0,
                tp / max(1e-12, float((ww * y[rows]).sum())) if y[rows].any() else 0.0)
    base = pr(np.arange(len(y)))
    for _ in range(1000):
        a, b = pr(rng.integers(0, len(y), len(y)))
        draws["precision"].append(a)
        draws["recall"].append(b)
    expected = {"precision": base[0], "recall": base[1],
                **{f"{k}_interval": [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]
                   for k, v in draws.items()}}
    return values, expected


def store_reference(job, cache, frame: pd.DataFrame, start: str, batch_size: int) -> str:
    """``reference_features.npz``: the pooled features of the images the exported model
    was trained on (as it computes them), unit length, near-copies removed, float16,
    with the backbone's identity."""
    x = trust.deduplicate(pooled(job, cache, frame, start, batch_size))
    path = job.run.file(trust.REFERENCE_FILE)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=x.astype(np.float16), backbone=np.array(
                job.classifier.net.name), images=np.array(len(frame)))
    logging.info("Unfamiliar score: %d reference photos (%d after removing near-copies), "
                 "%.1f MB, in %s.", len(frame), len(x), os.path.getsize(path) / 1e6, path)
    return path
