"""Probabilities a user can threshold, and a score for photos unlike the training photos.

Both are fitted at export time on **held-out predictions** (out-of-fold predictions of
the training split when the exported kind of model was cross-validated, else the
validation images), never on images the scored model trained on, and stored in
``model_info.json`` (``calibration``, ``unfamiliar``) plus ``reference_features.npz``.

* **Calibration** maps the model's probabilities to calibrated ones. Multi-class:
  temperature scaling, ``softmax(log p / T)``; multi-label: one temperature per
  label on the logit; binary: temperature or Platt scaling (``sigmoid(a logit p +
  b)``), whichever has the lower log loss in a 5-fold cross-validation of the
  calibrator on the held-out predictions (Platt has one parameter more, so its fit
  on the same predictions would always look better). Every map is increasing, so
  ranking metrics (AUC, top-1) do not change.
* **Unfamiliar score**: ``2 z(log d) + z(log u)``, where ``d`` is the cosine distance
  to the ``K``-th nearest reference photo (the model's training photos) in the
  backbone's globally average-pooled feature space, ``u`` the calibrated model's
  uncertainty (1 - the top-class probability; multi-label: the mean over labels of 1
  - max(p, 1 - p)), and ``z`` standardises each by its mean and standard deviation on
  the held-out known-class photos. Distance catches photos far from everything the
  model saw (another kind of photo), uncertainty photos between known classes (a
  similar species); the measurements behind the choice are in docs/benchmarks.md.
  A photo is flagged ``unfamiliar`` above the threshold that flags ``rate`` of the
  held-out known-class photos.

This module is NumPy only; `features.trust_layers` holds the same computations as
Keras layers for the exported graphs.
"""

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np

EPS = 1e-7          # probabilities are clipped to [EPS, 1 - EPS] before a logit or log
K_NEAREST = 3       # the distance is to the K-th nearest reference photo
DISTANCE_WEIGHT = 2.0  # the distance's weight against the uncertainty's (docs/benchmarks.md)
MIN_DISTANCE = 1e-4   # a copy of a reference photo is as familiar as a photo gets
UNCERTAINTY_FLOOR = 1e-3   # log(u + floor): a confident photo's u is ~0, and below
# 1e-3 float32 rounding of a probability near 1 (6e-8) would move the score in exports
DEDUPE_SIMILARITY = 0.999  # reference photos closer than this to a kept one add nothing
REFERENCE_FILE = "reference_features.npz"


# --------------------------------------------------------------------------- calibration

def _logit(p):
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _softmax_log(p, t):
    z = np.log(np.clip(np.asarray(p, np.float64), EPS, 1.0)) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A fitted calibration map (``kind`` none, temperature or platt).

    ``temperature``: one value (binary, multi-class) or one per label (multi-label).
    ``platt``: binary only, ``slope`` and ``bias`` on the logit.
    ``prior_shift``: the field's class shares against the training data's, applied after
    the map (Saerens, Latinne & Decaestecker 2002): ``log(field / training)`` per class
    (multi-class), or the log-odds ratio of the positive class (binary); () for none."""
    kind: str = "none"
    temperature: tuple = ()
    slope: float = 1.0
    bias: float = 0.0
    fitted_on: str = ""
    prior_shift: tuple = ()

    def apply(self, task_kind: str, probs, shift: bool = True) -> np.ndarray:
        """The calibrated probabilities ([N] for binary, [N, K] otherwise), moved to the
        field's prior unless ``shift`` is False; NaN rows stay NaN."""
        p = np.asarray(probs, np.float64)
        if self.kind == "platt":
            p = _sigmoid(self.slope * _logit(p) + self.bias)
        elif self.kind != "none":
            t = np.asarray(self.temperature, np.float64)
            if task_kind == "multiclass":
                p = _softmax_log(p, float(t[0]))
            else:
                p = _sigmoid(_logit(p) / (t if task_kind == "multilabel" else float(t[0])))
        return self.shift(task_kind, p) if shift else p

    def shift(self, task_kind: str, p) -> np.ndarray:
        """Calibrated probabilities moved to the field's prior (`prior_shift`)."""
        if not self.prior_shift:
            return np.asarray(p, np.float64)
        if task_kind == "multiclass":
            z = np.log(np.clip(np.asarray(p, np.float64), EPS, 1.0)) + np.asarray(
                self.prior_shift, np.float64)
            z -= z.max(axis=1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=1, keepdims=True)
        return _sigmoid(_logit(p) + float(self.prior_shift[0]))

    def to_json(self) -> dict:
        return {"kind": self.kind, "temperature": [float(t) for t in self.temperature],
                "slope": float(self.slope), "bias": float(self.bias),
                "fitted_on": self.fitted_on,
                **({"prior_shift": [float(v) for v in self.prior_shift]}
                   if self.prior_shift else {})}

    @classmethod
    def from_json(cls, data: Optional[dict]) -> "Calibration":
        if not data:
            return cls()
        return cls(data.get("kind", "none"), tuple(data.get("temperature", ())),
                   float(data.get("slope", 1.0)), float(data.get("bias", 0.0)),
                   data.get("fitted_on", ""), tuple(data.get("prior_shift", ())))

    def describe(self) -> str:
        if self.kind == "platt":
            return f"Platt scaling (slope {self.slope:.3f}, bias {self.bias:+.3f})"
        if self.kind == "temperature":
            ts = ", ".join(f"{t:.3f}" for t in self.temperature)
            return f"temperature scaling (T = {ts})"
        return "none (the model's own probabilities)"


def prior_shift(task_kind: str, training: Sequence[float], field: Sequence[float]) -> tuple:
    """`Calibration.prior_shift` for class shares ``training`` (what the model's calibrated
    probabilities reflect) and ``field`` (both in class order)."""
    a = np.clip(np.asarray(training, np.float64), EPS, 1.0)
    b = np.clip(np.asarray(field, np.float64), EPS, 1.0)
    if task_kind == "binary":
        return (float(np.log(b[1] / (1 - b[1])) - np.log(a[1] / (1 - a[1]))),)
    return tuple(float(v) for v in np.log(b / b.sum()) - np.log(a / a.sum()))


def estimate_prior(task_kind: str, probs, training: Sequence[float], rounds: int = 200,
                   tolerance: float = 1e-6) -> np.ndarray:
    """The class shares of the photos whose calibrated probabilities are ``probs`` (at the
    training shares ``training``), by Saerens, Latinne & Decaestecker's EM: move the
    probabilities to the current estimate, average them, repeat."""
    p = np.asarray(probs, np.float64)
    if task_kind == "binary":
        p = np.column_stack([1 - p, p])
    p = p[~np.isnan(p).any(axis=1)]
    base = np.clip(np.asarray(training, np.float64), EPS, 1.0)
    base = base / base.sum()
    current = base.copy()
    for _ in range(rounds):
        moved = p * (current / base)
        moved /= moved.sum(axis=1, keepdims=True)
        estimate = moved.mean(axis=0)
        if np.abs(estimate - current).max() < tolerance:
            return estimate
        current = estimate
    return current


MIN_ERRORS = 10  # held-out mistakes needed before a map may sharpen the probabilities


def _fit_temperature(nll, lowest: float = 0.02) -> float:
    """The temperature minimising ``nll(t)`` (a smooth 1-D problem: bounded search on
    log t), at least ``lowest``."""
    from scipy.optimize import minimize_scalar
    found = minimize_scalar(lambda s: nll(np.exp(s)), bounds=(np.log(lowest), np.log(50.0)),
                            method="bounded", options={"xatol": 1e-5})
    return float(np.exp(found.x))


def _lowest(errors: int) -> float:
    """The lowest temperature the held-out predictions support: with fewer than
    `MIN_ERRORS` mistakes among them the likelihood only says "sharper" (a model that was
    never wrong there would get T -> 0 and certainty everywhere), so it may only soften."""
    return 0.02 if errors >= MIN_ERRORS else 1.0


def _binary_nll(y, p) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _fit_binary(kind: str, y, p) -> Calibration:
    y = np.asarray(y, np.float64)
    z = _logit(p)
    lowest = _lowest(int(np.sum((p >= 0.5) != (y > 0.5))))
    if kind == "temperature":
        t = _fit_temperature(lambda t: _binary_nll(y, _sigmoid(z / t)), lowest)
        return Calibration("temperature", (t,))
    from scipy.optimize import minimize

    def loss(w):
        q = np.clip(_sigmoid(w[0] * z + w[1]), EPS, 1 - EPS)
        grad_z = q - y
        return (_binary_nll(y, q), np.array([np.mean(grad_z * z), np.mean(grad_z)]))
    found = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                     bounds=[(1e-3, 1.0 / lowest), (-20.0, 20.0)])  # slope > 0: increasing
    return Calibration("platt", (), float(found.x[0]), float(found.x[1]))


def fit(task_kind: str, y, probs, fitted_on: str, seed: int = 0, groups=None) -> Calibration:
    """The calibration map for ``probs`` (held-out predictions) against labels ``y``;
    ``groups`` (one per image, or None): photos of one subject, kept in one fold when the
    binary map is chosen by cross-validation."""
    y, p = np.asarray(y), np.asarray(probs, np.float64)
    if len(y) < 2:
        return Calibration(fitted_on=fitted_on)
    if task_kind == "multiclass":
        rows = np.arange(len(y))
        t = _fit_temperature(lambda t: float(-np.mean(np.log(np.clip(
            _softmax_log(p, t)[rows, y.astype(int)], EPS, 1.0)))),
            _lowest(int(np.sum(p.argmax(axis=1) != y))))
        return Calibration("temperature", (t,), fitted_on=fitted_on)
    if task_kind == "multilabel":
        ts = []
        for j in range(p.shape[1]):
            yj, zj = y[:, j].astype(np.float64), _logit(p[:, j])
            lowest = _lowest(int(np.sum((p[:, j] >= 0.5) != (yj > 0.5))))
            ts.append(_fit_temperature(lambda t: _binary_nll(yj, _sigmoid(zj / t)), lowest)
                      if 0 < yj.sum() < len(yj) else 1.0)
        return Calibration("temperature", tuple(ts), fitted_on=fitted_on)
    chosen = _choose_binary(y.astype(int), p, seed, groups)
    return dataclasses.replace(_fit_binary(chosen, y, p), fitted_on=fitted_on)


def _choose_binary(y, p, seed: int, groups=None) -> str:
    """Temperature or Platt by the log loss of a 5-fold cross-validation of each map on
    the held-out predictions, each group in one fold (temperature on ties or too few
    photos, or groups, of a class)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    folds = min(5, int(np.bincount(y, minlength=2).min()))
    if groups is not None:
        folds = min(folds, *(len(set(np.asarray(groups)[y == c])) for c in (0, 1)))
    if folds < 2:
        return "temperature"
    losses = {"temperature": [], "platt": []}
    splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed) if groups is None
                else StratifiedGroupKFold(folds, shuffle=True, random_state=seed))
    for tr, va in splitter.split(p, y, groups):
        for kind in losses:
            cal = _fit_binary(kind, y[tr], p[tr])
            losses[kind].append(_binary_nll(y[va], cal.apply("binary", p[va])) * len(va))
    return "platt" if sum(losses["platt"]) < sum(losses["temperature"]) else "temperature"


def confidence(task_kind: str, probs):
    """(confidence, correct-or-not function input) per row: the top-class probability
    (binary: max(p, 1 - p)); multi-label: each label's probability, flattened."""
    p = np.asarray(probs, np.float64)
    if task_kind == "multiclass":
        return p.max(axis=1)
    return np.maximum(p, 1 - p).ravel()


def _hits(task_kind: str, y, probs) -> np.ndarray:
    p, y = np.asarray(probs, np.float64), np.asarray(y)
    if task_kind == "multiclass":
        return (p.argmax(axis=1) == y).astype(float)
    return ((p >= 0.5).astype(int) == y.astype(int)).astype(float).ravel()


def reliability(task_kind: str, y, probs, bins: int = 10) -> Dict[str, list]:
    """The reliability diagram's bins (equal width over confidence 0.5..1 for binary and
    multi-label, 0..1 for multi-class): mean confidence, accuracy and count per bin."""
    conf, hit = confidence(task_kind, probs), _hits(task_kind, y, probs)
    lo = 0.0 if task_kind == "multiclass" else 0.5
    edges = np.linspace(lo, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    out = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        m = which == b
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else None)
        out["accuracy"].append(float(hit[m].mean()) if m.any() else None)
    return out


def metrics(task_kind: str, y, probs, bins: int = 10) -> Dict[str, float]:
    """Log loss, Brier score and expected calibration error (of the top-class
    probability; multi-label: of every label's) of ``probs`` against ``y``."""
    p, y = np.asarray(probs, np.float64), np.asarray(y)
    if len(y) == 0:
        return {}
    if task_kind == "multiclass":
        onehot = np.eye(p.shape[1])[y.astype(int)]
        log_loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y.astype(int)],
                                                 EPS, 1.0))))
        brier = float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    else:
        log_loss = _binary_nll(y.astype(np.float64).ravel(), p.ravel())
        brier = float(np.mean((p.ravel() - y.astype(np.float64).ravel()) ** 2))
    table = reliability(task_kind, y, p, bins)
    n = sum(table["count"])
    ece = sum(c * abs(a - f) for c, a, f in zip(table["count"], table["accuracy"],
                                                 table["confidence"]) if c) / max(1, n)
    return {"log_loss": log_loss, "brier": brier, "ece": float(ece)}


# ---------------------------------------------------------------------- unfamiliar photos

def normalise(features) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity is then a dot product)."""
    x = np.asarray(features, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def deduplicate(features, similarity: float = DEDUPE_SIMILARITY) -> np.ndarray:
    """The unit-length rows of ``features`` without near-copies (a row within
    ``similarity`` of an earlier kept row adds nothing to a nearest-neighbour search)."""
    x = normalise(features)
    kept = []
    for i in range(len(x)):
        if not kept or float(np.max(x[kept] @ x[i])) < similarity:
            kept.append(i)
    return x[kept]


def distance(reference, features, k: int = K_NEAREST, chunk: int = 512) -> np.ndarray:
    """Cosine distance of each row of ``features`` to its ``k``-th nearest row of
    ``reference`` (unit-length rows, e.g. from `deduplicate`)."""
    ref = normalise(reference)  # already unit rows when stored; cheap to be sure
    q = normalise(features)
    k = max(1, min(k, len(ref)))
    out = []
    for i in range(0, len(q), chunk):
        sims = q[i:i + chunk] @ ref.T
        out.append(1.0 - np.partition(sims, -k, axis=1)[:, -k])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def uncertainty(task_kind: str, probs) -> np.ndarray:
    """1 - the top-class probability (binary: 1 - max(p, 1 - p)); multi-label: the mean
    over labels of 1 - max(p, 1 - p)."""
    p = np.asarray(probs, np.float64)
    if task_kind == "multiclass":
        return 1.0 - p.max(axis=1)
    if task_kind == "multilabel":
        return np.mean(1.0 - np.maximum(p, 1 - p), axis=1)
    return 1.0 - np.maximum(p, 1 - p)


@dataclasses.dataclass(frozen=True)
class Unfamiliar:
    """The fitted unfamiliar score: standardisation of its two signals and the threshold."""
    k: int
    log_d_mean: float
    log_d_std: float
    log_u_mean: float
    log_u_std: float
    threshold: float
    rate: float
    held_out: str = ""
    held_out_images: int = 0
    distance_weight: float = DISTANCE_WEIGHT

    def score(self, d, u) -> np.ndarray:
        """``w z(log d) + z(log u)``; higher = less like the training photos."""
        return (self.distance_weight * (np.log(np.maximum(d, MIN_DISTANCE)) - self.log_d_mean)
                / self.log_d_std
                + (np.log(np.asarray(u) + UNCERTAINTY_FLOOR) - self.log_u_mean)
                / self.log_u_std)

    def flagged(self, scores) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def to_json(self) -> dict:
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: Optional[dict]) -> Optional["Unfamiliar"]:
        if not data:
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def fit_unfamiliar(d, u, rate: float, held_out: str, k: int = K_NEAREST) -> Unfamiliar:
    """The score's standardisation and threshold from held-out known-class photos'
    distances ``d`` and uncertainties ``u``: about ``rate`` of them score above it."""
    log_d = np.log(np.maximum(np.asarray(d, np.float64), MIN_DISTANCE))
    log_u = np.log(np.asarray(u, np.float64) + UNCERTAINTY_FLOOR)
    fitted = Unfamiliar(k, float(log_d.mean()), float(max(log_d.std(), 1e-6)),
                        float(log_u.mean()), float(max(log_u.std(), 1e-6)), 0.0, float(rate),
                        held_out, int(len(log_d)))
    scores = fitted.score(d, u)
    threshold = float(np.quantile(scores, 1.0 - rate)) if len(scores) else float("inf")
    return dataclasses.replace(fitted, threshold=threshold)


def fold_distances(features, folds: Sequence[np.ndarray], k: int = K_NEAREST) -> np.ndarray:
    """Each photo's distance to the photos outside its fold (held-out distances of the
    reference photos themselves; ``folds``: each fold's row indices)."""
    x = np.asarray(features, np.float32)
    d = np.zeros(len(x))
    for rows in folds:
        rest = np.setdiff1d(np.arange(len(x)), rows)
        d[rows] = distance(deduplicate(x[rest]), x[rows], k)
    return d
