"""What is being predicted: one of two classes, one of K, or any of K labels.

A `Task` fixes the class order once and owns everything that depends on the
kind of problem: the output layer (units, activation), the loss, how labels are
encoded for training, how raw model outputs become probabilities, and how those
are scored. Every other module asks the task instead of testing the kind.

Label encodings (``y`` everywhere in the code):
  binary      int [N] in {0, 1}, 1 = the positive class (``class_names[1]``);
  multiclass  int [N] in 0..K-1, an index into ``class_names``;
  multilabel  int [N, K] of 0/1, one column per label.
"""

import dataclasses
from typing import Dict, Sequence

import numpy as np
from sklearn import metrics as sk_metrics

from small_photo_classifier.pipeline.errors import ConfigError

KINDS = ("binary", "multiclass", "multilabel")
# The headline metric per kind: what scenarios, epochs and models are chosen by.
HEADLINE = {"binary": "auc", "multiclass": "accuracy", "multilabel": "map"}
_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class Task:
    """The kind of problem and its classes, in their fixed order."""
    kind: str
    class_names: tuple

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"--task={self.kind!r}: choose one of {', '.join(KINDS)}.")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if self.kind == "binary" and len(self.class_names) != 2:
            raise ConfigError(f"A binary task has exactly two classes; got "
                              f"{len(self.class_names)}: {', '.join(self.class_names)}.")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"Class names must be unique: {', '.join(self.class_names)}.")

    @classmethod
    def of_model(cls, info: dict) -> "Task":
        """The task an exported model was trained for, from its ``model_info.json``
        (binary with classes "0", "1" for models from before tasks)."""
        return cls(info.get("task", "binary"), tuple(info.get("class_names") or ("0", "1")))

    @property
    def units(self) -> int:
        """Outputs of the model's last layer."""
        return 1 if self.kind == "binary" else len(self.class_names)

    @property
    def activation(self) -> str:
        return "softmax" if self.kind == "multiclass" else "sigmoid"

    @property
    def headline(self) -> str:
        """The metric everything is chosen by (``auc``, ``accuracy`` or ``map``)."""
        return HEADLINE[self.kind]

    @property
    def positive_class(self):
        """The class whose probability a binary model outputs (None otherwise)."""
        return self.class_names[1] if self.kind == "binary" else None

    def loss(self, label_smoothing: float = 0.0):
        """The Keras training loss: (binary or categorical) cross-entropy."""
        import keras
        if self.kind == "multiclass":
            return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)

    def keras_metrics(self) -> list:
        """Running training metrics named ``accuracy`` and ``auc`` (approximate; the
        validation numbers come from `scores`, which are exact)."""
        import keras
        if self.kind == "multiclass":
            return [keras.metrics.CategoricalAccuracy(name="accuracy"),
                    keras.metrics.AUC(name="auc", multi_label=False)]
        return [keras.metrics.BinaryAccuracy(name="accuracy"),
                keras.metrics.AUC(name="auc", multi_label=self.kind == "multilabel")]

    def targets(self, y) -> np.ndarray:
        """Labels as the float32 array the loss expects (one-hot for multi-class)."""
        y = np.asarray(y)
        if self.kind == "multiclass":
            return np.eye(self.units, dtype=np.float32)[y.astype(int)]
        return y.astype(np.float32)

    def probabilities(self, outputs) -> np.ndarray:
        """Model outputs [N, units] -> [N] (binary: P(positive)) or [N, K]."""
        outputs = np.asarray(outputs, np.float64)
        return outputs[:, 0] if self.kind == "binary" and outputs.ndim == 2 else outputs

    def predicted(self, probs, thresholds=None) -> np.ndarray:
        """Hard predictions: binary/multi-label at 0.5 (or per-label ``thresholds``),
        multi-class the most probable class."""
        probs = np.asarray(probs)
        if self.kind == "multiclass":
            return probs.argmax(axis=1)
        cut = 0.5 if thresholds is None else np.asarray(thresholds)
        return (probs >= cut).astype(int)

    def scores(self, y, probs, thresholds=None) -> Dict[str, float]:
        """Exact metrics of ``probs`` against labels ``y``; the headline is always present
        (NaN where it is undefined, e.g. AUC with one class)."""
        y, probs = np.asarray(y), np.asarray(probs, np.float64)
        if len(y) == 0:
            return {self.headline: float("nan"), "loss": float("nan")}
        if self.kind == "binary":
            return _binary_scores(y.astype(int), probs)
        if self.kind == "multiclass":
            return _multiclass_scores(y.astype(int), probs)
        return _multilabel_scores(y.astype(int), probs, thresholds)

    def headline_score(self, y, probs) -> float:
        """Only the headline metric (fast: bootstraps compute it thousands of times)."""
        y, probs = np.asarray(y), np.asarray(probs, np.float64)
        if self.kind == "binary":
            return _auc(y.astype(int), probs)
        if self.kind == "multiclass":
            return float(np.mean(probs.argmax(axis=1) == y))
        ap = [sk_metrics.average_precision_score(y[:, j], probs[:, j])
              for j in range(y.shape[1]) if y[:, j].any()]
        return float(np.mean(ap)) if ap else float("nan")

    def describe(self) -> str:
        """One line for logs, e.g. ``multiclass, 12 classes``."""
        if self.kind == "binary":
            return f"binary (positive class {self.positive_class!r})"
        noun = "classes" if self.kind == "multiclass" else "labels"
        return f"{self.kind}, {len(self.class_names)} {noun}"


def _auc(y, p) -> float:
    return float(sk_metrics.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def _binary_scores(y, p) -> Dict[str, float]:
    q = np.clip(p, _EPS, 1 - _EPS)
    predicted = (p >= 0.5).astype(int)
    out = {"auc": _auc(y, p), "accuracy": float(np.mean(predicted == y)),
           "loss": float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))}
    if len(np.unique(y)) == 2:
        out["balanced_accuracy"] = float(sk_metrics.balanced_accuracy_score(y, predicted))
    return out


def _multiclass_scores(y, p) -> Dict[str, float]:
    k = p.shape[1]
    q = np.clip(p, _EPS, 1.0)
    out = {"accuracy": float(np.mean(p.argmax(axis=1) == y)),
           "loss": float(-np.mean(np.log(q[np.arange(len(y)), y]))),
           "balanced_accuracy": float(sk_metrics.balanced_accuracy_score(y, p.argmax(axis=1)))}
    present = np.unique(y)
    aucs = [_auc((y == c).astype(int), p[:, c]) for c in present]
    out["auc"] = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
    if k > 5:
        top5 = np.argsort(-p, axis=1)[:, :5]
        out["top5_accuracy"] = float(np.mean([t in row for t, row in zip(y, top5)]))
    return out


def _multilabel_scores(y, p, thresholds=None) -> Dict[str, float]:
    q = np.clip(p, _EPS, 1 - _EPS)
    cut = 0.5 if thresholds is None else np.asarray(thresholds)
    predicted = (p >= cut).astype(int)
    per_label_ap = [sk_metrics.average_precision_score(y[:, j], p[:, j])
                    for j in range(y.shape[1]) if y[:, j].any()]
    aucs = [_auc(y[:, j], p[:, j]) for j in range(y.shape[1])]
    return {"map": float(np.mean(per_label_ap)) if per_label_ap else float("nan"),
            "auc": float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan"),
            "f1_micro": float(sk_metrics.f1_score(y, predicted, average="micro",
                                                  zero_division=0)),
            "f1_macro": float(sk_metrics.f1_score(y, predicted, average="macro",
                                                  zero_division=0)),
            "accuracy": float(np.mean((predicted == y).all(axis=1))),
            "loss": float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))}


def binary(class_names: Sequence[str] = ("0", "1")) -> Task:
    """The binary task with (negative, positive) class names."""
    return Task("binary", tuple(class_names))


def choose_thresholds(y, probs) -> np.ndarray:
    """Per-label decision thresholds (multi-label) that maximise each label's F1 on the
    given images; 0.5 for a label without positives there."""
    y, probs = np.asarray(y).astype(int), np.asarray(probs, np.float64)
    out = np.full(y.shape[1], 0.5)
    for j in range(y.shape[1]):
        if not y[:, j].any():
            continue
        precision, recall, cuts = sk_metrics.precision_recall_curve(y[:, j], probs[:, j])
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        out[j] = float(cuts[int(np.argmax(f1[:-1]))]) if len(cuts) else 0.5
    return out


def per_class_report(task: Task, y, probs, thresholds=None):
    """scikit-learn's classification report (precision, recall, F1, support per class, and
    per label for multi-label at ``thresholds``) as a table."""
    import pandas as pd
    y = np.asarray(y).astype(int)
    report = sk_metrics.classification_report(
        y, task.predicted(probs, thresholds), labels=None if task.kind == "multilabel"
        else list(range(len(task.class_names))), target_names=list(task.class_names),
        output_dict=True, zero_division=0)
    rows = [{"class": name, **values} for name, values in report.items()
            if isinstance(values, dict)]
    table = pd.DataFrame(rows)
    if task.kind == "multilabel":
        aucs = {n: _auc(y[:, j], np.asarray(probs)[:, j]) for j, n in enumerate(task.class_names)}
        table["auc"] = [aucs.get(c, np.nan) for c in table["class"]]
        if thresholds is not None:
            cuts = dict(zip(task.class_names, thresholds))
            table["threshold"] = [cuts.get(c, np.nan) for c in table["class"]]
    return table


def per_class_intervals(task: Task, y, probs, thresholds=None, seed: int = 0,
                        rounds: int = 1000):
    """Precision, recall and F1 of each class (each label for multi-label; both classes of
    a binary task) at the task's decisions, with 95 % intervals from a bootstrap over the
    images (percentiles of ``rounds`` resamples, all classes from the same resamples), and
    the support. A table with one row per class."""
    import pandas as pd
    y = np.asarray(y).astype(int)
    predicted = np.asarray(task.predicted(probs, thresholds)).astype(int)
    if task.kind == "multilabel":
        truth, guess = y.astype(bool), predicted.astype(bool)
    else:
        classes = np.arange(len(task.class_names))
        truth, guess = y[:, None] == classes, predicted[:, None] == classes
    counts = np.random.default_rng(seed).multinomial(len(y), np.full(len(y), 1 / len(y)),
                                                     rounds).astype(np.float64)
    counts = np.vstack([np.ones(len(y)), counts])  # row 0: the images as they are
    tp, fp, fn = (counts @ (truth & guess), counts @ (~truth & guess),
                  counts @ (truth & ~guess))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall),
                      0.0)
    rows = []
    for c, name in enumerate(task.class_names):
        row = {"class": name, "support": int(truth[:, c].sum())}
        for metric, values in (("precision", precision), ("recall", recall), ("f1", f1)):
            low, high = np.quantile(values[1:, c], [0.025, 0.975])
            row.update({metric: round(float(values[0, c]), 6),
                        f"{metric}_low": round(float(low), 6),
                        f"{metric}_high": round(float(high), 6)})
        rows.append(row)
    return pd.DataFrame(rows)


def class_counts(task: "Task | None", y) -> np.ndarray:
    """Training images per class, in class order; for a multi-label task, images carrying
    each label. Without a task, ``y`` holds class indices."""
    y = np.asarray(y)
    if task is not None and task.kind == "multilabel":
        return y.reshape(len(y), -1).sum(axis=0).astype(int)
    return np.bincount(y.astype(int), minlength=len(task.class_names) if task else 0)


def smallest_class(task: "Task | None", y) -> tuple:
    """(index, count) of the class with the fewest images in ``y``, among the classes
    that have any (a multi-label task: among all labels, since every fold needs each)."""
    counts = class_counts(task, y)
    if task is None or task.kind != "multilabel":
        counts = np.where(counts > 0, counts, np.iinfo(np.int64).max)
    index = int(np.argmin(counts))
    return index, int(counts[index])


# --class_weight=auto weights the classes when the smallest has under this share.
IMBALANCED = 0.30


def class_weights(task: Task, y, mode: str = "auto"):
    """{class index: weight} for ``--class_weight``, or None for no weighting.

    ``balanced`` (and ``auto`` when the smallest class has under `IMBALANCED` of the
    images) weighs each class by N / (K * its count), scikit-learn's "balanced" rule,
    so every class carries the same total weight in the loss. Multi-label tasks are
    not weighted (a label's absence is not a class).
    """
    if mode == "none" or task.kind == "multilabel":
        return None
    y = np.asarray(y).astype(int)
    counts = class_counts(task, y).astype(float)
    if mode == "auto" and counts.min() / counts.sum() >= IMBALANCED:
        return None
    return {c: float(len(y) / (len(counts) * n)) for c, n in enumerate(counts) if n > 0}
