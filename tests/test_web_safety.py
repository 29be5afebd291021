"""Issue 41: serve.py refuses other sites and other host names, bounds requests while they
stream, never leaks an error's text; no photo anywhere (training folder, predict.py
folder, upload) can exhaust memory."""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pandas as pd
import pytest

from tests.conftest import predict_in_process, write_image
from tests.test_serve import ROOT, SIZE, _client, _free_port, _lists, _reviewed

from fastapi.testclient import TestClient  # the test extra installs the serve extra


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A run folder with a model and a label queue, and a loaded predictor."""
    from tests.conftest import trusted_run
    from small_photo_classifier.workflow.use import server_app, serving
    run, photos = trusted_run(tmp_path_factory.mktemp("safe"), SIZE, {"layout": "kaggle"})
    _lists(run, photos)
    return run, photos, serving.Predictor(str(run)), server_app


def _bomb_png(path, side: int = 20000):
    """A valid PNG of side x side black pixels: 1.2 MB on disk, 1.2 GB decoded (4.8 GB as
    float32), written a row at a time so that making it costs no memory."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    packer, row, parts = zlib.compressobj(9), b"\0" * (1 + 3 * side), []
    for _ in range(side):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8,
                                                                   2, 0, 0, 0))
                + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return str(path)


@pytest.fixture(scope="session")
def bomb(tmp_path_factory):
    return _bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


def _rss_mb(pid="self") -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024


class PeakRSS:
    """The largest RSS of process ``pid`` seen while the block runs (sampled every 10 ms)."""

    def __init__(self, pid="self"):
        self.pid, self.peak, self.baseline, self._on = pid, 0.0, 0.0, False

    def _watch(self):
        while self._on:
            self.peak = max(self.peak, _rss_mb(self.pid))
            time.sleep(0.01)

    def __enter__(self):
        self.baseline = self.peak = _rss_mb(self.pid)
        self._on = True
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._on = False
        self._thread.join()

    @property
    def growth(self) -> float:
        return self.peak - self.baseline


# ------------------------------------------------------------------ host and origin

ROUTES = [("GET", "/"), ("GET", "/label"), ("GET", "/api/health"), ("GET", "/api/queue"),
          ("GET", "/api/labels"), ("GET", "/docs"), ("GET", "/openapi.json"),
          ("GET", "/image/ITEM"), ("POST", "/api/predict"), ("POST", "/api/labels"),
          ("DELETE", "/api/labels/ITEM")]


@pytest.mark.parametrize("method, path", ROUTES)
def test_a_foreign_host_name_gets_400_on_every_route(served, method, path):
    client = _client(served)
    item = client.get("/api/queue").json()["items"][0]["id"]
    answer = client.request(method, path.replace("ITEM", item),
                            headers={"Host": "attacker.example"})
    assert answer.status_code == 400, (path, answer.status_code)
    assert "attacker.example" in answer.json()["error"]
    # The names it is meant for still work, an IPv6 loopback and a port included.
    assert client.get("/api/health", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/api/health", headers={"Host": "[::1]:8000"}).status_code == 200
    assert _client(served, allowed_hosts=("lab-pc.local",)).get(
        "/api/health", headers={"Host": "lab-pc.local:8000"}).status_code == 200


def test_requests_from_pages_of_other_sites_change_nothing(served, caplog):
    run, photos, _, _ = served
    client = _client(served)
    item = client.get("/api/queue").json()["items"][0]
    photo = ("files", ("p0.jpg", open(photos / "p0.jpg", "rb").read(), "image/jpeg"))
    before = _reviewed(run).copy()
    foreign = [{"Origin": "http://attacker.example"}, {"Origin": "null"},
               {"Origin": "http://127.0.0.1:9999"},  # this machine, another port: another site
               {"Referer": "http://attacker.example/page.html"}]
    for headers in foreign:
        assert client.post("/api/predict", files=[photo], headers=headers).status_code == 403
        assert client.post("/api/labels", json={"id": item["id"], "label": "bees"},
                           headers=headers).status_code == 403
        assert client.post("/api/labels", content=json.dumps({"id": item["id"],
                                                                "label": "bees"}),
                           headers={**headers, "Content-Type": "text/plain"}).status_code == 403
        assert client.delete(f"/api/labels/{item['id']}", headers=headers).status_code == 403
        assert client.options("/api/labels", headers=headers).status_code == 403
    pd.testing.assert_frame_equal(_reviewed(run), before)
    assert "Refused POST /api/predict" in caplog.text and "attacker.example" in caplog.text
    # The server's own pages (same origin, with the label page's token), and programs
    # (no Origin) asking for predictions, work.
    from tests.test_serve import page_token
    own = {"Origin": "http://127.0.0.1:8000", "X-Page-Token": page_token(client.get)}
    assert client.post("/api/predict", files=[photo], headers=own).status_code == 200
    assert client.post("/api/predict", files=[photo]).status_code == 200
    assert client.post("/api/labels", json={"id": item["id"], "label": "bees"},
                       headers=own).status_code == 200
    assert client.delete(f"/api/labels/{item['id']}", headers=own).status_code == 200
    # Without the page's token (a script of another page cannot read it), no change.
    for headers in ({"Origin": "http://127.0.0.1:8000"}, {},
                    {"X-Page-Token": "guessed", "Origin": "http://127.0.0.1:8000"}):
        assert client.post("/api/labels", json={"id": item["id"], "label": "bees"},
                           headers=headers).status_code == 403
        assert client.delete(f"/api/labels/{item['id']}", headers=headers).status_code == 403
    assert _reviewed(run).to_dict("records") == before.to_dict("records")


def test_an_error_inside_a_handler_is_a_500_without_its_text(served, caplog):
    from small_photo_classifier.workflow.use import serving, server_app
    run, _, predictor, _ = served

    class Broken:
        task, info, image_size = predictor.task, predictor.info, predictor.image_size

        def health(self):
            raise RuntimeError("secret: /home/someone/private/run")
    app = server_app.create_app(str(run), serving.ServeConfig(), predictor=Broken())
    client = TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False)
    answer = client.get("/api/health")
    assert answer.status_code == 500
    body = answer.json()
    assert "secret" not in answer.text and "RuntimeError" not in answer.text
    assert body["id"] in body["error"] and body["id"] in caplog.text
    assert "secret: /home/someone/private/run" in caplog.text  # the details: the log only


def test_a_request_body_over_the_limit_is_413_before_it_is_read(served):
    client = _client(served, max_request_bytes=1_000_000)
    photo = ("files", ("p0.jpg", b"\xff\xd8\xff" + b"\0" * 2_000_000, "image/jpeg"))
    answer = client.post("/api/predict", files=[photo])
    assert answer.status_code == 413 and "--max_request_mb" in answer.json()["error"]


# ------------------------------------------------------------------ photos too large

def test_the_pixel_count_is_read_from_the_header_before_any_decoding(bomb, tmp_path):
    from small_photo_classifier.pipeline import scan
    with open(bomb, "rb") as f:
        assert scan.dimensions(f.read(64)) == (20000, 20000)
    photo = write_image(str(tmp_path / "big.jpg"), np.zeros((300, 500, 3), np.uint8))
    with open(photo, "rb") as f:
        assert scan.dimensions(f.read()) == (500, 300)
    with PeakRSS() as watch:
        reason = scan.check_image(bomb)
    assert "20000x20000 = 400 megapixels" in reason and "--max_pixels" in reason
    assert watch.growth < 100
    assert scan.check_image(photo, max_pixels=149_999).startswith("is 500x300")
    assert scan.check_image(photo) == ""


def test_an_uploaded_bomb_is_refused_with_its_reason(served, bomb):
    run, photos, _, _ = served
    client = _client(served)
    files = [("files", ("p0.jpg", open(photos / "p0.jpg", "rb").read(), "image/jpeg")),
             ("files", ("bomb.png", open(bomb, "rb").read(), "image/png"))]
    with PeakRSS() as watch:
        answer = client.post("/api/predict", files=files)
    assert answer.status_code == 413 and "bomb.png is 20000x20000" in answer.json()["error"]
    assert watch.growth < 1024
    alone = client.post("/api/predict", files=files[:1])
    assert alone.status_code == 200 and len(alone.json()["predictions"]) == 1


@pytest.mark.slow
def test_a_bomb_in_a_predict_folder_is_a_bad_image_and_the_rest_are_predicted(
        served, bomb, tmp_path):
    import shutil
    run, photos, _, _ = served
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        shutil.copy(photos / f"p{i}.jpg", folder / f"p{i}.jpg")
    shutil.copy(bomb, folder / "bomb.png")
    out = tmp_path / "pred.csv"
    with PeakRSS() as watch:
        predict_in_process(run, folder, out)
    rows = pd.read_csv(out, dtype={"name": str})
    assert sorted(rows.name) == ["p0", "p1", "p2"]
    bad = pd.read_csv(tmp_path / "pred_bad_images.csv")
    assert list(bad.path) == [str(folder / "bomb.png")]
    assert "400 megapixels" in bad.reason[0]
    assert watch.growth < 1024


@pytest.mark.slow
def test_a_bomb_in_a_training_folder_is_a_bad_image_and_the_rest_train(bomb, tmp_path):
    import shutil
    from tests.conftest import class_folders
    from tests.inprocess import run
    data = class_folders(tmp_path / "data", 24, size=SIZE)
    shutil.copy(bomb, tmp_path / "data" / "pos" / "bomb.png")
    with PeakRSS() as watch:
        result = run("train.py", f"--data_dir={data}", "--weights=none", "--noinclude_top",
                     f"--image_size={SIZE}", "--val_size=6", "--stage=heads", "--scenarios=A",
                     "--epochs=1", "--cv_folds=0", "--on_bad_image=skip",
                     f"--workdir={tmp_path / 'run'}", f"--cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr[-3000:]
    bad = pd.read_csv(tmp_path / "run" / "bad_images.csv")
    assert [os.path.basename(p) for p in bad.path] == ["bomb.png"]
    assert "megapixels" in bad.reason[0]
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    assert len(split) == 24  # every other photo trained or validated
    assert watch.growth < 1024


# ------------------------------------------------------------------ a real server

def _serve(run, port, log):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "serve.py", f"--workdir={run}",
                                f"--port={port}"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError(open(log.name).read()[-3000:])


@pytest.fixture(scope="module")
def live(served, tmp_path_factory):
    """serve.py on the served run, in its own process, its output in a file."""
    log = open(tmp_path_factory.mktemp("live") / "serve.log", "w+")
    port = _free_port()
    process = _serve(served[0], port, log)
    yield served[0], port, process, log.name
    process.kill()
    process.wait()
    log.close()


def _send_until_answered(port: int, head: bytes, chunks, chunked: bool) -> bytes:
    """Sends ``head`` then ``chunks`` until the server answers; returns the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head)
        s.settimeout(0.0)
        for chunk in chunks:
            try:
                answer = s.recv(65536)
                if answer:
                    return answer
            except BlockingIOError:
                pass
            try:
                s.settimeout(5)
                s.sendall((b"%x\r\n" % len(chunk) + chunk + b"\r\n") if chunked else chunk)
                s.settimeout(0.0)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                break
        s.settimeout(30)
        return s.recv(65536)


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_1gb_body_is_413_while_it_streams(live, chunked):
    _, port, process, _ = live
    boundary = b"limitboundary"
    start = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"files\"; "
             b"filename=\"big.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n")
    length = b"" if chunked else b"Content-Length: %d\r\n" % (1 << 30)
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port + length
            + (b"Transfer-Encoding: chunked\r\n" if chunked else b"")
            + b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n")
    block = b"\xff" * (1 << 20)
    chunks = [start] + [block] * 1024  # 1 GB
    with PeakRSS(process.pid) as watch:
        answer = _send_until_answered(port, head, chunks, chunked)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert watch.growth < 50, watch.growth


@pytest.mark.slow
def test_pages_of_another_site_cannot_use_the_server_in_a_real_browser(live, served):
    """Chromium opens a page served from another origin (this machine, another port) that
    tries every way a page can send to the server: none is served, reviewed.csv stays as
    it was, and the server logs each refusal."""
    import http.server
    from playwright import sync_api as playwright
    run, port, _, log = live
    item = _client(served).get("/api/queue").json()["items"][0]["id"]
    target = f"http://127.0.0.1:{port}"
    page_html = f"""<!doctype html><html><body>
<form id="f" method="POST" action="{target}/api/labels" enctype="text/plain">
  <input name='{{"id": "{item}", "label": "bees", "x": "' value='"}}'></form>
<script>
async function attempt(name, make) {{
  try {{ const r = await make(); return name + ":" + r.status; }}
  catch (e) {{ return name + ":refused"; }}
}}
window.results = Promise.all([
  attempt("multipart", () => {{ const d = new FormData();
    d.append("files", new Blob([new Uint8Array([255, 216, 255, 0])], {{type: "image/jpeg"}}),
             "x.jpg");
    return fetch("{target}/api/predict", {{method: "POST", body: d, mode: "no-cors"}}); }}),
  attempt("json", () => fetch("{target}/api/labels", {{method: "POST",
    headers: {{"Content-Type": "application/json"}},
    body: JSON.stringify({{id: "{item}", label: "bees"}})}})),
  attempt("text", () => fetch("{target}/api/labels", {{method: "POST", mode: "no-cors",
    headers: {{"Content-Type": "text/plain"}},
    body: JSON.stringify({{id: "{item}", label: "bees"}})}})),
  attempt("delete", () => fetch("{target}/api/labels/{item}", {{method: "DELETE"}})),
]);
</script></body></html>"""

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = page_html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    before = _reviewed(run).copy()
    chromium = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                     if os.path.exists(p)), None)
    assert chromium, "Debian's chromium is needed (.ci/run installs it)"
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{other.server_address[1]}/")
            results = page.evaluate("window.results")
            assert "json:refused" in results and "delete:refused" in results
            with page.expect_navigation():
                page.evaluate("document.getElementById('f').submit()")
            assert "another site" in page.content()  # the form post's answer: the refusal
            browser.close()
    finally:
        other.shutdown()
    pd.testing.assert_frame_equal(_reviewed(run), before)
    time.sleep(0.5)
    said = open(log).read()
    for what in ("Refused POST /api/predict", "Refused POST /api/labels",
                 "Refused OPTIONS /api/labels"):
        assert what in said, (what, said[-3000:])
