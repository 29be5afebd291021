"""Label efficiency, simulated on labelled photos: which photos to label next, suspect
labels, and the near-duplicate threshold.

    W=$(python ../shared/tools/vgg16_pretrained.py)
    python bench/bench_label_efficiency.py --data_dir=../shared/data/hymenoptera/train \\
        --weights="$W"

1. Active learning: per seed, a quarter of the photos is held out; from a stratified
   seed of 20 labelled photos, batches of 20 are added by each strategy of
   `features.data.selection` (and at random), the linear probe retrained from the cache
   each round and scored on the held-out photos. Printed: the held-out score per
   number of labels (mean +- std over seeds), and how many labels each strategy
   needs to reach random sampling's final score. The plot goes to --plot.
2. Suspect labels: 5% and 10% of the labels are flipped; the probe's 5-fold
   out-of-fold predictions go through `features.data.audit.suspects`; printed: the share
   of the flipped photos among the top 2x (as many suspects as flips, twice).
3. Near duplicates: cosine similarity of average-pooled block5_pool features between
   a photo and its mirror, a 90% centre crop and a JPEG re-save, against the
   highest similarity between two different photos.
"""

import os
import sys

import numpy as np

import common

sys.path.insert(0, common.ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _setup(args):
    from small_photo_classifier.features.choose import probe
    _, frame, task, clf, feats = common.cached_photos(args.data_dir, args.weights,
                                                      args.image_size, args.cache_dir,
                                                      args.backbone)
    x = probe.pooled(feats[clf.net.feature_layer])
    return task, clf, frame, x, np.asarray(frame.label.tolist())


def simulate(args, task, x, y):
    from small_photo_classifier.features.data import curve, selection
    from small_photo_classifier.features.choose import probe
    config = probe.ProbeConfig("average", False, 0.1)
    strategies = list(selection.STRATEGIES)
    results = {s: [] for s in strategies}
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        test = curve.subset(y, 0.25, seed, task)
        pool_all = np.setdiff1d(np.arange(len(y)), test)
        start = pool_all[curve.subset(y[pool_all], args.seed_size / len(pool_all), seed + 1,
                                      task)]
        for strategy in strategies:
            labelled, scores = list(start), []
            for _ in range(args.rounds + 1):
                fitted = probe.fit(x[labelled], y[labelled], task, config)
                scores.append(task.headline_score(y[test], probe.probabilities(
                    fitted, x[test], task)))
                pool = np.setdiff1d(pool_all, labelled)
                if not len(pool):
                    break
                picks = selection.select(strategy, x[pool], probe.probabilities(
                    fitted, x[pool], task), args.batch, x[labelled],
                    seed=int(rng.integers(1 << 31)))
                labelled += [int(pool[r]) for r, _, _ in picks]
            results[strategy].append(scores)
    sizes = [len(start) + args.batch * r for r in range(args.rounds + 1)]
    _print_simulation(args, task, results, sizes)


def _print_simulation(args, task, results: dict, sizes) -> None:
    """The table, the paired gains over random sampling, the labels each strategy needs,
    and (``--plot``) the curves."""
    strategies = list(results)
    print(f"\n## 1. Active learning: held-out {task.headline} by labels "
          f"({args.seeds} seeds, start {sizes[0]}, batches of {args.batch})\n")
    print("| labels | " + " | ".join(strategies) + " |\n|---|" + "---|" * len(strategies))
    means = {s: np.nanmean(np.array(v, float), axis=0) for s, v in results.items()}
    stds = {s: np.nanstd(np.array(v, float), axis=0) for s, v in results.items()}
    for i, n in enumerate(sizes):
        print(f"| {n} | " + " | ".join(f"{means[s][i]:.4f} ± {stds[s][i]:.4f}"
                                       for s in strategies) + " |")
    # The final point alone is one noisy draw; the mean over every round after the seed,
    # paired with random sampling on the same seed and held-out part, is steadier.
    base = np.array(results["random"], float)[:, 1:].mean(axis=1)
    print("\nmean held-out score over rounds 1.." + str(args.rounds) + ", minus random's "
          "(paired by seed):")
    for s in strategies[:-1]:
        gain = np.array(results[s], float)[:, 1:].mean(axis=1) - base
        print(f"  {s}: {gain.mean():+.4f} ± {gain.std():.4f} (better on {int((gain > 0).sum())}"
              f" of {len(gain)} seeds)")
    print("\nlabels each strategy needs to reach random sampling's score at N labels:")
    for n_random, target_n in zip(sizes[1:], means["random"][1:]):
        needs = {s: next((n for n, m in zip(sizes, means[s]) if m >= target_n - 1e-9), None)
                 for s in strategies[:-1]}
        print(f"  N={n_random} ({target_n:.4f}): " + ", ".join(
            f"{s} {v if v is not None else '>' + str(sizes[-1])}" for s, v in needs.items()))
    target = means["random"][-1]
    print(f"\nlabels to reach random sampling's final {task.headline} ({target:.4f} with "
          f"{sizes[-1]} labels):")
    for s in strategies:
        reached = [n for n, m in zip(sizes, means[s]) if m >= target - 1e-9]
        print(f"  {s}: {reached[0] if reached else 'not reached'}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for s in strategies:
            ax.errorbar(sizes, means[s], yerr=stds[s], marker="o", capsize=3, label=s)
        ax.set_xlabel("labelled photos")
        ax.set_ylabel(f"held-out {task.headline}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"plot: {args.plot}")


def _any_over_threshold(p, y, folds) -> set:
    """The rule before issue 27, for comparison: flagged when any other class reaches its
    per-fold threshold, even when the label is still the most probable confident class."""
    p = np.stack([1 - p, p], axis=1) if p.ndim == 1 else p
    flagged = set()
    for _, va in folds:
        t = np.array([p[va][y[va] == j, j].mean() if (y[va] == j).any() else np.inf
                      for j in range(p.shape[1])])
        for i in va:
            if any(p[i, j] >= t[j] for j in range(p.shape[1]) if j != y[i]):
                flagged.add(int(i))
    return flagged


def flipped(args, task, x, y):
    from small_photo_classifier.features.data import audit
    from small_photo_classifier.features.choose import cv, probe
    config = probe.ProbeConfig("average", False, 0.1)
    print("\n## 2. Flipped labels found by suspect_labels\n")
    print("| flipped | found in the top 2x | flagged | recall (flips flagged) | precision "
          "(flagged that were flipped) | before issue 27: flagged, precision |\n"
          "|---|---|---|---|---|---|")
    for share in (0.05, 0.10):
        found, counts, recall, precision, old_counts, old_precision = [], [], [], [], [], []
        for seed in range(args.seeds):
            rng = np.random.default_rng(100 + seed)
            flips = rng.choice(len(y), int(round(share * len(y))), replace=False)
            noisy = y.copy()
            if task.kind == "binary":
                noisy[flips] = 1 - noisy[flips]
            else:
                k = len(task.class_names)
                noisy[flips] = (noisy[flips] + rng.integers(1, k, len(flips))) % k
            folds = cv.make_folds(noisy, 5, seed, task)
            oof = np.zeros((len(y), *((task.units,) if task.units > 1 else ())))
            for tr, va in folds:
                oof[va] = probe.probabilities(probe.fit(x[tr], noisy[tr], task, config), x[va],
                                              task)
            table = audit.suspects(task, noisy, oof, cv.fold_of(folds, len(y)))
            top = set(table.row.head(2 * len(flips)))
            found.append(len(top & set(flips)) / len(flips))
            flagged, flips_set = set(table.row), set(int(f) for f in flips)
            counts.append(len(flagged))
            recall.append(len(flagged & flips_set) / len(flips_set))
            precision.append(len(flagged & flips_set) / max(1, len(flagged)))
            old = _any_over_threshold(oof, noisy, folds)
            old_counts.append(len(old))
            old_precision.append(len(old & flips_set) / max(1, len(old)))
        pm = lambda v: f"{np.mean(v):.2f} ± {np.std(v):.2f}"  # noqa: E731
        print(f"| {share:.0%} ({len(flips)} photos) | {pm(found)} | {np.mean(counts):.0f} | "
              f"{pm(recall)} | {pm(precision)} | {np.mean(old_counts):.0f}, "
              f"{pm(old_precision)} |")


def near_duplicates(args, clf, frame, x):
    import tensorflow as tf
    from small_photo_classifier.features.data import selection
    from small_photo_classifier.pipeline import input as input_lib, ops
    layer = clf.net.feature_layer
    model = clf.feature_model([layer])
    rows = np.random.default_rng(0).choice(len(frame), min(40, len(frame)), replace=False)
    # --centred: cosine of the features minus the data's mean feature (every photo's
    # post-ReLU features share a large common part, bigger in some backbones than others).
    centre = x.mean(axis=0) if args.centred else 0
    x = x - centre
    base = selection.normalised(x[rows])
    same = []
    for variant in ("mirror", "crop90", "jpeg75"):
        images = []
        for path in frame.path.to_numpy()[rows]:
            image = input_lib.decode_and_resize(args.image_size)({"path": path})["image"]
            if variant == "mirror":
                image = image[:, ::-1]
            elif variant == "crop90":
                image = tf.image.resize(tf.image.central_crop(image, 0.9),
                                        [args.image_size] * 2)
            else:
                image = tf.cast(tf.io.decode_jpeg(tf.io.encode_jpeg(
                    tf.cast(image, tf.uint8), quality=75)), tf.float32)
            images.append(ops.vgg_mean_centre_image(image))
        feats = model(tf.stack(images), training=False)[layer].numpy()
        sims = np.sum(base * selection.normalised(feats.mean(axis=(1, 2)) - centre), axis=1)
        same.append(sims)
        print(f"  {variant}: similarity to the original min {sims.min():.4f}, "
              f"median {np.median(sims):.4f}")
    all_x = selection.normalised(x)
    sims = all_x @ all_x.T
    np.fill_diagonal(sims, -1)
    print(f"  different photos: highest similarity {sims.max():.4f} "
          f"(99.9th percentile {np.quantile(sims[sims > -1], 0.999):.4f})")
    print(f"  -> same photo >= {np.min(same):.4f}; different photos <= {sims.max():.4f}")
    upper = sims[np.triu_indices(len(sims), 1)]
    same = np.concatenate(same)
    for threshold in (0.90, 0.93, 0.95, 0.97):
        print(f"  threshold {threshold:.2f}: {int((upper >= threshold).sum())} of {len(upper)} "
              f"pairs of different files flagged; {np.mean(same >= threshold):.0%} of the "
              "altered copies caught")


def main():
    parser = common.photo_parser(__doc__)
    parser.add_argument("--seed_size", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sections", default="active,flipped,duplicates")
    parser.add_argument("--plot", default=None, help="PNG of the active-learning curves")
    parser.add_argument("--centred", action="store_true",
                        help="duplicates: cosine of features minus the data's mean")
    args = parser.parse_args()
    task, clf, frame, x, y = _setup(args)
    print(f"# label efficiency: {args.data_dir} ({len(y)} photos, {task.describe()})")
    if "active" in args.sections:
        simulate(args, task, x, y)
    if "flipped" in args.sections:
        flipped(args, task, x, y)
    if "duplicates" in args.sections:
        print("\n## 3. Near-duplicate threshold")
        near_duplicates(args, clf, frame, x)


if __name__ == "__main__":
    main()
