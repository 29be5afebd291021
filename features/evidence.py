"""Is one model better than another on the same images, by more than noise?

The default output (single model or bag, with or without test-time augmentation,
deep head or probe) is chosen by evidence: a candidate replaces the baseline
only when it scores better on the same held-out images and a paired bootstrap
over those images puts the difference above zero with 90% confidence. With a
few dozen images that takes a clear margin, so in doubt the simpler baseline
stays.
"""

import dataclasses

import numpy as np

from features.task import Task

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

    @property
    def difference(self) -> float:
        return self.candidate - self.baseline

    @property
    def better(self) -> bool:
        """The candidate wins only when the whole interval is above zero."""
        return self.low > 0

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


def compare(task: Task, y, candidate, baseline, seed: int = 0, rounds: int = ROUNDS,
            groups=None) -> Comparison:
    """Paired bootstrap of (candidate - baseline) on the task's headline metric: both
    models' probabilities on the same images ``y``, resampled together.

    ``groups`` (e.g. each row's cross-validation fold) makes the metric the mean of the
    per-group metrics, resampled within each group: out-of-fold predictions of different
    fold models are not on one scale, so their pooled AUC would compare the folds'
    calibration instead of the models.
    """
    y, candidate, baseline = np.asarray(y), np.asarray(candidate), np.asarray(baseline)
    name = task.headline
    members = ([np.arange(len(y))] if groups is None else
               [np.flatnonzero(np.asarray(groups) == g) for g in np.unique(groups)])

    def score(probs, picks):
        values = [task.headline_score(y[rows], probs[rows]) for rows in picks]
        return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan

    observed = (score(candidate, members), score(baseline, members))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(rounds):
        picks = [rows[rng.integers(0, len(rows), len(rows))] for rows in members]
        a, b = score(candidate, picks), score(baseline, picks)
        if np.isfinite(a) and np.isfinite(b):
            diffs.append(a - b)
    tail = (1 - CONFIDENCE) / 2
    low, high = (np.quantile(diffs, [tail, 1 - tail]) if diffs else (np.nan, np.nan))
    return Comparison(name, float(observed[0]), float(observed[1]), float(low), float(high),
                      len(y))
