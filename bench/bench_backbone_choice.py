"""Which rule chooses the backbone (and input size) that predicts held-out photos best?

    W=$(python ../shared/tools/vgg16_pretrained.py)
    L0=$(python ../shared/tools/efficientnet_lite_pretrained.py)
    L2=$(python ../shared/tools/efficientnet_lite_pretrained.py --variant lite2)
    python bench/bench_backbone_choice.py --data_dir=../shared/data/hymenoptera/train \\
        --weights="$W" --candidates=vgg16,"$L0","$L2","$L2@260"

A fifth of the photos (stratified, seed 0) is held out: no fit and no choice sees it.
On the other four fifths, each candidate (a backbone at an input size, ``NAME@SIZE``)
is scored as ``--stage=backbones`` scores it: the linear probe chosen by 5-fold CV (the
same folds for every candidate), its out-of-fold predictions, and the milliseconds per
image of its frozen layers on this machine. Then each rule picks a candidate from those
alone, and the pick's held-out score (the probe refit on the four fifths) says how good
the rule is:

* ``cheapest unless beaten (AUC/accuracy)``: today's rule; a costlier candidate replaces
  the current one only when its out-of-fold headline score is better beyond a paired
  bootstrap's noise (90%);
* ``cheapest unless beaten (log loss)``: the same on the out-of-fold log loss, a
  proper score that sees confidence, not only ranks (more sensitive on a few hundred
  photos);
* ``best CV within Kx the cheapest's cost``: the best mean CV score among candidates at
  most K times the cheapest's milliseconds per image, one beyond that bound only when it
  beats that choice beyond noise (``--backbone=auto``'s rule, `workflow.train.backbones`);
* ``best CV``: the best mean CV score, whatever the cost.
"""

import os
import sys
import time

import numpy as np

import common

sys.path.insert(0, common.ROOT)


def log_loss_rows(task, y, probs) -> np.ndarray:
    """Each row's log loss (negative log probability of its label)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    if task.kind == "binary":
        return -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return -np.log(p[np.arange(len(y)), np.asarray(y, int)])


def logloss_better(task, y, candidate, baseline, seed=0, rounds=1000) -> tuple:
    """(difference of mean log loss candidate - baseline, 90% interval high): better
    beyond noise when the whole interval is below zero (paired bootstrap over rows)."""
    d = log_loss_rows(task, y, candidate) - log_loss_rows(task, y, baseline)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(rounds)])
    return float(d.mean()), float(np.quantile(means, 0.95))


def ms_per_image(clf, frame, size: int) -> float:
    from small_photo_classifier.features.store import extract
    from small_photo_classifier.pipeline import input as input_lib
    paths = frame.path.tolist()[:16]
    batch = next(iter(input_lib.eval_dataset(paths, None, paths, size, 16)))["image"]
    run = extract.extractor(clf, [clf.net.feature_layer])
    run(batch)
    started = time.perf_counter()
    run(batch)
    return 1000 * (time.perf_counter() - started) / len(paths)


def candidate(args, label: str, names, folds):
    """(CV mean, OOF probabilities, held-out score, ms per image) of one candidate;
    ``names``: (the photos to fit and choose on, the held-out photos)."""
    from small_photo_classifier.features import networks
    from small_photo_classifier.features.choose import probe
    name, size = networks.split_size(label)
    size = size or networks.check_choice(name).trained_size()[0]
    ds, frame, task, clf, feats = common.cached_photos(args.data_dir, args.weights, size,
                                                       args.cache_dir, name)
    index = {n: i for i, n in enumerate(frame.name)}
    tr, held = (np.array([index[n] for n in part]) for part in names)
    x = np.asarray(feats[clf.net.feature_layer])
    y = np.asarray(frame.label.tolist())
    choice = probe.choose(x[tr], y[tr], task, folds)
    fitted = probe.fit(probe.pooled(x[tr], choice.config.pooling), y[tr], task, choice.config)
    score = task.headline_score(y[held], probe.probabilities(
        fitted, probe.pooled(x[held], choice.config.pooling), task))
    return {"label": f"{os.path.basename(name)}@{size}", "cv": choice.mean,
            "oof": choice.oof_probs, "held": score, "ms": ms_per_image(clf, frame, size),
            "probe": choice.config.describe()}, task, y[tr]


def rules(results, task, y, folds, bound: float = 4.0) -> dict:
    """Each rule's pick (an index into ``results``)."""
    from small_photo_classifier.features.choose import cv as cv_lib, evidence
    groups = cv_lib.fold_of(folds, len(y))
    order = sorted(range(len(results)), key=lambda i: results[i]["ms"])

    def unless_beaten(start, better):
        current = start
        for i in order:
            if results[i]["ms"] > results[current]["ms"] and better(i, current):
                current = i
        return current

    def auc_better(i, j):
        return evidence.compare(task, y, results[i]["oof"], results[j]["oof"], 0,
                                groups=groups).better

    def loss_better(i, j):
        return logloss_better(task, y, results[i]["oof"], results[j]["oof"])[1] < 0
    def beyond_bound(start, within, better):
        current = start
        for i in order:
            if i not in within and better(i, current):
                current = i
        return current
    cheapest = order[0]
    within = [i for i in order if results[i]["ms"] <= bound * results[cheapest]["ms"]]
    best_within = max(within, key=lambda i: results[i]["cv"])
    return {"cheapest unless beaten (headline)": unless_beaten(cheapest, auc_better),
            "cheapest unless beaten (log loss)": unless_beaten(cheapest, loss_better),
            f"best CV within {bound:g}x the cheapest's cost (the tool's)":
                beyond_bound(best_within, within, auc_better),
            f"best CV within {bound:g}x, costlier beaten on log loss":
                beyond_bound(best_within, within, loss_better),
            "best CV": max(range(len(results)), key=lambda i: results[i]["cv"])}


def main():
    parser = common.photo_parser(__doc__)
    parser.add_argument("--candidates", required=True,
                        help="comma-separated NAME or NAME@SIZE (files: PATH@SIZE)")
    parser.add_argument("--bound", type=float, default=4.0)
    args = parser.parse_args()
    from small_photo_classifier.features.choose import cv as cv_lib
    from small_photo_classifier.pipeline import discovery, split
    frame = discovery.discover(args.data_dir).frame
    frame = frame[~frame.path.str.lower().str.endswith(".gif")].reset_index(drop=True)
    train, held = split.split_train_val(frame, 0.2, 0)
    names = (train.name.tolist(), held.name.tolist())
    folds = cv_lib.make_folds(np.asarray(train.label.tolist()), 5, 0)
    results = []
    for label in args.candidates.split(","):
        r, task, y = candidate(args, label, names, folds)
        results.append(r)
        print(f"  {r['label']:38s} CV {task.headline} {r['cv']:.4f}  held-out {r['held']:.4f}  "
              f"{r['ms']:6.1f} ms/image  ({r['probe']})", flush=True)
    rows = names
    print(f"{args.data_dir}: {len(rows[0])} photos for fitting and choosing, {len(rows[1])} "
          "held out")
    for rule, i in rules(results, task, y, folds, args.bound).items():
        print(f"  rule {rule:55s} -> {results[i]['label']:38s} held-out {results[i]['held']:.4f}")


if __name__ == "__main__":
    main()
