"""Transfer quality on real photos: scenarios, probe, sweep, final model, bag, TTA.

Meant for ImageNet-derived weights (see ../shared/data/README.md); random weights
say nothing about transfer. Prints, in one run:

  1. per scenario, 5-fold CV AUC (mean +- std at the CV-chosen epoch) on the
     training split with the scenario table's learning rate, and with the old
     single rate 1e-3 (which made C collapse), beside the linear probe;
  2. train.py end to end with default flags (plus --finetune_epochs): the heads,
     the probe, the fine-tuned final model and the bag on the held-out split;
  3. the held-out split scored by model.keras and bag.keras, with and without TTA;
  4. optionally (--sweep) train.py --stage=sweep and its best configuration.

  W=$(python ../shared/tools/vgg16_pretrained.py)
  python bench/bench_quality.py --data_dir=../shared/data/hymenoptera/train --weights="$W"
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import common
import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere without installing
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _train(args, workdir, *extra):
    return common.run_train(args, workdir, *extra)


def _data(args):
    """(task, classifier, train split's features and labels) with the plain cache filled."""
    from small_photo_classifier.features import backbone, precision, task as task_lib
    from small_photo_classifier.features.store import cache
    from small_photo_classifier.features.weights import weights_identity
    from small_photo_classifier.pipeline import discovery, scan, split
    chosen = precision.resolve_and_apply("auto")  # what train.py would compute in here
    ds = discovery.discover(args.data_dir)
    task = task_lib.Task(ds.kind, ds.class_names)
    frame = scan.filter_bad_images(ds.frame, args.image_size, "skip",
                                   os.path.join(tempfile.mkdtemp(), "bad.csv"))
    train, _ = split.split_train_val(frame, 0.2, 0)
    clf = backbone.build_classifier(args.weights, False, args.image_size, 0, units=task.units,
                                    activation=task.activation, backbone="vgg16")
    spec = cache.CacheSpec(weights_identity(args.weights, 0), False, args.image_size,
                           "float32", ds.data_dir,
                           precision=chosen.policy, net=clf.net)
    path = cache.ensure_features(clf, spec, frame, args.cache_dir,
                                 cache.Extraction(args.batch_size)).path
    y = np.asarray(train.label.tolist())
    return task, clf, cache.load_features(path, spec, train, spec.layers), y


def _pm(mean, std) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def scenario_cv(args):
    """Section 1: CV of A, B, C at the table's rates and at 1e-3, on the training split;
    the task's headline metric and, beside it, macro ROC AUC (accuracy for binary)."""
    from small_photo_classifier.features.choose import cv as cv_lib, probe
    from small_photo_classifier.features.fit import heads
    from small_photo_classifier.features import scenarios
    from small_photo_classifier.features.fit.settings import FitSettings
    task, clf, feats, y = _data(args)
    name = task.headline
    other = "auc" if name != "auc" else "accuracy"
    folds = cv_lib.make_folds(y, 5, 0, task)
    p = probe.choose(feats["block5_pool"], y, task, folds)
    print(f"\n## 1. 5-fold CV on the training split ({len(y)} images, {task.describe()}, "
          f"{args.image_size} px, {args.epochs} epochs)\n")
    print(f"| head | learning rate | CV {name} at chosen epoch | CV {other} | epoch | "
          f"{name} per epoch (mean) | s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| linear probe | {p.config.describe()} (best of {p.tried} by CV) | "
          f"{_pm(p.mean, p.std)} | | | | |")
    for s in args.scenarios.split(","):
        row = scenarios.get_scenario(s)
        rates = {row.learning_rate} if args.table_rates_only else {row.learning_rate, 1e-3}
        for lr in sorted(rates, reverse=True):
            started = time.perf_counter()
            with heads.HeadConfig(s, lr).trainer(clf, task) as trainer:
                start = row.start_layer(False, clf.net)
                result = cv_lib.cross_validate(trainer, feats[start], y, folds,
                                               FitSettings(args.epochs, args.batch_size))
            cv = result.summary()
            at = cv["other_metrics_at_epoch"].get(other, {"mean": np.nan, "std": np.nan})
            tag = " (table default)" if lr == row.learning_rate else ""
            print(f"| {s} | {lr:g}{tag} | {_pm(cv[f'{name}_mean'], cv[f'{name}_std'])} | "
                  f"{_pm(at['mean'], at['std'])} | {cv['epoch']} | "
                  f"{' '.join(f'{m:.3f}' for m in cv[f'mean_{name}_per_epoch'])} | "
                  f"{time.perf_counter() - started:.0f} |", flush=True)


def end_to_end(args):
    """Sections 2 and 3: train.py with defaults, then model vs bag, TTA, on held-out images."""
    import pandas as pd
    from small_photo_classifier.features.serve import inference
    workdir = os.path.join(args.work, "e2e")
    if args.reuse and os.path.isfile(os.path.join(workdir, "model.keras")):
        # An earlier run's folder: its train.log holds every line the run printed.
        stdout = open(os.path.join(workdir, "train.log"), encoding="utf-8").read()
        seconds = json.load(open(os.path.join(workdir, "metrics.json"))).get(
            "timings", {}).get("total", float("nan"))
    else:
        stdout, seconds = _train(args, workdir, f"--finetune_epochs={args.finetune_epochs}")
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    print(f"\n## 2. train.py, default flags + --finetune_epochs={args.finetune_epochs} "
          f"({seconds:.0f} s)\n")
    print("```\n" + "\n".join(line for line in stdout.splitlines() if line.startswith(
        ("scenario", "linear probe", "best scenario", "final model", "most confused")))
        + "\n```")
    model, info = inference.load_exported(workdir)
    task = inference.task_of(info)
    split_csv = pd.read_csv(os.path.join(workdir, "split.csv"), dtype={"name": str})
    val = split_csv[split_csv.subset == "val"]
    index = {n: i for i, n in enumerate(task.class_names)}
    y = (val.label.to_numpy() if task.kind == "binary" else
         np.array([index[v] for v in val.label]))
    name = task.headline
    print(f"\n## 3. Held-out split ({len(val)} images): single model vs bag, TTA ({name})\n")
    print(f"| model | tta=1 {name} | tta=2 {name} | tta=4 {name} |")
    print("|---|---|---|---|")
    for bag in (False, True):
        if bag and not os.path.isfile(os.path.join(workdir, inference.BAG_FILE)):
            continue
        model, _ = inference.load_exported(workdir, bag=bag)
        row = []
        for tta in (1, 2, 4):
            probs = task.probabilities(inference.predict_paths(
                model, val.path.tolist(), val.name.tolist(), args.image_size,
                args.batch_size, tta, progress=False))
            row.append(task.scores(y, probs)[name])
        label = (f"bag.keras ({metrics['bag']['members']} members)" if bag
                 else f"model.keras (scenario {metrics['finetune']['scenario']})")
        print(f"| {label} | " + " | ".join(f"{a:.4f}" for a in row) + " |", flush=True)
    print(f"| linear probe (same split) | {metrics['probe'][f'val_{name}']:.4f} | | |")


def _split_folders(args, seed: int, root: str):
    """Links the photos into ``root/dev/<class>/`` (80%) and ``root/held/<class>/`` (20%),
    stratified by ``seed``; the same dev path for every seed, so the cache's rows are
    shared between splits."""
    from small_photo_classifier.pipeline import discovery, split
    ds = discovery.discover(args.data_dir)
    frame = ds.frame[[os.path.splitext(p)[1].lower() != ".gif" for p in ds.frame.path]]
    dev, held = split.split_train_val(frame, 0.2, seed)
    for part, rows in (("dev", dev), ("held", held)):
        shutil.rmtree(os.path.join(root, part), ignore_errors=True)
        for row in rows.itertuples():
            folder = os.path.join(root, part, ds.class_names[int(row.label)])
            os.makedirs(folder, exist_ok=True)
            os.symlink(row.path, os.path.join(folder, os.path.basename(row.path)))
    index = {n: i for i, n in enumerate(ds.class_names)}
    return held.path.tolist(), np.asarray(held.label.tolist()), index


def _splits(args, root):
    """Per repeated split: (seed, held-out paths, their labels, their names)."""
    for seed in range(args.splits):
        held_paths, y, _ = _split_folders(args, seed, root)
        yield seed, held_paths, y, [os.path.basename(p) for p in held_paths]


def _train_on_split(args, root, name, *extra):
    """train.py on the split's dev folder (default flags plus ``extra``); returns
    (workdir, seconds, model_info, task)."""
    from small_photo_classifier.features.serve import inference
    workdir = os.path.join(root, name)
    _, seconds = _train(args, workdir, f"--finetune_epochs={args.finetune_epochs}", *extra,
                        f"--data_dir={os.path.join(root, 'dev')}",
                        f"--cache_dir={os.path.join(root, 'cache')}")
    info = inference.read_info(workdir)
    return workdir, seconds, info, inference.task_of(info)


def repeated_splits(args):
    """Section 5: repeated 80/20 splits; the held-out 20% is never seen by training, CV or
    any choice. Per split, train.py runs twice (--norefit and --refit, default flags
    otherwise) and every candidate output is scored on the held-out photos."""
    from small_photo_classifier.features.serve import inference
    root = os.path.join(args.work, "splits")
    rows = []
    for seed, held_paths, y, names in _splits(args, root):
        row = {"split": seed}
        for refit in (False, True):
            workdir, seconds, info, task = _train_on_split(
                args, root, f"run{seed}_{'refit' if refit else 'norefit'}",
                "--refit" if refit else "--norefit")
            tag = "refit" if refit else "single"
            row[f"{tag} seconds"] = round(seconds)
            for bag in (False, True):
                if bag and not os.path.isfile(os.path.join(workdir, inference.BAG_FILE)):
                    continue
                model, _ = inference.load_exported(workdir, bag=bag)
                for tta in (1, 2):
                    probs = task.probabilities(inference.predict_paths(
                        model, held_paths, names, args.image_size, args.batch_size, tta,
                        progress=False))
                    row[f"{'bag' if bag else 'model'}{'+refit' if refit else ''} tta{tta}"] = \
                        task.scores(y, probs)[task.headline]
            default = ("bag" if info.get("default_model") == "bag" else "model") + \
                ("+refit" if refit else "") + f" tta{info.get('tta', 1)}"
            row[f"default ({tag} run)"] = row.get(default, np.nan)
            row[f"default ({tag} run) is"] = default if info.get("scenario") != "probe" \
                else "probe" + default[5:]
        rows.append(row)
        print(f"split {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else
                                            f"{k} {v}" for k, v in row.items()), flush=True)
    table = pd.DataFrame(rows)
    numeric = [c for c in table.columns if table[c].dtype.kind == "f"]
    print(f"\n## 5. {args.splits} repeated 80/20 splits, held-out {task.headline} "
          f"(mean ± std)\n")
    print("| output | held-out | |\n|---|---|---|")
    for c in numeric:
        print(f"| {c} | {table[c].mean():.4f} ± {table[c].std(ddof=0):.4f} | |")
    for c in [c for c in table.columns if c.endswith(" is")]:
        print(f"| {c} | {', '.join(table[c])} | |")
    return table


def baseline_rule(args):
    """Section 6: which model the heads stage should keep as the baseline. Per repeated
    80/20 split, train.py runs with default flags (the probe is the baseline: a scenario
    is fine-tuned and exported only when it beats the probe beyond noise on out-of-fold
    predictions) and with --noprobe_baseline (the best scenario is kept unless the probe
    beats it beyond noise); each run's exported default is scored on the held-out photos
    that no training or choice saw."""
    from small_photo_classifier.features.serve import inference
    root = os.path.join(args.work, "rule")
    rows = []
    for seed, held_paths, y, names in _splits(args, root):
        row = {"split": seed}
        for tag, extra in (("probe baseline", "--probe_baseline"),
                           ("scenario baseline", "--noprobe_baseline")):
            workdir, seconds, info, task = _train_on_split(
                args, root, f"run{seed}_{tag.split()[0]}", extra)
            model, _ = inference.load_exported(workdir, bag=info.get("default_model") == "bag")
            probs = task.probabilities(inference.predict_paths(
                model, held_paths, names, args.image_size, args.batch_size,
                int(info.get("tta", 1)), progress=False))
            row[f"{tag}"] = task.scores(y, probs)[task.headline]
            row[f"{tag} seconds"] = float(round(seconds))
            row[f"{tag} exports"] = info.get("scenario")
        rows.append(row)
        print(f"split {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else
                                            f"{k} {v}" for k, v in row.items()), flush=True)
    table = pd.DataFrame(rows)
    diff = table["probe baseline"] - table["scenario baseline"]
    print(f"\n## 6. The heads stage's baseline, {args.splits} repeated 80/20 splits, held-out "
          f"{task.headline} of the exported default\n")
    print("| rule | held-out (mean ± std) | seconds per run | exported |\n|---|---|---|---|")
    for tag in ("probe baseline", "scenario baseline"):
        print(f"| {tag} | {table[tag].mean():.4f} ± {table[tag].std(ddof=0):.4f} | "
              f"{table[tag + ' seconds'].mean():.0f} | {', '.join(table[tag + ' exports'])} |")
    print(f"\npaired difference (probe baseline - scenario baseline): {diff.mean():+.4f} ± "
          f"{diff.std(ddof=0):.4f}, better on {int((diff > 0).sum())}/{len(diff)}, "
          f"worse on {int((diff < 0).sum())}/{len(diff)}")
    return table


def sweep(args):
    """Section 4: the default sweep grid through train.py."""
    import pandas as pd
    workdir = os.path.join(args.work, "sweep")
    stdout, seconds = _train(args, workdir, "--stage=sweep")
    table = pd.read_csv(os.path.join(workdir, "sweep.csv"))
    print(f"\n## 4. train.py --stage=sweep, default grid ({len(table)} configurations, "
          f"{seconds:.0f} s)\n")
    print("```\n" + table.head(8).drop(columns=["fold_aucs"]).to_string(index=False) + "\n```")
    print("\n" + [line for line in stdout.splitlines() if line.startswith("Sweep:")][0])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--weights", required=True, help="VGG16 conv-base weights file")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--scenarios", default="A,B,C")
    p.add_argument("--finetune_epochs", type=int, default=3)
    p.add_argument("--sections", default="cv,e2e,sweep",
                   help="cv, e2e, sweep, splits (repeated held-out splits), rule (the heads "
                   "stage's baseline: probe or scenario, on repeated held-out splits)")
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--cache_dir", default=os.path.join(ROOT, "cache"))
    p.add_argument("--work", default=None)
    p.add_argument("--table_rates_only", action="store_true",
                   help="cv: each scenario at its table rate only (not also at 1e-3)")
    p.add_argument("--reuse", action="store_true", help="e2e: score the run already in "
                   "--work/e2e instead of training again")
    args = p.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="bench_quality_")
    sections = args.sections.split(",")
    print(f"# bench_quality: {args.data_dir}, {args.image_size} px, weights "
          f"{os.path.basename(args.weights)}; work folder {args.work}")
    if "cv" in sections:
        scenario_cv(args)
    if "e2e" in sections:
        end_to_end(args)
    if "sweep" in sections:
        sweep(args)
    if "splits" in sections:
        repeated_splits(args)
    if "rule" in sections:
        baseline_rule(args)


if __name__ == "__main__":
    main()
