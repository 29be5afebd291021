"""The demo with deployment exports for every named backbone, in one precision.

Runs ``python train.py --demo --backbone=NAME --weights=none --export=onnx,tflite
--precision=PRECISION`` for each backbone in a fresh process (a user's command, nothing
shared between backbones) and prints, per backbone: the exit status, the whole run's
seconds and peak memory (RSS of the child, `os.wait4`), each format's max |dP|
against predict.py from ``metrics.json``, and whether the console showed a traceback.
``--precision=mixed_bfloat16`` is the one to check on any CPU: it is what ``auto``
picks on AVX512-BF16/AMX machines, and a float32-only machine runs it emulated.

  python bench/bench_exports.py --precision=mixed_bfloat16
"""

import argparse
import json
import os
import sys
import tempfile

import common

sys.path.insert(0, common.ROOT)


def run_one(name: str, precision: str, formats: str, folder: str) -> dict:
    """One demo run with exports; what it printed and recorded."""
    workdir = os.path.join(folder, name)
    cmd = [sys.executable, os.path.join(common.ROOT, "train.py"), "--demo",
           f"--backbone={name}", "--weights=none", f"--export={formats}",
           f"--precision={precision}", f"--workdir={workdir}",
           f"--cache_dir={os.path.join(folder, 'cache')}"]
    status, stdout, stderr, seconds, peak_mb = common.run_measured(cmd)
    exports = {}
    metrics = os.path.join(workdir, "metrics.json")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as f:
            exports = json.load(f).get("exports", {})
    return {"backbone": name, "status": status, "seconds": seconds, "peak_mb": peak_mb,
            "traceback": "Traceback" in stdout + stderr,
            "max_abs_dp": {k: v.get("max_abs_dp", v.get("error")) for k, v in exports.items()
                           if isinstance(v, dict)},
            "error": stderr.strip().splitlines()[-1] if status else ""}


def main() -> None:
    from small_photo_classifier.features import networks
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="mixed_bfloat16")
    parser.add_argument("--formats", default="onnx,tflite")
    parser.add_argument("--backbones", default=",".join(["vgg16", *networks.NAMED]))
    args = parser.parse_args()
    print(f"demo --weights=none --export={args.formats} --precision={args.precision}")
    print(f"{'backbone':<18} {'exit':>4} {'seconds':>8} {'peak MB':>8} traceback  max |dP|")
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name in args.backbones.split(","):
            r = run_one(name, args.precision, args.formats, folder)
            dps = ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k}: {v}"
                            for k, v in r["max_abs_dp"].items())
            print(f"{name:<18} {r['status']:>4} {r['seconds']:>8.0f} {r['peak_mb']:>8.0f} "
                  f"{'yes' if r['traceback'] else 'no':<10} {dps} {r['error']}", flush=True)
            worst = max([worst] + [v for v in r["max_abs_dp"].values()
                                   if isinstance(v, float)])
    print(f"largest max |dP| of any format: {worst:.1e}")


if __name__ == "__main__":
    main()
