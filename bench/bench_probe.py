"""The linear probe's choice (42 variants x K folds) at a given size: the row-space basis
from the Gram matrix (now) against the thin SVD (before), one after the other, same
features, same folds.

    python bench/bench_probe.py                       # Kaggle-sized: 2,095 training rows
    python bench/bench_probe.py --rows=1000 --signal=0.03

Features are synthetic block5_pool maps (7 x 7 x 512 at 224 px, ReLU-like, a weak class
signal in a tenth of the channels): the probe's cost depends on their shape, not on what
the photos show. Printed per arm: seconds, the chosen variant and its CV score; then
the time ratio and whether both arms chose the same variant with the same score.
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere without installing


class SvdRowSpace:
    """The basis as it was before: V from the thin SVD of the training rows."""

    def fit(self, x, y=None):
        _, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
        self.basis_ = vt.T
        return self


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2095, help="training rows (Kaggle: 2,095)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--signal", type=float, default=0.03, help="class signal strength")
    parser.add_argument("--arms", default="gram,svd", help="which arms, in order")
    args = parser.parse_args()
    from features.choose import cv, probe
    from features import task as task_lib
    rng = np.random.default_rng(0)
    y = (rng.random(args.rows) < 0.6).astype(int)  # Kaggle's share of positives
    channels = (rng.random(512) < 0.1).astype(np.float32)
    x = np.maximum(0, rng.normal(0, 1, (args.rows, 7, 7, 512)).astype(np.float32)
                   + args.signal * y[:, None, None, None] * channels)
    folds = cv.make_folds(y, args.folds, 0)
    gram_fit = probe.RowSpace.fit
    results = {}
    for arm in args.arms.split(","):
        probe.RowSpace.fit = gram_fit if arm == "gram" else SvdRowSpace.fit
        started = time.perf_counter()
        choice = probe.choose(x, y, task_lib.binary(), folds, progress=True)
        seconds = time.perf_counter() - started
        results[arm] = (seconds, choice.config, choice.mean)
        print(f"{arm}: {seconds:.1f} s for {choice.tried} variants x {len(folds)} folds; "
              f"chose {choice.config.describe()}, CV AUC {choice.mean:.6f}", flush=True)
    probe.RowSpace.fit = gram_fit
    if len(results) == 2:
        (t_new, c_new, m_new), (t_old, c_old, m_old) = results["gram"], results["svd"]
        print(f"speed-up (svd / gram): {t_old / t_new:.2f}x; same choice: {c_new == c_old}; "
              f"CV AUC difference {abs(m_new - m_old):.2e}")


if __name__ == "__main__":
    main()
