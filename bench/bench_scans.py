"""The label audit's scans at a data set's size: suspect labels (confident learning on
out-of-fold predictions) and duplicates (file digests for exact copies, cosine
similarities of pooled features for near ones).

    L=$(python ../shared/tools/efficientnet_lite_pretrained.py)
    python bench/bench_scans.py --data_dir=../shared/data/hymenoptera/train --backbone="$L"
    python bench/bench_scans.py --data_dir=/tmp/kaggle_like --backbone="$L"

The features come from the cache train.py fills (computed on a miss, not timed); the
out-of-fold predictions are the linear probe's on 5 folds (not timed either: they are
the heads stage's). Timed, best of three: `features.data.audit.suspects`, the SHA-1 of
every file (`workflow.train.labelling.file_digest`, the data's own folder, test photos
included when there is a ``test/``) and `features.data.selection.duplicate_pairs` on
the average-pooled feature maps of every labelled photo.
"""

import os
import sys
import time

import numpy as np

import common

sys.path.insert(0, common.ROOT)


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main():
    parser = common.photo_parser(__doc__)
    args = parser.parse_args()
    from small_photo_classifier.features.choose import cv as cv_lib, probe
    from small_photo_classifier.features.data import audit, selection
    from small_photo_classifier.pipeline import discovery
    from small_photo_classifier.workflow.train import labelling
    ds, frame, task, clf, feats = common.cached_photos(
        args.data_dir, args.weights, args.image_size, args.cache_dir, args.backbone)
    y = np.asarray(frame.label.tolist())
    pooled = probe.pooled(feats[clf.net.feature_layer], "average")
    folds = cv_lib.make_folds(y, 5, 0, task)
    oof = np.zeros((len(y), *((task.units,) if task.units > 1 else ())))
    for tr, va in folds:
        oof[va] = probe.probabilities(probe.fit(pooled[tr], y[tr], task,
                                                probe.ProbeConfig("average", False, 0.1)),
                                      pooled[va], task)
    fold_of = cv_lib.fold_of(folds, len(y))
    files = frame.path.tolist()
    if ds.test_dir:
        files += discovery.discover_unlabelled(ds.data_dir).path.tolist()
    groups = np.where(np.arange(len(y)) % 5 == 0, "val", "train")
    seconds = {
        "suspect labels": best_of(lambda: audit.suspects(task, y, oof, fold_of)),
        f"file digests ({len(files)} files, "
        f"{sum(os.path.getsize(f) for f in files) / 1e6:.0f} MB)":
            best_of(lambda: [labelling.file_digest(f) for f in files]),
        f"near-duplicate pairs ({len(y)} photos)":
            best_of(lambda: selection.duplicate_pairs(pooled, 0.95, groups)),
    }
    print(f"{args.data_dir}: {len(y)} labelled photos, {clf.net.feature_layer} "
          f"{pooled.shape[1]} pooled features")
    for what, s in seconds.items():
        print(f"  {what:45s} {s:7.3f} s")
    print(f"  {'all scans':45s} {sum(seconds.values()):7.3f} s")


if __name__ == "__main__":
    main()
