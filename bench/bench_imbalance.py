"""Class imbalance: does --class_weight help when one class is rare?

    W=$(python ../shared/tools/vgg16_pretrained.py)
    python bench/bench_imbalance.py --data_dir=../shared/data/hymenoptera/train --weights="$W"

The two-class photos are subsampled so the positive class is 1 in 6 (1:5) and 1 in 11
(1:10) of the images; per ratio and seed, a stratified 80/20 split; scenario B's head
(5 epochs, cached features) and the linear probe are trained with and without
balanced class weights and scored on the held-out 20%: ROC AUC, balanced accuracy and
the minority class's recall at the 0.5 threshold. Printed as mean +- std over seeds.
"""

import os
import sys

import numpy as np

import common

sys.path.insert(0, common.ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = common.photo_parser(__doc__)
    parser.add_argument("--ratios", default="5,10")
    args = parser.parse_args()
    from small_photo_classifier.features.fit import heads
    from small_photo_classifier.features.choose import probe
    from small_photo_classifier.features import task as task_lib
    from small_photo_classifier.features.fit.settings import FitSettings
    from small_photo_classifier.features.fit.loop import restore, snapshot
    from small_photo_classifier.pipeline import split
    ds, frame, task, clf, feats = common.cached_photos(args.data_dir, args.weights,
                                                       args.image_size, args.cache_dir)
    start = snapshot(clf.model)
    print(f"# class imbalance: {args.data_dir}, positive class {ds.class_names[1]!r} made rare")
    print("\n| positives : negatives | model | weights | held-out AUC | balanced accuracy | "
          "minority recall |\n|---|---|---|---|---|---|")
    for ratio in [int(r) for r in args.ratios.split(",")]:
        rows = {}
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            neg = np.flatnonzero(frame.label == 0)
            pos = rng.permutation(np.flatnonzero(frame.label == 1))[:max(4, len(neg) // ratio)]
            keep = np.sort(np.concatenate([neg, pos]))
            part = frame.iloc[keep].reset_index(drop=True)
            tr, va = split.split_train_val(part, 0.2, seed)
            at = {n: i for i, n in enumerate(frame.name)}
            itr, iva = [at[n] for n in tr.name], [at[n] for n in va.name]
            ytr, yva = tr.label.to_numpy(), va.label.to_numpy()
            for mode in ("none", "balanced"):
                weights = task_lib.class_weights(task, ytr, mode)
                restore(clf.model, start)
                with heads.HeadConfig.for_scenario("B").trainer(clf, task) as trainer:
                    trainer.fit(feats["block5_pool"][itr], ytr,
                                FitSettings(5, 32, seed, class_weight=weights), keep=None)
                    head = trainer.predict(feats["block5_pool"][iva])
                x = probe.pooled(feats["block5_pool"])
                fitted = probe.fit(x[itr], ytr, task, probe.ProbeConfig("average", False, 0.1),
                                   weights)
                lin = probe.probabilities(fitted, x[iva], task)
                for name, p in (("head B", head), ("probe", lin)):
                    scores = task.scores(yva, p)
                    recall = float(np.mean(p[yva == 1] >= 0.5))
                    rows.setdefault((name, mode), []).append(
                        (scores["auc"], scores["balanced_accuracy"], recall))
        for (name, mode), values in rows.items():
            v = np.asarray(values)
            print(f"| 1:{ratio} | {name} | {mode} | " + " | ".join(
                f"{v[:, i].mean():.4f} ± {v[:, i].std():.4f}" for i in range(3)) + " |",
                flush=True)
    restore(clf.model, start)


if __name__ == "__main__":
    main()
