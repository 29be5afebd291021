"""Peak memory of the heads stage: in memory vs streamed from the HDF5 cache.

Builds synthetic caches of N and 4N rows with the real layer shapes at
--image_size (random features: memory and speed do not depend on their values),
then trains scenarios A and B (--epochs each, 5-fold CV off) in a fresh process
per case and prints its peak RSS and wall time. With streaming the peak should
stay flat from N to 4N; in memory it grows with the cache.

  python bench/bench_memory.py --rows=500 --image_size=224
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CHILD = r"""
import json, resource, sys, time
import numpy as np, pandas as pd
from small_photo_classifier.features import backbone, task
from small_photo_classifier.features.store import cache
from small_photo_classifier.features.fit import heads
from small_photo_classifier.features.fit.settings import FitSettings
folder, size, stream, epochs = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
clf = backbone.build_classifier("none", False, size, 0, backbone="vgg16")
spec = cache.CacheSpec("none(seed=0)", False, size, data_dir=folder, net=clf.net)
frame = pd.read_csv(folder + "/frame.csv", dtype={"name": str})
train, val = frame.iloc[:-50], frame.iloc[-50:]
path = folder + "/" + spec.file_name()
started = time.perf_counter()
tr = cache.load_features(path, spec, train, spec.layers, stream=stream)
va = cache.load_features(path, spec, val, spec.layers, stream=stream)
results = heads.train_scenarios(clf, ["A", "B"], task.binary(),
                                heads.FeatureSplit(tr, train.label.to_numpy()),
                                heads.FeatureSplit(va, val.label.to_numpy()),
                                FitSettings(epochs, 32, progress=False))
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "auc": {s: r.val_scores["auc"] for s, r in results.items()}}))
"""


def make_cache(folder: str, rows: int, size: int) -> None:
    """A finished cache of ``rows`` random rows (and empty stand-in image files)."""
    import numpy as np
    import pandas as pd
    from small_photo_classifier.features import backbone
    from small_photo_classifier.features.store import cache, h5file as store
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    paths = []
    for i in range(rows):
        paths.append(os.path.join(images, f"{i}.jpg"))
        open(paths[-1], "wb").close()
    frame = pd.DataFrame({"path": paths, "name": [str(i) for i in range(rows)],
                          "label": [i % 2 for i in range(rows)]})
    frame.to_csv(os.path.join(folder, "frame.csv"), index=False)
    clf = backbone.build_classifier("none", False, size, 0, backbone="vgg16")
    spec = cache.CacheSpec("none(seed=0)", False, size, data_dir=folder, net=clf.net)
    shapes = cache.layer_shapes(clf, spec.layers)
    items = cache._items(frame, 0)
    rng = np.random.default_rng(0)
    with store.FeatureCache.create(os.path.join(folder, spec.file_name()), spec, shapes,
                                   chunk=32) as store:
        for start in range(0, rows, 256):
            chunk = items.iloc[start:start + 256]
            store.append(chunk, {n: rng.random((len(chunk), *s), np.float32)
                                 for n, s in shapes.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for n in (args.rows, 4 * args.rows):
        folder = tempfile.mkdtemp(prefix=f"bench-memory-{n}-")
        make_cache(folder, n, args.image_size)
        size_mb = sum(os.path.getsize(os.path.join(folder, p)) for p in os.listdir(folder)
                      if p.endswith(".h5")) / 2**20
        for stream in (False, True):
            out = subprocess.run([sys.executable, "-c", CHILD, folder, str(args.image_size),
                                  "1" if stream else "0", str(args.epochs)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"rows": n, "cache_mb": round(size_mb), "mode":
                         "streamed" if stream else "in memory",
                         "peak_rss_mb": round(result["peak_rss_mb"]),
                         "seconds": round(result["seconds"], 1)})
            print(rows[-1], flush=True)
    import pandas as pd
    table = pd.DataFrame(rows)
    print(f"\nheads stage (A + B, {args.epochs} epochs, {args.image_size} px layer shapes)\n"
          f"{table.to_string(index=False)}")
    for mode in ("in memory", "streamed"):
        part = table[table["mode"] == mode]
        print(f"{mode}: peak RSS 4N / N = "
              f"{part.peak_rss_mb.iloc[1] / part.peak_rss_mb.iloc[0]:.2f}")
    for n in (args.rows, 4 * args.rows):
        part = table[table.rows == n].set_index("mode")
        print(f"{n} rows: streamed / in-memory time = "
              f"{part.seconds['streamed'] / part.seconds['in memory']:.2f}")


if __name__ == "__main__":
    main()
