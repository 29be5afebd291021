"""Performance against peers and the hardware limit, measured in one run.

Sections (--sections, comma-separated; all by default):

  limit     float32 and bfloat16 matmul GFLOP/s on this machine (the ceiling);
  extract   VGG16 conv-base throughput: the bare Keras model on one in-memory batch,
            then the project's extraction (decode + resize + mean-centre + model +
            HDF5 write) in float32 and in --precision=auto's choice, with achieved
            GFLOP/s as a fraction of the matmul rate;
  heads     the dense-layer experiment (A and B, 5 epochs each) as whole processes:
            train.py --stage=heads from a warm cache vs the reference write-up's way
            (ImageDataGenerator over a frozen VGG16, every epoch re-running it);
  precision heads-stage scenario AUCs (5-fold CV) in float32 vs mixed_bfloat16;
  finetune  the final model (scenario B, aggressive augmentation, patience 5) from
            K cached views vs the whole network (K = 0): stage seconds and val AUC;
  ray       extraction in this process vs a local Ray cluster with 1 and 2 workers;
  mirrored  the heads stage (with extraction) on one device vs 2 CPU replicas;
  ftprofile one whole-network fine-tuning epoch: input alone, step alone, fit.

Meant for ImageNet-derived weights on real photos:

  W=$(python ../shared/tools/vgg16_pretrained.py)
  python bench/bench_perf.py --data_dir=../shared/data/hymenoptera/train --weights="$W"
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere without installing
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Multiply-accumulates of the VGG16 conv base per 224 px image (13 conv layers);
# they scale with the number of pixels.
VGG16_CONV_GMAC_224 = 15.35


def gflop_per_image(size: int) -> float:
    """FLOPs (2 per multiply-accumulate) of the conv base for one ``size`` px image."""
    return 2 * VGG16_CONV_GMAC_224 * (size / 224) ** 2


def _train(args, workdir, *extra, cache_dir=None):
    return common.run_train(args, workdir, "--notensorboard", *extra, cache_dir=cache_dir)


_metrics = common.metrics


def matmul_rates(seconds: float = 4.0, n: int = 2048) -> dict:
    """GFLOP/s of an n x n matmul in float32 and bfloat16."""
    import tensorflow as tf
    rates = {}
    for dtype in ("float32", "bfloat16"):
        a = tf.random.uniform((n, n), dtype=tf.float32)
        a = tf.cast(a, dtype)
        mm = tf.function(lambda x: tf.matmul(x, x))
        mm(a).numpy()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            mm(a).numpy()
            count += 1
        rates[dtype] = 2 * n ** 3 * count / (time.perf_counter() - started) / 1e9
    return rates


def section_limit(args, results):
    rates = matmul_rates()
    results["matmul"] = rates
    print(f"\n## limit: {2048}^2 matmul  float32 {rates['float32']:.0f} GFLOP/s, bfloat16 "
          f"{rates['bfloat16']:.0f} GFLOP/s (bf16/fp32 {rates['bfloat16'] / rates['float32']:.2f})")


def _bare_rate(policy, size, batch, seconds):
    """img/s of keras.applications.VGG16 (no top) on one in-memory batch."""
    import keras
    import tensorflow as tf
    keras.mixed_precision.set_global_policy(policy)
    model = keras.applications.VGG16(weights=None, include_top=False,
                                     input_shape=(size, size, 3))
    run = tf.function(lambda x: model(x, training=False))
    x = tf.random.uniform((batch, size, size, 3), -120, 150)
    run(x).numpy()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(x).numpy()
        count += batch
    keras.mixed_precision.set_global_policy("float32")
    return count / (time.perf_counter() - started)


def section_extract(args, results):
    import pandas as pd
    from small_photo_classifier.features import backbone, precision
    from small_photo_classifier.features.store import cache
    from small_photo_classifier.features.weights import weights_identity
    from small_photo_classifier.pipeline import discovery, scan
    frame = discovery.discover(args.data_dir).frame
    frame = scan.filter_bad_images(frame, args.image_size, "skip",
                                   os.path.join(tempfile.mkdtemp(), "bad.csv"))
    frame = frame.iloc[:args.extract_images].reset_index(drop=True)
    auto = precision.choose("auto")
    policies = ["float32"] + (["mixed_bfloat16"] if auto.policy == "float32" else [auto.policy])
    gflop = gflop_per_image(args.image_size)
    rates = results.get("matmul") or matmul_rates()
    print(f"\n## extract: {len(frame)} photos at {args.image_size} px ({gflop:.1f} GFLOP each); "
          f"auto precision here = {auto.policy} ({auto.reason})")
    rows = []
    for policy in policies:
        bare = _bare_rate(policy, args.image_size, args.batch_size, args.seconds)
        precision.apply(precision.Precision(policy, "bench"))
        clf = backbone.build_classifier(args.weights, False, args.image_size, 0, backbone="vgg16")
        spec = cache.CacheSpec(weights_identity(args.weights, 0), False,
                               args.image_size, "float32",
                               args.data_dir, precision=policy, net=clf.net)
        folder = tempfile.mkdtemp(prefix="bench-extract-")
        result = cache.ensure_features(clf, spec, frame, folder, cache.Extraction(args.batch_size,
                                                                                  progress=False))
        shutil.rmtree(folder)
        ours = len(frame) / result.seconds
        limit = rates["bfloat16" if "bfloat16" in policy else "float32"]
        rows.append({"precision": policy, "bare_img_s": round(bare, 2),
                     "extract_img_s": round(ours, 2), "extract_vs_bare": round(ours / bare, 3),
                     "gflop_s": round(ours * gflop, 1),
                     "fraction_of_matmul": round(ours * gflop / limit, 3)})
    precision.apply(precision.Precision("float32", "bench"))
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if len(rows) > 1:
        print(f"{rows[1]['precision']} / float32 extraction: "
              f"{rows[1]['extract_img_s'] / rows[0]['extract_img_s']:.2f}x")
    results["extract"] = rows


REFERENCE_SCRIPT = r'''
import sys, time, numpy as np, pandas as pd, keras
from sklearn.metrics import roc_auc_score
try:
    from keras.preprocessing.image import ImageDataGenerator
except ImportError:  # Keras 3.15 keeps it only as a legacy module
    from keras.src.legacy.preprocessing.image import ImageDataGenerator
split, weights, size, epochs, batch = sys.argv[1:6]
size, epochs, batch = int(size), int(epochs), int(batch)
frame = pd.read_csv(split)
frame["label"] = frame.label.astype(str)
base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
base.load_weights(weights)
base.trainable = False
gen = ImageDataGenerator(preprocessing_function=keras.applications.vgg16.preprocess_input)
def flow(subset, shuffle):
    return gen.flow_from_dataframe(frame[frame.subset == subset], x_col="path", y_col="label",
                                   target_size=(size, size), class_mode="binary",
                                   batch_size=batch, shuffle=shuffle, seed=0)
for scenario, lr in (("A", 1e-3), ("B", 1e-4)):
    x = keras.layers.Flatten()(base.output)
    x = keras.layers.Dense(256, activation="relu", trainable=scenario == "B")(x)
    x = keras.layers.Dropout(0.5)(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(base.input, out)
    model.compile(keras.optimizers.Adam(lr), "binary_crossentropy", metrics=["auc"])
    model.fit(flow("train", True), validation_data=flow("val", False), epochs=epochs,
              verbose=0)
'''


def section_heads(args, results):
    """A+B for 5 epochs: ours from a warm cache vs the ImageDataGenerator way, as processes."""
    import pandas as pd
    workdir = tempfile.mkdtemp(prefix="bench-heads-")
    flags = ["--stage=heads", "--scenarios=A,B", "--epochs=5", "--cv_folds=0",
             "--precision=float32"]
    _train(args, workdir, *flags)  # warm the cache (not timed)
    _, ours = _train(args, workdir, *flags)
    split = os.path.join(workdir, "split.csv")
    n = len(pd.read_csv(split))
    script = os.path.join(workdir, "reference.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(REFERENCE_SCRIPT)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, script, split, args.weights, str(args.image_size),
                          "5", str(args.batch_size)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"reference script failed:\n{out.stderr[-3000:]}")
    reference = time.perf_counter() - started
    results["heads"] = {"images": n, "ours_s": round(ours, 1), "reference_s": round(reference, 1),
                        "speedup": round(reference / ours, 1)}
    print(f"\n## heads: A+B, 5 epochs each, {n} photos at {args.image_size} px, whole processes"
          f"\n  train.py --stage=heads (warm cache) {ours:.1f} s; reference way "
          f"(ImageDataGenerator over frozen VGG16) {reference:.1f} s: {reference / ours:.1f}x")


def section_precision(args, results):
    """Extraction and the heads stage in float32 vs mixed_bfloat16: seconds per part, and
    each scenario's validation and CV scores (the head computes in float32 either way)."""
    rows = {}
    for policy in ("float32", "mixed_bfloat16"):
        workdir = tempfile.mkdtemp(prefix=f"bench-precision-{policy}-")
        cache_dir = tempfile.mkdtemp(prefix=f"bench-precision-cache-{policy}-")
        _, seconds = _train(args, workdir, "--stage=heads", "--cv_folds=5",
                            f"--scenarios={args.scenarios}", f"--precision={policy}",
                            "--val_size=0.2", cache_dir=cache_dir)
        metrics = _metrics(workdir)
        log = open(os.path.join(workdir, "train.log"), encoding="utf-8").read()
        extraction = float(log.split(" computed in ")[1].split(" s")[0])
        rows[policy] = {"process_s": round(seconds, 1), "extraction_s": extraction,
                        **{s: {"val_auc": m["best_val_auc"], "val_accuracy": m["val_accuracy"],
                               "cv_auc": m["cv_auc_mean"], "seconds": m["seconds"]}
                           for s, m in sorted(metrics["heads"].items())}}
        shutil.rmtree(cache_dir, ignore_errors=True)
    results["precision"] = rows
    print(f"\n## precision: extraction + heads stage (5-fold CV), {args.image_size} px")
    for policy, row in rows.items():
        print(f"  {policy:15s} process {row['process_s']} s, extraction {row['extraction_s']} s")
        for s in args.scenarios.split(","):
            print(f"    {s}: " + ", ".join(f"{k} {v}" for k, v in row[s].items()))
    worst = max(abs(rows["float32"][s][k] - rows["mixed_bfloat16"][s][k])
                for s in args.scenarios.split(",") for k in ("val_auc", "cv_auc"))
    print(f"  largest scenario AUC change (val or CV): {worst:.4f}; extraction "
          f"{rows['float32']['extraction_s'] / rows['mixed_bfloat16']['extraction_s']:.2f}x")


def section_finetune(args, results):
    """The reference recipe's final model from K cached views vs the whole network."""
    base = tempfile.mkdtemp(prefix="bench-finetune-")
    heads_dir = os.path.join(base, "heads_run")
    _train(args, heads_dir, "--stage=heads", "--scenarios=B", "--cv_folds=0")
    plain_cache = glob.glob(os.path.join(args.cache_dir,
                                         f"vgg16-*-{args.image_size}px-file-notop-float32-*.h5"))
    rows = []
    for k in args.views:
        workdir = os.path.join(base, f"k{k}")
        shutil.copytree(heads_dir, workdir)
        # A fresh cache folder holding only the plain features: K's views are extracted
        # inside the timed stage, as a first run would.
        cache_dir = os.path.join(base, f"cache{k}")
        os.makedirs(cache_dir)
        for path in plain_cache:
            if "-aug_" not in path:
                shutil.copy(path, cache_dir)
        _, wall = _train(args, workdir, "--stage=finetune", "--scenario=B", "--bag=false",
                         "--augment=aggressive", "--patience=5",
                         f"--finetune_epochs={args.finetune_epochs}", f"--finetune_views={k}",
                         cache_dir=cache_dir)
        ft = _metrics(workdir)["finetune"]
        rows.append({"K": k, "stage_s": ft["seconds"], "process_s": round(wall, 1),
                     "epochs": ft["epochs_run"], "best_epoch": ft["best_epoch"],
                     "val_auc": round(ft["val_auc"], 4)})
        print(rows[-1], flush=True)
    results["finetune"] = rows
    import pandas as pd
    table = pd.DataFrame(rows)
    whole = table[table.K == 0]
    if len(whole):
        table["speedup_vs_K0"] = (float(whole.stage_s.iloc[0]) / table.stage_s).round(1)
    print(f"\n## finetune: scenario B, aggressive augmentation, patience 5, at most "
          f"{args.finetune_epochs} epochs, {args.image_size} px\n{table.to_string(index=False)}")


def section_ray(args, results):
    """Extraction of the same photos on this process vs a local Ray cluster (1, 2 workers)."""
    from small_photo_classifier.features import backbone
    from small_photo_classifier.features.store import cache
    from small_photo_classifier.features.serve import ray_engine
    from small_photo_classifier.features.weights import weights_identity
    from small_photo_classifier.pipeline import discovery, scan
    frame = discovery.discover(args.data_dir).frame
    frame = scan.filter_bad_images(frame, args.image_size, "skip",
                                   os.path.join(tempfile.mkdtemp(), "bad.csv"))
    frame = frame.iloc[:args.extract_images].reset_index(drop=True)
    clf = backbone.build_classifier(args.weights, False, args.image_size, 0, backbone="vgg16")
    spec = cache.CacheSpec(weights_identity(args.weights, 0), False, args.image_size,
                           "float32", args.data_dir, net=clf.net)
    build = {"weights": args.weights, "include_top": False, "image_size": args.image_size,
             "seed": 0, "backbone": "vgg16"}
    rows = []
    folder = tempfile.mkdtemp(prefix="bench-ray-")
    plain = cache.ensure_features(clf, spec, frame, folder, cache.Extraction(args.batch_size,
                                                                             progress=False))
    shutil.rmtree(folder)
    rows.append({"engine": "this process", "start_s": 0.0, "extract_s": round(plain.seconds, 1),
                 "img_s": round(len(frame) / plain.seconds, 2)})
    for workers in (1, 2):
        started = time.perf_counter()
        engine = ray_engine.RayEngine("local", workers, build=build).start()
        start_s = time.perf_counter() - started
        folder = tempfile.mkdtemp(prefix="bench-ray-")
        try:
            result = cache.ensure_features(clf, spec, frame, folder,
                                           cache.Extraction(args.batch_size, engine=engine,
                                                            progress=False))
        finally:
            engine.stop()
            shutil.rmtree(folder)
        rows.append({"engine": f"ray local, {workers} worker(s)", "start_s": round(start_s, 1),
                     "extract_s": round(result.seconds, 1),
                     "img_s": round(len(frame) / result.seconds, 2)})
    import pandas as pd
    table = pd.DataFrame(rows)
    table["time_vs_plain"] = (table.extract_s / rows[0]["extract_s"]).round(2)
    table["overhead_ms_per_image"] = ((table.extract_s - rows[0]["extract_s"]) * 1000
                                      / len(frame)).round(0)
    results["ray"] = table.to_dict("records")
    print(f"\n## ray: extraction of {len(frame)} photos at {args.image_size} px "
          f"(extract_s includes worker start-up: TensorFlow import + model build)\n"
          f"{table.to_string(index=False)}")


def section_mirrored(args, results):
    """train.py --stage=heads (fresh cache, so extraction included) on one device vs
    mirrored over 2 CPU replicas, as whole processes."""
    rows = []
    for name, extra in (("one device", ["--strategy=one"]),
                        ("mirrored, 2 CPU replicas", ["--strategy=mirrored",
                                                      "--cpu_replicas=2"])):
        workdir = tempfile.mkdtemp(prefix="bench-mirrored-")
        cache_dir = os.path.join(workdir, "cache")
        _, seconds = _train(args, workdir, "--stage=heads", "--scenarios=A,B", "--cv_folds=0",
                            "--epochs=5", *extra, cache_dir=cache_dir)
        heads = _metrics(workdir)["heads"]
        rows.append({"run": name, "seconds": round(seconds, 1),
                     **{f"{s}_val_auc": round(heads[s]["best_val_auc"], 4) for s in heads}})
    results["mirrored"] = rows
    print(f"\n## mirrored: --stage=heads with extraction, {args.image_size} px")
    for row in rows:
        print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    print(f"  mirrored / one device: {rows[1]['seconds'] / rows[0]['seconds']:.2f}x time")


def section_ftprofile(args, results):
    """One whole-network fine-tuning epoch of scenario B split into input, model and the
    rest: the tf.data input alone, the training step alone on a fixed batch, and fit."""
    from small_photo_classifier.features import backbone, task
    from small_photo_classifier.pipeline import discovery, scan
    from small_photo_classifier.pipeline import input as input_lib
    frame = discovery.discover(args.data_dir).frame
    frame = scan.filter_bad_images(frame, args.image_size, "skip",
                                   os.path.join(tempfile.mkdtemp(), "bad.csv"))
    train = frame.iloc[:args.extract_images]
    steps = -(-len(train) // args.batch_size)
    clf = backbone.build_classifier(args.weights, False, args.image_size, 0, backbone="vgg16")
    clf.set_trainable(["fc", "predictions"], log=False)
    clf.model.compile(optimizer=backbone.make_optimizer("adam", 1e-4),
                      loss=task.binary().loss(), metrics=task.binary().keras_metrics())
    data = input_lib.train_dataset(train.path.tolist(), train.label.tolist(),
                                   train.name.tolist(), args.image_size, args.batch_size,
                                   augment="aggressive").map(input_lib.to_inputs_targets)
    it = iter(data)
    next(it)
    started = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    input_s = time.perf_counter() - started
    x, y = batch
    clf.model.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        clf.model.train_on_batch(x, y)
    model_s = time.perf_counter() - started
    clf.model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)  # trace once
    started = time.perf_counter()
    clf.model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    epoch_s = time.perf_counter() - started
    results["ftprofile"] = {"images": len(train), "steps": steps, "input_s": round(input_s, 1),
                            "model_s": round(model_s, 1), "epoch_s": round(epoch_s, 1)}
    print(f"\n## ftprofile: one fine-tuning epoch of B from images, {len(train)} photos at "
          f"{args.image_size} px, {steps} steps\n  input pipeline alone {input_s:.1f} s, "
          f"training step alone {model_s:.1f} s, fit epoch {epoch_s:.1f} s "
          f"(overlap: {epoch_s / (input_s + model_s):.2f} of input + model)")


SECTIONS = {"limit": section_limit, "extract": section_extract, "heads": section_heads,
            "precision": section_precision, "finetune": section_finetune,
            "ray": section_ray, "mirrored": section_mirrored, "ftprofile": section_ftprofile}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--cache_dir", default=os.path.join(ROOT, "cache"))
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--extract_images", type=int, default=96)
    parser.add_argument("--scenarios", default="A,B,C", help="precision section: scenarios")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--views", type=lambda s: [int(v) for v in s.split(",")],
                        default=[0, 2, 5])
    parser.add_argument("--finetune_epochs", type=int, default=20)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {}
    for name in args.sections.split(","):
        SECTIONS[name.strip()](args, results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
