"""Does the cache change accuracy? float16 vs float32, and augmented cached views.

For one dataset and split, trains scenarios A, B, C on the cache (same seeds) and prints
validation AUC for:
  * a float32 cache vs a float16 cache (and the largest change in any predicted probability);
  * plain cached features vs plain + K augmented cached views per training image.
Averages over --seeds seeds, because 1-2 hundred validation images make AUC noisy.

  python bench/bench_cache_quality.py --data_dir=../shared/data/hymenoptera/train
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import tempfile  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--val_size", default="0.25")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--augment", default="keras_blog")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--weights", default="none")
    p.add_argument("--cache_dir", default=None)
    args = p.parse_args()

    import numpy as np
    from small_photo_classifier.features.fit.loop import snapshot
    from small_photo_classifier.pipeline import discovery, scan, split
    from small_photo_classifier.workflow.base import config
    ds = discovery.discover(args.data_dir)
    work = args.cache_dir or tempfile.mkdtemp(prefix="bench_quality_")
    frame = scan.filter_bad_images(ds.frame, args.image_size, "skip", os.path.join(work, "b.csv"))
    train, val = split.split_train_val(frame, config.parse_val_size(args.val_size), 0)
    clf, feats, views = _features(args, ds, frame, (train, val), work)
    ytr, yva = train.label.to_numpy(), val.label.to_numpy()
    plain16 = feats["float16"][0]
    with_views = {k: np.concatenate([plain16[k], views[k]]) for k in plain16}
    y_views = np.concatenate([ytr] * (args.views + 1))
    initial = snapshot(clf.model)
    rows = {name: {s: [] for s in "ABC"} for name in ("float32", "float16", "views")}
    max_dp = 0.0
    for seed in range(args.seeds):
        trial = (args, clf, initial, work, yva, seed)
        r32 = _heads(trial, feats["float32"][0], ytr, feats["float32"][1])
        r16 = _heads(trial, feats["float16"][0], ytr, feats["float16"][1])
        rv = _heads(trial, with_views, y_views, feats["float16"][1])
        for s in "ABC":
            rows["float32"][s].append(r32[s][0])
            rows["float16"][s].append(r16[s][0])
            rows["views"][s].append(rv[s][0])
            max_dp = max(max_dp, float(np.max(np.abs(r32[s][1] - r16[s][1]))))
    print(f"\ndata {ds.data_dir}: {len(train)} train / {len(val)} val, {args.image_size}px, "
          f"weights={args.weights}, {args.epochs} epochs, lr {args.learning_rate}, "
          f"{args.seeds} seeds")
    print("| cache | A val AUC | B val AUC | C val AUC |\n|---|---|---|---|")
    labels = {"float32": "float32", "float16": "float16",
              "views": f"float16 + {args.views} {args.augment} views"}
    for name, per in rows.items():
        print(f"| {labels[name]} | " + " | ".join(
            f"{np.mean(v):.4f} ± {np.std(v):.4f}" for v in per.values()) + " |")
    print(f"max |P(float32 cache) - P(float16 cache)| over all val images, scenarios, seeds: "
          f"{max_dp:.2e}")


def _features(args, ds, frame, parts, work):
    """(classifier, {dtype: (train, val) features}, the training images' cached views)."""
    from small_photo_classifier.features import backbone
    from small_photo_classifier.features.store import cache
    from small_photo_classifier.features.weights import weights_identity
    train, val = parts
    clf = backbone.build_classifier(args.weights, False, args.image_size, 0, backbone="vgg16")
    wid = weights_identity(args.weights, 0)
    specs = {dt: cache.CacheSpec(wid, False, args.image_size, dt, ds.data_dir, net=clf.net)
             for dt in ("float32", "float16")}
    feats = {}
    for dt, spec in specs.items():
        path = cache.ensure_features(clf, spec, frame, work,
                                     cache.Extraction(args.batch_size)).path
        feats[dt] = (cache.load_features(path, spec, train, spec.layers),
                     cache.load_features(path, spec, val, spec.layers))
    aug_spec = cache.CacheSpec(**{**specs["float16"].__dict__, "augment": args.augment})
    aug_path = cache.ensure_features(clf, aug_spec, train, work, cache.Extraction(args.batch_size),
                                     views=args.views).path
    return clf, feats, cache.load_features(aug_path, aug_spec, train, aug_spec.layers,
                                           views=args.views)


def _heads(trial, train_feats, y, val_feats):
    """Scenario -> (val AUC, val probabilities) of A, B, C trained from the same weights."""
    from small_photo_classifier.features import task
    from small_photo_classifier.features.fit import heads
    from small_photo_classifier.features.fit.settings import FitSettings
    from small_photo_classifier.features.fit.loop import restore
    args, clf, initial, work, yva, seed = trial
    out = {}
    for s in ("A", "B", "C"):
        r = heads.train_scenarios(clf, [heads.HeadConfig.for_scenario(s, args.learning_rate)],
                                  task.binary(), heads.FeatureSplit(train_feats, y),
                                  heads.FeatureSplit(val_feats, yva),
                                  FitSettings(args.epochs, args.batch_size, seed,
                                              progress=False), out_dir=work)[s]
        heads.load_scenario_weights(clf, s, r.weights_path)
        start = r.start_layer
        probs = clf.model_from(start).predict(val_feats[start], verbose=0)[:, 0]
        restore(clf.model, initial)  # every run starts from the same weights
        out[s] = (r.val_scores["auc"], probs)
    return out


if __name__ == "__main__":
    main()
