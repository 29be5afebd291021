"""What the benchmark scripts share: running train.py as a user would, reading its metrics."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
