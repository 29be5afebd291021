"""Which unlabelled photos to label next: uncertain ones, but not N copies of one.

Strategies (chosen by the simulation in ``bench/bench_label_efficiency.py``):

* ``uncertainty`` — the photos the current model is least sure about: for two
  classes ``1 - |2p - 1|``; for several, one minus the margin between the two most
  probable classes;
* ``diversity`` — k-center greedy on pooled features: each pick is the photo
  farthest (cosine distance) from everything labelled or picked so far;
* ``combined`` — uncertainty, discounted near what is already labelled or
  picked: each pick maximises ``uncertainty * min(1, distance / NEAR)``, where
  ``distance`` is the cosine distance to the nearest labelled or picked photo.
  Beyond ``NEAR`` the most uncertain photo wins, as with ``uncertainty``; a second
  copy of a confusing photo (distance ~0) waits while distinct uncertain ones
  remain. (Plain ``uncertainty * distance`` spent labels on outliers: on the 12
  flower species it needed more labels than uncertainty alone.)
* ``random`` — the baseline any strategy has to beat.
"""

from typing import List, Sequence, Tuple

import numpy as np

STRATEGIES = ("combined", "uncertainty", "diversity", "random")
# Cosine distance (of average-pooled block5_pool features) under which a photo counts
# as "like" one already labelled or picked. Copies, mirrors and re-saves of a photo lie
# within 0.05, two different ants/bees photos at least 0.15 apart, while close-ups of one
# flower species come within 0.06 (bench/bench_label_efficiency.py section 3). At 0.25
# the discount also held back distinct but similar flowers, and combined needed 144
# labels where uncertainty alone needed 120 to match random's 168; 0.10 discounts only
# what is nearly the same photo.
NEAR = 0.10


def uncertainty(probs) -> np.ndarray:
    """How unsure the model is about each photo, in [0, 1] (1 = a coin toss)."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim == 1:
        return 1 - np.abs(2 * probs - 1)
    if probs.shape[1] == 1:
        return 1 - np.abs(2 * probs[:, 0] - 1)
    top = np.sort(probs, axis=1)[:, ::-1]
    return 1 - (top[:, 0] - top[:, 1])


def normalised(x) -> np.ndarray:
    """Rows scaled to unit length (for cosine distances)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def select(strategy: str, features, probs, budget: int, labelled_features=None,
           seed: int = 0) -> List[Tuple[int, float, str]]:
    """``budget`` rows of the pool to label, best first: (row, score, reason).

    ``features``: pooled features of the pool [N, D]; ``probs``: the current model's
    probabilities on it; ``labelled_features``: pooled features of the labelled photos
    (diversity keeps away from them too).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    n = len(features)
    budget = min(budget, n)
    unsure = uncertainty(probs)
    if strategy == "random":
        rows = np.random.default_rng(seed).permutation(n)[:budget]
        return [(int(r), float(unsure[r]), "random") for r in rows]
    if strategy == "uncertainty":
        rows = np.argsort(-unsure, kind="stable")[:budget]
        return [(int(r), float(unsure[r]), f"uncertain ({unsure[r]:.2f})") for r in rows]
    pool = normalised(features)
    # Distance of every pool photo to its nearest labelled (or already picked) photo.
    nearest = np.full(n, 2.0)
    if labelled_features is not None and len(labelled_features):
        known = normalised(labelled_features)
        for start in range(0, len(known), 1024):
            nearest = np.minimum(nearest, 1 - (pool @ known[start:start + 1024].T).max(axis=1))
    picked, out = np.zeros(n, bool), []
    for _ in range(budget):
        distance = np.clip(nearest, 0, 2)
        value = (distance if strategy == "diversity"
                 else unsure * np.minimum(1.0, distance / NEAR))
        value = np.where(picked, -np.inf, value)
        row = int(np.argmax(value))
        reason = (f"far from the labelled photos (distance {distance[row]:.2f})"
                  if strategy == "diversity" else combined_reason(unsure[row], distance[row]))
        out.append((row, float(value[row]), reason))
        picked[row] = True
        nearest = np.minimum(nearest, 1 - pool @ pool[row])
    return out


def combined_reason(unsure: float, distance: float) -> str:
    """Why ``combined`` picked a photo, in words that match its numbers: a photo the model
    is sure of, or one nearly the same as a labelled or chosen photo (its score
    discounted), is said to be so."""
    doubt = (f"uncertain ({unsure:.2f}, 1 = a coin toss)" if unsure >= 0.5 else
             f"the model is fairly sure of it (uncertainty {unsure:.2f})")
    place = (f"unlike the labelled and chosen photos (cosine distance {distance:.3f})"
             if distance >= NEAR else
             f"nearly the same as a labelled or chosen photo (cosine distance "
             f"{distance:.3f} < {NEAR:.2f}: score discounted)")
    return f"{doubt} and {place}" if unsure >= 0.5 and distance >= NEAR else f"{doubt}; {place}"


def duplicate_pairs(features, threshold: float,
                    groups: Sequence[str] = None) -> List[Tuple[int, int, float]]:
    """Pairs of rows whose pooled features have cosine similarity >= ``threshold``; with
    ``groups`` (e.g. train / validation / test) only pairs from different groups."""
    x = normalised(features)
    groups = None if groups is None else np.asarray(groups)
    pairs = []
    for start in range(0, len(x), 512):
        sims = x[start:start + 512] @ x.T
        for i, j in zip(*np.nonzero(sims >= threshold)):
            a, b = start + i, j
            if a < b and (groups is None or groups[a] != groups[b]):
                pairs.append((int(a), int(b), float(sims[i, j])))
    return pairs
