"""What the benchmark scripts share: running train.py as a user would, reading its metrics."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_measured(cmd, cwd=ROOT, env=None):
    """Runs ``cmd`` to the end; returns (exit status, stdout, stderr, wall seconds, peak
    RSS in MB of that process and the children it waited for: `os.wait4`'s rusage,
    which is this child's own, not the largest of every child this bench ran)."""
    import tempfile
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return child.returncode, out.read(), err.read(), seconds, usage.ru_maxrss / 1024


def run_train(args, workdir, *extra, cache_dir=None, root=ROOT):
    """Runs ``train.py`` (of the checkout at ``root``) on ``args.data_dir`` with the
    pretrained weights; returns (stdout, seconds). Exits with its stderr if it fails."""
    cmd = [sys.executable, os.path.join(root, "train.py"), f"--data_dir={args.data_dir}",
           f"--weights={args.weights}", "--noinclude_top", f"--image_size={args.image_size}",
           f"--workdir={workdir}", f"--cache_dir={cache_dir or args.cache_dir}",
           "--on_bad_image=skip", f"--batch_size={args.batch_size}", *extra]
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return out.stdout, time.perf_counter() - started


def metrics(workdir) -> dict:
    """The run's metrics.json."""
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def photo_parser(doc: str):
    """The arguments of the benchmarks that work on cached features of a photo folder."""
    import argparse
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--weights", default="imagenet",
                        help="weights of a backbone by name (VGG16: the pretrained file)")
    parser.add_argument("--backbone", default="vgg16",
                        help="vgg16, a keras.applications name, or a .keras file")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cache_dir", default=os.path.join(ROOT, "cache"))
    return parser


def cached_photos(data_dir: str, weights: str, image_size: int, cache_dir: str,
                  backbone_name: str = "vgg16"):
    """(dataset, usable frame, task, classifier, cached features of the frame) for the
    photos in ``data_dir``, from the same cache train.py fills (computed on a miss);
    ``backbone_name``: as ``--backbone`` (a file brings its own weights)."""
    sys.path.insert(0, ROOT)
    import tempfile
    from small_photo_classifier.features import backbone, precision, task as task_lib
    from small_photo_classifier.features.store import cache
    from small_photo_classifier.features.weights import weights_identity
    from small_photo_classifier.pipeline import discovery, scan
    precision.resolve_and_apply("auto")  # the policy the features are computed in
    ds = discovery.discover(data_dir)
    frame = scan.filter_bad_images(ds.frame, image_size, "skip",
                                   os.path.join(tempfile.mkdtemp(), "bad.csv"))
    task = task_lib.Task(ds.kind, ds.class_names)
    from small_photo_classifier.features import networks
    choice = networks.check_choice(backbone_name)
    weights = "imagenet" if choice.is_file else weights
    clf = backbone.build_classifier(weights, False, image_size, 0, units=task.units,
                                    activation=task.activation, backbone=choice)
    spec = cache.CacheSpec("in-file" if choice.is_file
                           else weights_identity(weights, 0), False, image_size,
                           "float32", ds.data_dir, precision=clf.computes_in, net=clf.net)
    feats, _ = cache.load(clf, spec, frame, cache_dir, cache.Extraction(32))
    return ds, frame, task, clf, feats
