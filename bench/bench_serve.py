"""serve.py under load on loopback (issue 31): start-up time, agreement with predict.py,
and N concurrent clients x M requests against predict.py's batch throughput.

  python bench/bench_serve.py --workdir=runs/demo --photos=cache/demo_data/test

Starts ``serve.py`` in its own process and times it until ``/api/health`` answers;
posts 5 photos and compares the probabilities with ``predict.py`` (run as a user would,
in another process) on the same files; then ``--clients`` threads each post
``--requests`` single-photo requests (bounded by ``--max_seconds``), and every answer is
checked against that photo's answer alone (its name and probabilities: none lost, none
mixed up). Prints requests per second and p50 / p95 latency, and predict.py's batch
throughput on the same photos in this process (the model already loaded) for scale.
"""

import argparse
import concurrent.futures
import glob
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--photos", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--max_seconds", type=float, default=300)
    args = parser.parse_args()
    import httpx
    import pandas as pd
    photos = sorted(p for p in glob.glob(os.path.join(args.photos, "*"))
                    if p.lower().endswith((".jpg", ".jpeg", ".png")))
    port = _port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "serve.py", f"--workdir={args.workdir}",
                               f"--port={port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        while True:
            try:
                health = httpx.get(f"{url}/api/health", timeout=1).json()
                break
            except httpx.HTTPError:
                if time.perf_counter() - started > 120:
                    sys.exit("serve.py did not answer within 120 s")
                time.sleep(0.1)
        startup = time.perf_counter() - started
        print(f"serve.py answered /api/health {startup:.1f} s after starting "
              f"({health['model']}, {health['backbone']}, {health['image_size']} px)")
        five = photos[:5]
        files = [("files", (os.path.basename(p), open(p, "rb").read())) for p in five]
        served = httpx.post(f"{url}/api/predict", files=files, timeout=120).json()["predictions"]
        with tempfile.TemporaryDirectory() as folder:
            for p in five:
                os.symlink(os.path.abspath(p), os.path.join(folder, os.path.basename(p)))
            out = os.path.join(folder, "p.csv")
            subprocess.run([sys.executable, "predict.py", f"--workdir={args.workdir}",
                            f"--data_dir={folder}", f"--output={out}"], cwd=ROOT, check=True,
                           capture_output=True)
            table = pd.read_csv(out, dtype={"name": str}).set_index("name")
        classes = health["classes"]
        columns = [c for c in table.columns if c not in ("unfamiliar_score", "unfamiliar")]
        diff = max(abs(r["probabilities"][c if len(columns) > 1 else classes[1]]
                       - table.loc[r["name"], c]) for r in served for c in columns)
        print(f"POST /api/predict with 5 photos vs predict.py on the same files: max |dP| "
              f"{diff:.1e} (predict.py's CSV has 6 decimals)")
        alone = {}
        for p in photos:
            body = open(p, "rb").read()
            alone[p] = httpx.post(f"{url}/api/predict", files=[("files", (
                os.path.basename(p), body))], timeout=60).json()["predictions"][0]
        deadline = time.perf_counter() + args.max_seconds

        def client(c):
            latencies, wrong, worst = [], 0, 0.0
            for r in range(args.requests):
                if time.perf_counter() > deadline:
                    break
                p = photos[(c * args.requests + r) % len(photos)]
                t = time.perf_counter()
                got = httpx.post(f"{url}/api/predict", files=[("files", (
                    os.path.basename(p), open(p, "rb").read()))], timeout=120).json()
                latencies.append(time.perf_counter() - t)
                row = got["predictions"][0]
                dp = max(abs(row["probabilities"][k] - v)
                         for k, v in alone[p]["probabilities"].items())
                # Another photo's answer differs by far more than float rounding of a
                # different batch composition (measured: below 1e-5).
                wrong += row["name"] != alone[p]["name"] or dp > 1e-5
                worst = max(worst, dp)
            return latencies, wrong, worst
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(client, range(args.clients)))
        wall = time.perf_counter() - t0
        latencies = np.concatenate([r[0] for r in results])
        wrong = sum(r[1] for r in results)
        worst = max(r[2] for r in results)
        print(f"{args.clients} clients x {args.requests} requests: {len(latencies)} answers, "
              f"{len(latencies) - wrong} correct (max |dP| {worst:.1e} from the photo "
              f"alone), {wrong} wrong or mixed up, "
              f"{args.clients * args.requests - len(latencies)} not sent (time bound); "
              f"{len(latencies) / wall:.1f} requests/s; latency p50 "
              f"{1000 * np.percentile(latencies, 50):.0f} ms, p95 "
              f"{1000 * np.percentile(latencies, 95):.0f} ms")
    finally:
        server.kill()
        server.wait()
    from workflow import console
    console.quiet_tensorflow()
    from workflow import serving
    predictor = serving.Predictor(args.workdir, batch_size=32)
    predictor.predict(photos[:2], ["a", "b"])  # traced once, as the server's first request
    t = time.perf_counter()
    predictor.predict(photos, [os.path.basename(p) for p in photos])
    batch = len(photos) / (time.perf_counter() - t)
    print(f"predict.py's batch path on the same {len(photos)} photos (model loaded): "
          f"{batch:.1f} images/s; the server answered {len(latencies) / wall / batch:.2f}x that "
          "with one photo per request")


if __name__ == "__main__":
    main()
