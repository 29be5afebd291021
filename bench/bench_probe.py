"""The linear probe's choice on real cached features: today's code against an earlier
revision's, and every variant's cross-validated and held-out score.

    W=$(python ../shared/tools/vgg16_pretrained.py)
    L=$(python ../shared/tools/efficientnet_lite_pretrained.py)
    python bench/bench_probe.py --data_dir=../shared/data/flowers12/train --backbone="$L"
    python bench/bench_probe.py --data_dir=../shared/data/hymenoptera/train --weights="$W"

The photos are split as train.py splits them (``--val_size=auto``: a fifth held out when
there are under 1,000, seed 0); the features come from the cache train.py fills. Both
arms choose on the same training rows and the same inner 5-fold split, one after the
other in this process: ``before`` is `features.choose.probe` of ``--before`` (scikit-learn's
lbfgs, 42 variants x 5 folds, each fit from scratch), ``after`` this checkout's. Printed:
each arm's seconds, its choice and the choice's CV score; then, per variant (pooling x
standardisation, at its best C by CV), the CV score and the score on the held-out fifth
of a fit on all the training rows, and which variant wins each.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import common

sys.path.insert(0, common.ROOT)


def module_at(revision: str, path: str, name: str):
    """The module at ``path`` as it was at ``revision`` (imports resolve to this checkout)."""
    text = subprocess.run(["git", "-C", common.ROOT, "show", f"{revision}:{path}"],
                          capture_output=True, text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(name, f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def variants_table(probe, feats, y, y_val, val_feats, task, folds):
    """(pooling, scaled) -> (best C, its CV score, held-out score of that C fitted on
    every training row)."""
    out = {}
    for how in probe.POOLINGS:
        x, x_val = probe.pooled(feats, how), probe.pooled(val_feats, how)
        for scaled in probe.SCALINGS:
            paths = probe._fold_paths(x, y, task, folds, scaled, None)
            cv = [np.mean([task.headline_score(y[va], p[j]) for (_, va), p in
                           zip(folds, paths)]) for j in range(len(probe.C_GRID))]
            j = int(np.argmax(cv))
            config = probe.ProbeConfig(how, scaled, probe.C_GRID[j])
            held = task.headline_score(y_val, probe.probabilities(
                probe.fit(x, y, task, config), x_val, task))
            out[(how, scaled)] = (probe.C_GRID[j], cv[j], held)
    return out


def main():
    parser = common.photo_parser(__doc__)
    parser.add_argument("--before", default="aa650e6")
    parser.add_argument("--nobefore", dest="run_before", action="store_false")
    args = parser.parse_args()
    from small_photo_classifier.features.choose import cv as cv_lib, probe
    from small_photo_classifier.pipeline import split
    ds, frame, task, clf, feats = common.cached_photos(
        args.data_dir, args.weights, args.image_size, args.cache_dir, args.backbone)
    layer = clf.net.feature_layer
    train, val = split.split_train_val(frame.reset_index(drop=True), 0.2, 0)
    rows = {name: i for i, name in enumerate(frame.name)}
    tr = np.array([rows[n] for n in train.name])
    va = np.array([rows[n] for n in val.name])
    y_all = np.asarray(frame.label.tolist())
    x_all = np.asarray(feats[layer])
    y, y_val = y_all[tr], y_all[va]
    from small_photo_classifier.features import task as task_lib
    _, smallest = task_lib.smallest_class(task, y)
    folds = cv_lib.make_folds(y, max(2, min(5, smallest)), 0, task)
    print(f"{args.data_dir} ({args.backbone if args.backbone != 'vgg16' else 'VGG16'}): "
          f"{len(tr)} training rows, {len(va)} held out, {layer} {x_all.shape[1:]}, "
          f"{len(folds)} folds, {task.headline}", flush=True)
    arms = [("after (this checkout)", probe)]
    if args.run_before:
        arms.insert(0, (f"before ({args.before})", module_at(
            args.before, "features/choose/probe.py", "probe_before")))
    seconds = {}
    for label, module in arms:
        started = time.perf_counter()
        choice = module.choose(x_all[tr], y, task, folds)
        seconds[label] = time.perf_counter() - started
        print(f"  {label}: {seconds[label]:.1f} s, {choice.tried} variants; chose "
              f"{choice.config.describe()}, CV {task.headline} {choice.mean:.4f}", flush=True)
    if len(seconds) == 2:
        before, after = seconds.values()
        print(f"  after / before time: {after / before:.3f} ({before / after:.1f}x faster)")
    table = variants_table(probe, x_all[tr], y, y_val, x_all[va], task, folds)
    print(f"  {'variant':28s} {'best C':>7s} {'CV':>7s} {'held-out':>9s}")
    for (how, scaled), (c, cv, held) in table.items():
        print(f"  {how + (' standardised' if scaled else ' raw'):28s} {c:7g} {cv:7.4f} "
              f"{held:9.4f}")
    best_cv = max(table, key=lambda k: table[k][1])
    best_held = max(table.values(), key=lambda v: v[2])[2]
    print(f"  wins CV: {best_cv}; best held-out: "
          f"{[k for k, v in table.items() if v[2] == best_held]}")


if __name__ == "__main__":
    main()
