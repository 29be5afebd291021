"""serve.py under load on loopback: start-up time, agreement with predict.py, and N
concurrent clients x M requests, for this checkout and an earlier revision.

  python bench/bench_serve.py --workdir=runs/demo --photos=cache/demo_data/test \\
      [--before=aa650e6]

For each version (``--before``, from a temporary ``git worktree``, then this checkout),
one after the other: starts ``serve.py`` in its own process and times it until
``/api/health`` answers; posts 5 photos and compares the probabilities with
``predict.py`` (run as a user would, in another process) on the same files; then
``--clients`` threads each post ``--requests`` single-photo requests (bounded by
``--max_seconds``), and every answer is checked against that photo's answer alone (its
name and probabilities: none lost, none mixed up). Prints requests per second and p50 /
p95 latency of each version and their ratio, and the batch throughput of this
checkout's predictor on the same photos in this process (the model loaded) for scale.
"""

import argparse
import concurrent.futures
import glob
import os
import shutil
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


def start(root: str, workdir: str):
    """serve.py of the checkout at ``root`` on a free port: (process, url, seconds until
    /api/health answered, health)."""
    import httpx
    port = _port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "serve.py", f"--workdir={workdir}",
                               f"--port={port}"], cwd=root, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    while True:
        try:
            health = httpx.get(f"{url}/api/health", timeout=1).json()
            return server, url, time.perf_counter() - started, health
        except httpx.HTTPError:
            if time.perf_counter() - started > 120:
                server.kill()
                sys.exit("serve.py did not answer within 120 s")
            time.sleep(0.1)


def agreement(url: str, root: str, workdir: str, photos, classes) -> float:
    """Max |dP| between POST /api/predict with 5 photos and predict.py on the same files."""
    import httpx
    import pandas as pd
    five = photos[:5]
    files = [("files", (os.path.basename(p), open(p, "rb").read())) for p in five]
    served = httpx.post(f"{url}/api/predict", files=files, timeout=120).json()["predictions"]
    with tempfile.TemporaryDirectory() as folder:
        for p in five:
            os.symlink(os.path.abspath(p), os.path.join(folder, os.path.basename(p)))
        out = os.path.join(folder, "p.csv")
        subprocess.run([sys.executable, "predict.py", f"--workdir={workdir}",
                        f"--data_dir={folder}", f"--output={out}"], cwd=root, check=True,
                       capture_output=True)
        table = pd.read_csv(out, dtype={"name": str}).set_index("name")
    columns = [c for c in table.columns if c not in ("unfamiliar_score", "unfamiliar")]
    return max(abs(r["probabilities"][c if len(columns) > 1 else classes[1]]
                   - table.loc[r["name"], c]) for r in served for c in columns)


def load(url: str, photos, clients: int, requests: int, max_seconds: float) -> dict:
    """``clients`` threads x ``requests`` single-photo requests, each answer checked
    against the photo's answer alone."""
    import httpx

    def post(p):
        return httpx.post(f"{url}/api/predict", files=[("files", (
            os.path.basename(p), open(p, "rb").read()))], timeout=120).json()
    alone = {p: post(p)["predictions"][0] for p in photos}
    deadline = time.perf_counter() + max_seconds

    def client(c):
        latencies, wrong, worst = [], 0, 0.0
        for r in range(requests):
            if time.perf_counter() > deadline:
                break
            p = photos[(c * requests + r) % len(photos)]
            t = time.perf_counter()
            row = post(p)["predictions"][0]
            latencies.append(time.perf_counter() - t)
            dp = max(abs(row["probabilities"][k] - v)
                     for k, v in alone[p]["probabilities"].items())
            # Another photo's answer differs by far more than float rounding of a
            # different batch composition (measured: below 1e-5).
            wrong += row["name"] != alone[p]["name"] or dp > 1e-5
            worst = max(worst, dp)
        return latencies, wrong, worst
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    latencies = np.concatenate([r[0] for r in results])
    return {"answers": len(latencies), "wrong": sum(r[1] for r in results),
            "worst": max(r[2] for r in results), "rps": len(latencies) / wall,
            "p50": 1000 * np.percentile(latencies, 50), "p95": 1000 * np.percentile(latencies, 95),
            "asked": clients * requests}


def version(label: str, root: str, args, photos) -> dict:
    """One version's start-up, agreement and load, printed."""
    server, url, startup, health = start(root, args.workdir)
    try:
        diff = agreement(url, root, args.workdir, photos, health["classes"])
        got = load(url, photos, args.clients, args.requests, args.max_seconds)
    finally:
        server.kill()
        server.wait()
    print(f"{label}: serve.py answered /api/health {startup:.1f} s after starting "
          f"({health['model']}, {health['backbone']}, {health['image_size']} px); 5 photos "
          f"vs predict.py: max |dP| {diff:.1e} (its CSV has 6 decimals); {args.clients} "
          f"clients x {args.requests} requests: {got['answers']} answers, {got['wrong']} "
          f"wrong or mixed up (max |dP| {got['worst']:.1e} from the photo alone), "
          f"{got['asked'] - got['answers']} not sent (time bound); {got['rps']:.1f} "
          f"requests/s; latency p50 {got['p50']:.0f} ms, p95 {got['p95']:.0f} ms", flush=True)
    return got


def batch_rate(workdir: str, photos) -> float:
    """Images per second of this checkout's predictor on the photos, model loaded."""
    from workflow.base import console
    console.quiet_tensorflow()
    from workflow.use import serving
    predictor = serving.Predictor(workdir, batch_size=32)
    uploads = [(os.path.basename(p), open(p, "rb").read()) for p in photos]
    config = serving.ServeConfig(max_files=len(uploads))
    predictor.predict(serving.prepare_uploads(uploads[:2], config, predictor.image_size))
    t = time.perf_counter()
    predictor.predict(serving.prepare_uploads(uploads, config, predictor.image_size))
    return len(photos) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--photos", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--max_seconds", type=float, default=300)
    parser.add_argument("--before", default=None,
                        help="git revision to compare with (e.g. aa650e6), run first")
    args = parser.parse_args()
    args.workdir = os.path.abspath(args.workdir)
    photos = sorted(os.path.abspath(p) for p in glob.glob(os.path.join(args.photos, "*"))
                    if p.lower().endswith((".jpg", ".jpeg", ".png")))
    results, tree = {}, None
    try:
        if args.before:
            tree = tempfile.mkdtemp(prefix="bench-serve-before-")
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree,
                            args.before], check=True, capture_output=True)
            results["before"] = version(f"before ({args.before})", tree, args, photos)
        results["after"] = version("after (this checkout)", ROOT, args, photos)
    finally:
        if tree:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree],
                           capture_output=True)
            shutil.rmtree(tree, ignore_errors=True)
    if "before" in results:
        ratio = results["after"]["rps"] / results["before"]["rps"]
        print(f"requests/s after / before: {ratio:.2f}")
    rate = batch_rate(args.workdir, photos)
    print(f"the predictor's batch path on the same {len(photos)} photos (model loaded): "
          f"{rate:.1f} images/s; the server answered {results['after']['rps'] / rate:.2f}x "
          "that with one photo per request")


if __name__ == "__main__":
    main()
