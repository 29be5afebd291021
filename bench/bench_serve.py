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

``--large_seconds=60`` adds the memory bound under many clients (issue 50): made-up
20-megapixel PNGs (and every tenth request a 90-megapixel one, both under the upload
limit), posted by ``--clients`` threads for that long; every answer must be 200, or 503
with ``Retry-After``; the server's peak RSS (the kernel's high-water mark, VmHWM) after
start-up and one photo, and after the load, and their difference.
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


def _png(path: str, width: int, height: int) -> str:
    """A smooth RGB PNG (it compresses to a few MB), written a row at a time."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    packer, parts = zlib.compressobj(6), []
    ramp = (np.arange(width) * 255 // max(1, width - 1)).astype(np.uint8)
    for y in range(height):
        row = np.stack([ramp, np.full(width, y * 255 // max(1, height - 1), np.uint8),
                        ramp[::-1]], axis=1)
        parts.append(packer.compress(b"\0" + row.tobytes()))
    parts.append(packer.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8,
                                                                   2, 0, 0, 0))
                + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def _peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def large_load(url: str, pid: int, clients: int, seconds: float) -> dict:
    """``clients`` threads posting large PNGs for ``seconds``: the answers by status,
    whether every 503 had Retry-After, and the server's peak RSS before and after."""
    import collections
    import httpx
    folder = tempfile.mkdtemp(prefix="bench-serve-large-")
    try:
        twenty = open(_png(os.path.join(folder, "p20mp.png"), 5000, 4000), "rb").read()
        ninety = open(_png(os.path.join(folder, "p90mp.png"), 10000, 9000), "rb").read()
        idle = _peak_mb(pid)
        counts, no_retry = collections.Counter(), 0
        deadline = time.perf_counter() + seconds

        def client(c):
            nonlocal no_retry
            n = 0
            while time.perf_counter() < deadline:
                big = n % 10 == 9
                answer = httpx.post(f"{url}/api/predict", files=[("files", (
                    "p90mp.png" if big else "p20mp.png", ninety if big else twenty))],
                    timeout=300)
                counts[answer.status_code] += 1
                no_retry += answer.status_code == 503 and "retry-after" not in answer.headers
                n += 1
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        return {"idle_peak_mb": idle, "peak_mb": _peak_mb(pid), "counts": dict(counts),
                "no_retry_after": no_retry, "sizes_mb": (len(twenty) / 1e6, len(ninety) / 1e6)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def version(label: str, root: str, args, photos) -> dict:
    """One version's start-up, agreement and load, printed."""
    server, url, startup, health = start(root, args.workdir)
    try:
        diff = agreement(url, root, args.workdir, photos, health["classes"])
        got = load(url, photos, args.clients, args.requests, args.max_seconds)
        if args.large_seconds > 0:
            large = large_load(url, server.pid, args.clients, args.large_seconds)
            print(f"{label}: {args.clients} clients x {args.large_seconds:g} s of 20-megapixel "
                  f"PNGs ({large['sizes_mb'][0]:.1f} MB; every tenth a 90-megapixel one, "
                  f"{large['sizes_mb'][1]:.1f} MB): answers by status {large['counts']}, "
                  f"503 without Retry-After: {large['no_retry_after']}; server peak RSS "
                  f"{large['idle_peak_mb']:.0f} MB idle -> {large['peak_mb']:.0f} MB "
                  f"(+{large['peak_mb'] - large['idle_peak_mb']:.0f} MB)", flush=True)
            got["large"] = large
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
    from small_photo_classifier.workflow.base import console
    console.quiet_tensorflow()
    from small_photo_classifier.workflow.use import serving
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
    parser.add_argument("--large_seconds", type=float, default=0,
                        help="also post large PNGs for this long (the memory bound)")
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
