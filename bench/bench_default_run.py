"""The default training job, timed whole, on this checkout and on an earlier revision.

    W=$(python ../shared/tools/vgg16_pretrained.py)
    python bench/bench_default_run.py --data_dir=../shared/data/hymenoptera/train \
        --weights="$W" [--before=aa650e6] [--extra=--finetune_epochs=5] \
        [--after_variant= --after_variant=--noprobe_baseline]
    L=$(python ../shared/tools/efficientnet_lite_pretrained.py)
    python bench/bench_default_run.py --data_dir=../shared/data/flowers12/train --backbone="$L"

Each version runs ``train.py --data_dir=... --weights=W --noinclude_top`` (VGG16) or
``--backbone=FILE`` (plus ``--extra``) as a user would, in a fresh process with its own
empty cache folder, one after the other on the same machine, each from a temporary
``git worktree`` of its revision (``--after`` defaults to HEAD). Printed per version:
wall seconds, peak memory (RSS of the train.py process, `os.wait4`), each scenario's CV
score and chosen epoch, the scenario chosen, the final model's validation score, the
seconds and peak memory of every stage when the version records them, and the ratios.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import common


# Log lines both versions write, in the order they come: where the time goes.
MILESTONES = (("extraction", "Extracting "), ("probe", "Linear probe"),
              ("heads A", "Scenario A: val"), ("heads B", "Scenario B: val"),
              ("heads C", "Scenario C: val"), ("bag members", "Bag: "),
              ("views extracted", "augmented view"), ("fine-tuning start", "Before fine-tuning"),
              ("bag exported", "Bag of "))


def _stamps(log: str):
    """(time, message) of every log line, in either format train.log has had:
    ``2026-11-29 20:24:27,123 INFO message`` (before issue 21) or absl's
    ``I1129 20:24:27.123456 140 file.py:12] message``."""
    out = []
    for m in re.finditer(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) \w+ (.*)$", log, re.M):
        out.append((datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), m.group(2)))
    for m in re.finditer(r"^[IWEF](\d{4}) (\d\d:\d\d:\d\d\.\d+) +\d+ \S+\] (.*)$", log, re.M):
        out.append((datetime.datetime.strptime(f"2000{m.group(1)} {m.group(2)}",
                                               "%Y%m%d %H:%M:%S.%f"), m.group(3)))
    return out


def milestones(log: str) -> dict:
    """Seconds from the first line of train.log to the first line of each milestone."""
    stamps = _stamps(log)
    if not stamps:
        return {}
    start = stamps[0][0]
    out = {}
    for name, text in MILESTONES:
        hit = next((t for t, line in stamps if text in line), None)
        if hit is not None:
            out[name] = round((hit - start).total_seconds(), 1)
    out["last line"] = round((stamps[-1][0] - start).total_seconds(), 1)
    return out


def warm_file_cache(*roots: str) -> None:
    """Reads every file under ``roots`` once, so that neither version pays for a cold
    disk (the first run would otherwise read the photos and weights from disk, the
    second from the page cache)."""
    for root in roots:
        paths = [root] if os.path.isfile(root) else [
            os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
        for path in paths:
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass


def run(root: str, args, label: str, variant: str = "") -> dict:
    work = tempfile.mkdtemp(prefix=f"bench-default-{label}-")
    backbone = ([f"--weights={args.weights}", "--noinclude_top"] if args.backbone == "vgg16"
                else [f"--backbone={args.backbone}"])
    cmd = [sys.executable, os.path.join(root, "train.py"), f"--data_dir={args.data_dir}",
           *backbone, f"--workdir={work}/run",
           f"--cache_dir={work}/cache", "--on_bad_image=skip", *args.extra, *variant.split()]
    status, _, stderr, seconds, peak_mb = common.run_measured(cmd, cwd=root)
    if status:
        sys.exit(f"{label}: {' '.join(cmd)} failed:\n{stderr[-3000:]}")
    metrics = common.metrics(os.path.join(work, "run"))
    cv = metrics.get("cross_validation", {})
    with open(os.path.join(work, "run", "model_info.json"), encoding="utf-8") as f:
        kind = json.load(f).get("task", "binary")
    headline = {"binary": "auc", "multiclass": "accuracy", "multilabel": "map"}[kind]
    row = {"seconds": round(seconds, 1), "peak_mb": round(peak_mb),
           "stages": metrics.get("timings", {}),
           "cv": {s: (round(c.get(f"{headline}_mean", float("nan")), 4), c.get("epoch"))
                  for s, c in cv.items()},
           "probe_cv": metrics.get("probe", {}).get(f"cv_{headline}_mean"),
           "chosen": metrics.get("heads_choice", {}).get("scenario"),
           "exported": metrics.get("export", {}).get("model"),
           # The exported model (before any refit) on the held-out validation images.
           "final_val": metrics.get("final", {}).get(f"val_{headline}"),
           "final_model": metrics.get("final", {}).get("model"),
           "finetune_epochs_run": metrics.get("finetune", {}).get("epochs_run"),
           "bag_val_auc": metrics.get("bag", {}).get("val_auc"),
           "milestones_s": milestones(open(os.path.join(work, "run", "train.log"),
                                           encoding="utf-8").read())}
    if args.keep:
        print(f"{label}: run folder kept in {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--weights", default="imagenet",
                        help="VGG16's weights (the pretrained file)")
    parser.add_argument("--backbone", default="vgg16",
                        help="vgg16 or a backbone file (its own weights)")
    parser.add_argument("--before", default="aa650e6",
                        help="git revision to compare with (default: main before issue 39)")
    parser.add_argument("--after", default="HEAD", help="git revision to measure (committed "
                        "code only, so that edits made while it runs cannot reach it)")
    parser.add_argument("--extra", action="append", default=[],
                        help="a further train.py flag for both runs (repeatable)")
    parser.add_argument("--after_variant", action="append", default=None,
                        help="flags for one run of --after only (repeatable: one run each; "
                        "'' is the plain run), e.g. --noprobe_baseline to keep the choice "
                        "rule of a revision older than issue 27")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--keep", action="store_true",
                        help="keep each version's run and cache folders (printed) to read its train.log")
    args = parser.parse_args()
    args.data_dir = os.path.abspath(args.data_dir)
    if args.backbone == "vgg16":
        args.weights = os.path.abspath(args.weights)
    else:
        args.backbone = os.path.abspath(args.backbone)
    trees = {}
    try:
        for label, rev in (("before", args.before), ("after", args.after)):
            trees[label] = tempfile.mkdtemp(prefix=f"bench-{label}-")
            subprocess.run(["git", "-C", common.ROOT, "worktree", "add", "--detach",
                            trees[label], rev], check=True, capture_output=True)
        warm_file_cache(args.data_dir, args.weights if args.backbone == "vgg16"
                        else args.backbone)
        results = {}
        runs = [("before", args.before, "")] + [("after", args.after, v)
                                                for v in args.after_variant or [""]]
        for label, rev, variant in runs:
            name = f"{label} ({rev}{' ' + variant if variant else ''})"
            results[name] = run(trees[label], args, label, variant)
            print(f"{name}: {results[name]}", flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", common.ROOT, "worktree", "remove", "--force", tree],
                           capture_output=True)
    _report(args, results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


def _report(args, results: dict) -> None:
    """Each version's line and stages, then the ratios to the first (before)."""
    what = ("--weights=W --noinclude_top" if args.backbone == "vgg16"
            else f"--backbone={os.path.basename(args.backbone)}")
    print(f"\n## default run on {args.data_dir}: train.py {what} {' '.join(args.extra)}")
    for label, row in results.items():
        print(f"  {label:20s} {row['seconds']:7.1f} s  peak {row['peak_mb']} MB  CV "
              f"{row['cv']}  probe CV {row['probe_cv']}  chosen {row['chosen']}  exported "
              f"{row['exported']}  final val {row['final_val']}  bag {row['bag_val_auc']}  "
              f"fine-tuning epochs {row['finetune_epochs_run']}")
        print(f"  {'':20s} seconds from the first log line: {row['milestones_s']}")
        if row["stages"]:
            print(f"  {'':20s} stages: {row['stages']}")
    before = next(iter(results.values()))
    for name, after in list(results.items())[1:]:
        print(f"  {name} / before: time {after['seconds'] / before['seconds']:.2f} "
              f"({before['seconds'] / after['seconds']:.2f}x faster), peak memory "
              f"{after['peak_mb'] / before['peak_mb']:.2f} ({after['peak_mb']} vs "
              f"{before['peak_mb']} MB)")


if __name__ == "__main__":
    main()
