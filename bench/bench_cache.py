"""Benchmark: what the HDF5 feature cache buys, measured in one run.

Prints, for one dataset (synthetic by default, or --data_dir):
  1. extraction throughput vs the bare model on in-memory tensors (target >= 0.85);
  2. scenarios A and B, --epochs each: from the cache vs the reference way
     (frozen base recomputed every epoch), and the ratio;
  3. scenario C (block5 + dense): from cached block4_pool vs through the whole network;
  4. peak memory (max RSS) of extraction at two dataset sizes, each in a fresh process.

Examples:
  python bench/bench_cache.py                                   # 2000 synthetic images, 64 px
  python bench/bench_cache.py --data_dir=../shared/data/hymenoptera/train --image_size=224
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", help="real data (either layout); default: synthetic images")
    p.add_argument("--n_images", type=int, default=2000, help="synthetic images")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--ref_images", type=int, default=0,
                   help="images for the reference-way runs (0 = all); fewer are scaled "
                        "linearly and marked 'projected'")
    p.add_argument("--memory_sizes", default="500,2000", help="dataset sizes for peak memory")
    p.add_argument("--sections", default="extract,heads,memory",
                   help="comma-separated subset of extract,heads,memory")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--_extract_only", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


def synthetic(root, n, size=96):
    from small_photo_classifier.pipeline import demo
    return demo.make_demo_dataset(root, n_train=n, n_test=2, size=size, seed=1)


def extract_only(args):
    """Child process: extract features of n synthetic images and report max RSS."""
    from small_photo_classifier.features import backbone
    from small_photo_classifier.features.store import cache
    from small_photo_classifier.pipeline import discovery
    root = synthetic(os.path.join(args.work, f"mem{args._extract_only}"), args._extract_only)
    ds = discovery.discover(root)
    clf = backbone.build_classifier("none", False, args.image_size, 0, backbone="vgg16")
    spec = cache.CacheSpec("none(seed=0)", False, args.image_size, "float16", ds.data_dir,
                           net=clf.net)
    cache.ensure_features(clf, spec, ds.frame, os.path.join(args.work, "memcache"),
                          cache.Extraction(args.batch_size, progress=False))
    print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    args = parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="bench_cache_")
    if args._extract_only:
        return extract_only(args)
    import tensorflow as tf
    from small_photo_classifier.features import backbone
    from small_photo_classifier.pipeline import discovery, scan, split
    if args.data_dir:
        ds = discovery.discover(args.data_dir)
        label = f"{ds.data_dir} ({len(ds.frame)} images)"
    else:
        ds = discovery.discover(synthetic(os.path.join(args.work, "data"), args.n_images))
        label = f"synthetic ({len(ds.frame)} images)"
    frame = scan.filter_bad_images(ds.frame, args.image_size, "skip",
                                   os.path.join(args.work, "bad.csv"))
    print(f"data: {label}; usable {len(frame)}; image {args.image_size}px; batch "
          f"{args.batch_size}; epochs {args.epochs}; tf {tf.__version__}; {os.cpu_count()} "
          f"CPUs; GPU: {bool(tf.config.list_physical_devices('GPU'))}", flush=True)
    clf = backbone.build_classifier("none", False, args.image_size, 0, backbone="vgg16")
    sections = set(args.sections.split(","))
    rows, spec, result = _extraction_rows(args, clf, ds, frame)
    if "heads" in sections:
        rows += _scenario_rows(args, clf, spec, result, split.split_train_val(frame, 0.1, seed=0))
    if "memory" in sections:
        rows += _memory_rows(args)
    print("\n| measurement | value | ratio |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _extraction_rows(args, clf, ds, frame):
    """1. Extraction vs the bare model on in-memory tensors (same images, same batches)."""
    import tensorflow as tf
    from small_photo_classifier.features.store import cache
    from small_photo_classifier.pipeline import input as input_lib
    size, bs = args.image_size, args.batch_size
    spec = cache.CacheSpec("none(seed=0)", False, size, "float16", ds.data_dir, net=clf.net)
    cache_dir = os.path.join(args.work, "cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    fm = clf.feature_model(spec.layers)
    run = tf.function(lambda x: fm(x, training=False), reduce_retracing=True)
    batch = next(iter(input_lib.eval_dataset(frame.path[:bs].tolist(), None,
                                             frame.name[:bs].tolist(), size, bs)))["image"]
    run(batch)  # trace + warm up
    n_batches = math.ceil(len(frame) / bs)
    t_bare, _ = timed(lambda: [run(batch)["block5_pool"].numpy() for _ in range(n_batches)])
    t_extract, result = timed(lambda: cache.ensure_features(clf, spec, frame, cache_dir,
                                                            cache.Extraction(bs, progress=False)))
    bare_ips, ext_ips = n_batches * bs / t_bare, len(frame) / t_extract
    rows = [("extraction throughput (img/s): bare model on in-memory batch",
             f"{bare_ips:.1f}", ""),
            ("extraction throughput (img/s): files -> tf.data -> VGG -> HDF5",
             f"{ext_ips:.1f}", f"ratio {ext_ips / bare_ips:.2f} (target >= 0.85)")]
    print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows, spec, result


def _scenario_rows(args, clf, spec, result, parts):
    """2./3. Scenarios from the cache vs the reference way (images through VGG every
    epoch)."""
    from small_photo_classifier.features import backbone, scenarios, task
    from small_photo_classifier.features.store import cache
    from small_photo_classifier.features.fit import heads
    from small_photo_classifier.features.fit.settings import FitSettings
    from small_photo_classifier.pipeline import input as input_lib
    train, val = parts
    size, bs, epochs = args.image_size, args.batch_size, args.epochs
    feats_tr = cache.load_features(result.path, spec, train, spec.layers)
    feats_va = cache.load_features(result.path, spec, val, spec.layers)
    ytr, yva = train.label.to_numpy(), val.label.to_numpy()
    ref_train = train.iloc[:args.ref_images or len(train)]
    scale = len(train) / len(ref_train)
    rows = []
    for scenario in ("A", "B", "C"):
        t_cached = heads.train_scenarios(clf, [heads.HeadConfig.for_scenario(scenario, 1e-4)],
                                         task.binary(), heads.FeatureSplit(feats_tr, ytr),
                                         heads.FeatureSplit(feats_va, yva),
                                         FitSettings(epochs, bs, progress=False)
                                         )[scenario].seconds
        initial = clf.model.get_weights()
        clf.set_trainable(scenarios.get_scenario(scenario).blocks)
        clf.model.compile(optimizer=backbone.make_optimizer("adam", 1e-4),
                          loss=task.binary().loss(), metrics=task.binary().keras_metrics())
        tr = input_lib.train_dataset(ref_train.path.tolist(), ref_train.label.tolist(),
                                     ref_train.name.tolist(), size, bs, "none", seed=0)
        va = input_lib.eval_dataset(val.path.tolist(), val.label.tolist(), val.name.tolist(),
                                    size, bs)
        t_ref, _ = timed(lambda: clf.model.fit(
            tr.map(input_lib.to_inputs_targets), validation_data=va.map(
                input_lib.to_inputs_targets), epochs=epochs, steps_per_epoch=math.ceil(
                    len(ref_train) / bs), shuffle=False, verbose=0))
        clf.model.set_weights(initial)
        t_ref *= scale
        note = "" if scale == 1 else f" (projected from {len(ref_train)} images)"
        what = {"A": "scenario A", "B": "scenario B",
                "C": "scenario C (block5+dense)"}[scenario]
        rows.append((f"{what}, {epochs} epochs: from cache (s)", f"{t_cached:.1f}", ""))
        rows.append((f"{what}, {epochs} epochs: whole network each epoch (s){note}",
                     f"{t_ref:.1f}", f"speed-up x{t_ref / t_cached:.1f}"))
        print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows


def _memory_rows(args):
    """4. Peak memory of extraction at two sizes, each in a fresh process."""
    rows = []
    for n in [int(s) for s in args.memory_sizes.split(",")]:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--_extract_only={n}",
                              f"--image_size={args.image_size}",
                              f"--batch_size={args.batch_size}", f"--work={args.work}"],
                             capture_output=True, text=True, check=True)
        rss = json.loads(out.stdout.strip().splitlines()[-1])["max_rss_mb"]
        rows.append((f"extraction peak memory, {n} synthetic images (MB)", f"{rss:.0f}", ""))
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
