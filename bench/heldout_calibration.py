"""Calibration of a two-class prediction CSV against its held-out class folders (issue
48's benchmark): ECE (10 equal-width bins of the top class's probability) with a 95 %
bootstrap interval over photos, log loss, ROC AUC, accuracy at 0.5, mean probability.

    python bench/heldout_calibration.py /tmp/b49/fl_v46_cur.csv /tmp/fl_imb/heldout rare
"""

import os
import sys

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score


def ece(y, p, bins: int = 10) -> float:
    """Expected calibration error of the top class (binary: max(p, 1 - p))."""
    confidence, hit = np.maximum(p, 1 - p), (p >= 0.5) == (y == 1)
    index = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    return float(sum(abs(hit[index == b].mean() - confidence[index == b].mean())
                     * (index == b).mean() for b in range(bins) if (index == b).any()))


def main():
    csv, heldout, positive = sys.argv[1:4]
    truth = {}
    for label in os.listdir(heldout):
        for name in os.listdir(os.path.join(heldout, label)):
            truth[os.path.splitext(name)[0]] = truth[name] = int(label == positive)
    frame = pd.read_csv(csv, dtype={"name": str})
    column = positive if positive in frame.columns else frame.columns[1]
    frame = frame[frame[column].notna()]
    y = np.array([truth[n] for n in frame.name])
    p = frame[column].to_numpy(float)
    rng = np.random.default_rng(0)
    boots = [ece(y[i], p[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(2000))]
    print(f"{os.path.basename(csv)}: n={len(y)} positives={int(y.sum())} ECE={ece(y, p):.4f} "
          f"(95% {np.percentile(boots, 2.5):.4f}..{np.percentile(boots, 97.5):.4f}) "
          f"log loss={log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)):.4f} "
          f"AUC={roc_auc_score(y, p):.4f} accuracy={((p >= 0.5) == y).mean():.4f} "
          f"mean P={p.mean():.4f}")


if __name__ == "__main__":
    main()
