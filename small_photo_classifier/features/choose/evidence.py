"""Is one model better than another on the same images, by more than noise?

The default output (single model or bag, with or without test-time augmentation,
deep head or probe) is chosen by evidence: a candidate replaces the baseline
only when it scores better on the same held-out images and a paired bootstrap
over those images puts the difference above zero with 90% confidence. With a
few dozen images that takes a clear margin, so in doubt the simpler baseline
stays.

The headline metric is coarse on a few dozen images (accuracy moves in steps of one
image), so a comparison may also be made on the log loss (``metric="loss"``, lower is
better): each image then counts by how much probability the model gave its true label,
which tells two models apart on far fewer images.
"""

import dataclasses
import warnings

import numpy as np

from small_photo_classifier.features.task import Task

ROUNDS = 1000
CONFIDENCE = 0.90


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Candidate minus baseline on the task's headline metric, with its bootstrap interval."""
    metric: str
    candidate: float
    baseline: float
    low: float
    high: float
    images: int
    lower_is_better: bool = False  # the log loss

    @property
    def difference(self) -> float:
        return self.candidate - self.baseline

    @property
    def better(self) -> bool:
        """The candidate wins only when the whole interval is on its side of zero."""
        return self.high < 0 if self.lower_is_better else self.low > 0

    def summary(self) -> dict:
        return {"metric": self.metric, "candidate": round(self.candidate, 6),
                "baseline": round(self.baseline, 6), "difference": round(self.difference, 6),
                f"ci{int(CONFIDENCE * 100)}": [round(self.low, 6), round(self.high, 6)],
                "images": self.images, "candidate_better_beyond_noise": self.better}

    def describe(self, candidate: str, baseline: str) -> str:
        verdict = ("better beyond noise" if self.better else
                   "not better beyond noise: keeping " + baseline)
        return (f"{candidate} {self.metric} {self.candidate:.4f} vs {baseline} "
                f"{self.baseline:.4f} on {self.images} images (difference {self.difference:+.4f}, "
                f"{int(CONFIDENCE * 100)}% interval {self.low:+.4f} .. {self.high:+.4f}): "
                f"{verdict}")


def compare(task: Task, y, candidate, baseline, seed: int = 0, groups=None,
            clusters=None, metric: str = "headline") -> Comparison:
    """Paired bootstrap of (candidate - baseline) on the task's headline metric (or, with
    ``metric="loss"``, the mean log loss): both models' probabilities on the same images
    ``y``, resampled together.

    ``groups`` (e.g. each row's cross-validation fold) makes the metric the mean of the
    per-group metrics, resampled within each group: out-of-fold predictions of different
    fold models are not on one scale, so their pooled AUC would compare the folds'
    calibration instead of the models.

    ``clusters`` (each row's group of photos, `pipeline.groups`) resamples whole groups
    instead of photos (the cluster bootstrap): four copies of one photo are one piece of
    evidence, not four, and the interval widens accordingly.
    """
    y, candidate, baseline = np.asarray(y), np.asarray(candidate), np.asarray(baseline)
    groups = np.zeros(len(y), int) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    # One row of counts per bootstrap round: how often each image is drawn (within its group).
    rounds = ROUNDS
    counts = np.zeros((rounds, len(y)))
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        if clusters is None:
            counts[:, rows] = rng.multinomial(len(rows), np.full(len(rows), 1 / len(rows)),
                                              rounds)
            continue
        names, index = np.unique(np.asarray(clusters)[rows], return_inverse=True)
        drawn = rng.multinomial(len(names), np.full(len(names), 1 / len(names)), rounds)
        counts[:, rows] = drawn[:, index]  # a drawn group brings every one of its photos
    loss = metric == "loss"
    observed = [_score(task, y, p, np.ones((1, len(y))), groups, loss)[0]
                for p in (candidate, baseline)]
    diffs = (_score(task, y, candidate, counts, groups, loss)
             - _score(task, y, baseline, counts, groups, loss))
    diffs = diffs[np.isfinite(diffs)]
    tail = (1 - CONFIDENCE) / 2
    low, high = (np.quantile(diffs, [tail, 1 - tail]) if len(diffs) else (np.nan, np.nan))
    return Comparison("loss" if loss else task.headline, float(observed[0]),
                      float(observed[1]), float(low), float(high), len(y), loss)


def _score(task: Task, y, probs, counts, groups, loss: bool = False) -> np.ndarray:
    """The headline metric (or the mean log loss) per bootstrap round (rows of
    ``counts``: each image's weight), averaged over groups."""
    per_group = []
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        if loss:
            per_image = _log_loss(task, y[rows], probs[rows])
            weights = counts[:, rows]
            per_group.append(weights @ per_image / weights.sum(axis=1))
            continue
        per_group.append(_weighted(task, y[rows], probs[rows], counts[:, rows]))
    if len(per_group) == 1:
        return per_group[0]
    with warnings.catch_warnings():  # a round where no group has a score stays NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(per_group), axis=0)


def _log_loss(task: Task, y, probs) -> np.ndarray:
    """Each image's log loss (as `Task.scores`' mean; multi-label: the mean over labels)."""
    y, p = np.asarray(y), np.asarray(probs, np.float64)
    eps = 1e-7
    if task.kind == "multiclass":
        return -np.log(np.clip(p[np.arange(len(y)), y.astype(int)], eps, 1.0))
    q = np.clip(p, eps, 1 - eps)
    per = -(y * np.log(q) + (1 - y) * np.log(1 - q))
    return per.mean(axis=1) if per.ndim == 2 else per


def _weighted(task: Task, y, probs, counts) -> np.ndarray:
    """The headline metric of images weighted by ``counts`` [rounds, n], for all rounds."""
    if task.kind == "binary":
        return _weighted_auc(y.astype(int), probs, counts)
    if task.kind == "multiclass":
        correct = (probs.argmax(axis=1) == y).astype(float)
        return counts @ correct / counts.sum(axis=1)
    out = []  # multi-label mean average precision: no closed form, one round at a time
    for weights in counts:
        rows = np.repeat(np.arange(len(y)), weights.astype(int))
        out.append(task.headline_score(y[rows], probs[rows]) if len(rows) else np.nan)
    return np.asarray(out)


def _weighted_auc(y, scores, counts) -> np.ndarray:
    """ROC AUC with per-image weights, for every row of ``counts`` at once: the weighted
    share of (positive, negative) pairs ordered correctly, ties counting one half."""
    order = np.argsort(scores, kind="stable")
    scores, y, counts = scores[order], y[order], counts[:, order]
    # Images with equal scores form one block: a tie between a positive and a negative.
    _, block = np.unique(scores, return_inverse=True)
    neg = counts * (y == 0)
    pos = counts * (y == 1)
    blocks = block.max() + 1
    neg_per_block = np.zeros((len(counts), blocks))
    np.add.at(neg_per_block.T, block, neg.T)
    below = np.cumsum(neg_per_block, axis=1) - neg_per_block  # negatives strictly below
    correct = pos * (below[:, block] + 0.5 * neg_per_block[:, block])
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, correct.sum(axis=1) / pairs, np.nan)
