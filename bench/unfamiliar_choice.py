"""How the unfamiliar score's combination was chosen (issue 30): each signal alone and
weighted sums, on pooled frozen features of the shared photos.

  python bench/unfamiliar_choice.py --backbone=vgg16 --weights=W.h5
  python bench/unfamiliar_choice.py --backbone=PATH.keras

Known classes: 6 of the 12 flower species (three different choices of 6), 40 training
photos each (3 random draws), the other 20 held out; unseen: the other 6 species; far:
the ants/bees photos. A logistic regression on the training photos' features stands in
for the head; its temperature is fitted on its 5-fold out-of-fold predictions, and both
signals are standardised on out-of-fold values (distances to the other folds'
photos), as `workflow.train.trusting` does. Prints the AUROC of telling unseen (and far)
photos from the held-out known ones, and the share of held-out known photos above the
threshold that flags 5 % of the out-of-fold ones, for each (k, distance weight).
"""

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from small_photo_classifier.workflow.base import console  # noqa: E402

console.quiet_tensorflow()

import numpy as np  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                    "shared", "data")


def features(backbone_name: str, weights: str):
    """GAP features of every shared photo and its group (species, hym_ants, hym_bees)."""
    from small_photo_classifier.features import backbone
    from small_photo_classifier.pipeline import input as input_lib
    paths, groups = [], []
    for d in sorted(glob.glob(os.path.join(DATA, "flowers12", "train", "*"))):
        for p in sorted(glob.glob(d + "/*")):
            paths.append(p)
            groups.append(os.path.basename(d))
    for d in ("ants", "bees"):
        for p in sorted(glob.glob(os.path.join(DATA, "hymenoptera", "train", d, "*"))):
            if not p.endswith(".gif"):
                paths.append(p)
                groups.append("hym_" + d)
    from small_photo_classifier.features.store import extract
    clf = backbone.build_classifier(weights=weights, include_top=False, backbone=backbone_name)
    run = extract.extractor(clf, [clf.net.feature_layer])  # compiled: never an eager trunk
    out = [np.asarray(run(b["image"])[clf.net.feature_layer]).mean(axis=(1, 2))
           for b in input_lib.eval_dataset(paths, None, paths, 224, 16)]
    return np.concatenate(out).astype(np.float64), np.array(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--weights", default="imagenet")
    args = parser.parse_args()
    x, groups = features(args.backbone, args.weights)
    species = sorted(g for g in set(groups) if not g.startswith("hym"))
    results = {}
    for split, known in (("first 6", species[:6]), ("last 6", species[6:]),
                         ("every other", species[::2])):
        for seed in range(3):
            for key, row in _draw(x, groups, species, known, seed).items():
                results.setdefault(key, {}).setdefault(split, []).append(row)
    print(f"{args.backbone}: AUROC unseen species / ants-bees / share of held-out known "
          "flagged (mean of 3 draws)")
    print("| k | distance weight | " + " | ".join(results[(1, 0.0)]) + " |")
    print("|---|---|" + "---|" * len(results[(1, 0.0)]))
    for (k, w), by_split in results.items():
        label = "distance alone" if w is None else ("uncertainty alone" if w == 0 else f"{w:g}")
        cells = [" / ".join(f"{v:.3f}" for v in np.mean(rows, axis=0))
                 for rows in by_split.values()]
        print(f"| {k} | {label} | " + " | ".join(cells) + " |")


def _draw(x, groups, species, known, seed) -> dict:
    """One draw of 40 training photos per known species: (k, distance weight) -> (AUROC
    unseen, AUROC ants/bees, share of held-out known photos flagged)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.preprocessing import StandardScaler
    from small_photo_classifier.features import trust
    rng = np.random.default_rng(seed)
    tr, ho = [], []
    for c in known:
        idx = rng.permutation(np.where(groups == c)[0])
        tr += list(idx[:40])
        ho += list(idx[40:])
    tr, ho = np.array(tr), np.array(ho)
    y = np.array([known.index(g) for g in groups[tr]])
    scale = StandardScaler().fit(x[tr])
    lr = LogisticRegression(C=0.1, max_iter=3000)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    oof = cross_val_predict(lr, scale.transform(x[tr]), y, cv=folds, method="predict_proba")
    cal = trust.fit("multiclass", y, oof, "oof")
    lr.fit(scale.transform(x[tr]), y)
    fit = {"x": x, "ref": trust.deduplicate(x[tr]), "cal": cal, "lr": lr, "scale": scale,
           "u_oof": trust.uncertainty("multiclass", cal.apply("multiclass", oof))}
    others = (np.where(np.isin(groups, species) & ~np.isin(groups, known))[0],
              np.where(np.char.startswith(groups.astype(str), "hym"))[0])
    out = {}
    for k in (1, 3, 5):
        d_oof = trust.fold_distances(x[tr], [va for _, va in folds.split(tr, y)], k)
        for w in (0.0, 1.0, 1.5, 2.0, 3.0, None):  # None: distance alone
            out[(k, w)] = _rule(fit, (k, w), d_oof, ho, others)
    return out


def _rule(fit, rule, d_oof, ho, others) -> tuple:
    """(AUROC held-out known vs each of ``others``, share of held-out known flagged) of
    one (k, distance weight)."""
    from sklearn.metrics import roc_auc_score
    from small_photo_classifier.features import trust
    (k, w), u_oof = rule, fit["u_oof"]
    fitted = trust.fit_unfamiliar(d_oof, u_oof, 0.05, "oof", k)
    fitted = type(fitted)(**{**fitted.__dict__, "distance_weight": w or 1.0})

    def score(rows):
        d = trust.distance(fit["ref"], fit["x"][rows], k)
        p = fit["cal"].apply("multiclass", fit["lr"].predict_proba(
            fit["scale"].transform(fit["x"][rows])))
        u = trust.uncertainty("multiclass", p)
        if w is None:
            return np.log(np.maximum(d, trust.MIN_DISTANCE))
        return fitted.score(d, u) if w else np.log(u + trust.UNCERTAINTY_FLOOR)
    s_ho = score(ho)
    aurocs = [roc_auc_score(np.r_[np.zeros(len(ho)), np.ones(len(o))], np.r_[s_ho, score(o)])
              for o in others]
    held = (fitted.score(d_oof, u_oof) if w else np.log(u_oof + 1e-3)) \
        if w is not None else np.log(np.maximum(d_oof, trust.MIN_DISTANCE))
    return (*aurocs, float(np.mean(s_ho > np.quantile(held, 0.95))))


if __name__ == "__main__":
    main()
