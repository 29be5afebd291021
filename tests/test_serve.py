"""serve.py (issue 31): the JSON API, the label queue and its file, the safety rules, and
both pages in a real headless Chromium."""

import concurrent.futures
import csv
import json
import re
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import colour_image, write_image

from fastapi.testclient import TestClient  # the test extra installs the serve extra

SIZE = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lists(run, photos):
    """to_label.csv (3 photos of an unlabelled folder) and suspect_labels.csv (2 training
    photos), and the run_config.json naming both folders, as train.py leaves them."""
    unlabelled = run / "unlabelled"
    for i in range(3):
        write_image(str(unlabelled / f"new{i}.jpg"), colour_image(i % 2, size=SIZE, seed=50 + i))
    pd.DataFrame({"name": [f"new{i}" for i in range(3)], "rank": [1, 2, 3],
                  "score": [0.9, 0.8, 0.7], "reason": ["uncertain"] * 3,
                  "path": [str(unlabelled / f"new{i}.jpg") for i in range(3)]}).to_csv(
        run / "to_label.csv", index=False)
    pd.DataFrame({"rank": [1, 2], "name": ["p0", "p1"], "label": ["ants", "bees"],
                  "predicted": ["bees", "ants"], "confidence": [0.93, 0.88],
                  "given": ["ants", "bees"], "margin": [0.5, 0.4],
                  "path": [str(photos / "p0.jpg"), str(photos / "p1.jpg")]}).to_csv(
        run / "suspect_labels.csv", index=False)
    (run / "run_config.json").write_text(json.dumps({"data_dir": str(photos),
                                                     "unlabelled_dir": str(unlabelled)}))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A run folder with a model, a label queue, and the app on it (no token)."""
    from tests.conftest import trusted_run
    from small_photo_classifier.workflow.use import server_app, serving
    run, photos = trusted_run(tmp_path_factory.mktemp("served"), SIZE, {"layout": "kaggle"})
    _lists(run, photos)
    predictor = serving.Predictor(str(run))
    return run, photos, predictor, server_app


def _client(served, **settings):
    """A test client of the app on the served run, as a browser on the same machine
    reaches it (http://127.0.0.1:8000/); ``settings``: `serving.ServeConfig` fields."""
    from small_photo_classifier.workflow.use import serving
    run, _, predictor, server_app = served
    return TestClient(server_app.create_app(str(run), serving.ServeConfig(**settings),
                                            predictor=predictor),
                      base_url="http://127.0.0.1:8000")


def page_token(get) -> str:
    """The label page's own token, as its script reads it (``get``: a GET of a path)."""
    page = get("/label").text
    return re.search(r'<meta name="page-token" content="([^"]+)">', page).group(1)


def _label_client(served, **settings):
    """`_client` that sends the label page's token with every request, as its page does."""
    client = _client(served, **settings)
    client.headers["X-Page-Token"] = page_token(client.get)
    return client


def _reviewed(run):
    path = run / "labels" / "reviewed.csv"
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else \
        pd.DataFrame(columns=["name", "label", "source", "time"])


def test_predict_api_gives_predict_py_probabilities(served, tmp_path):
    run, photos, _, _ = served
    client = _client(served)
    health = client.get("/api/health").json()
    assert health["classes"] == ["ants", "bees"] and health["image_size"] == SIZE
    assert health["backbone"] == "vgg16" and health["model"] == "model.keras"
    assert health["run"] == run.name and str(run.parent) not in json.dumps(health)
    names = [f"p{i}" for i in range(5)]
    files = [("files", (f"{n}.jpg", open(photos / f"{n}.jpg", "rb").read(), "image/jpeg"))
             for n in names]
    answer = client.post("/api/predict", files=files)
    assert answer.status_code == 200
    rows = answer.json()["predictions"]
    assert [r["name"] for r in rows] == names
    assert all(list(r["probabilities"]) == ["ants", "bees"] for r in rows)
    # predict.py on the same files.
    from small_photo_classifier.workflow.use import predicting
    folder = tmp_path / "five"
    folder.mkdir()
    for n in names:
        os.symlink(photos / f"{n}.jpg", folder / f"{n}.jpg")
    out = tmp_path / "pred.csv"
    predicting.run(predicting.PredictRun(
        workdir=str(run), data_dir=str(folder), output=str(out), precision="auto",
        batch_size=4, strategy="none", cpu_replicas=1, ray_address=None, ray_workers=1))
    table = pd.read_csv(out, dtype={"name": str}).set_index("name")
    for r in rows:
        assert abs(r["probabilities"]["bees"] - table.loc[r["name"], "bees"]) <= 1e-5
        # Random-weight features are nearly parallel: batch-to-batch float32 rounding moves
        # their tiny distances' logs (real features: 3e-4 at most, docs/benchmarks.md).
        assert abs(r["unfamiliar_score"] - table.loc[r["name"], "unfamiliar_score"]) <= 1e-2
    # The CSV download is predict.py's layout.
    text = client.post("/api/predict?format=csv", files=files).text
    assert text.splitlines()[0] == "name,bees,unfamiliar_score,unfamiliar"
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]


def test_explain_api_gives_a_heatmap_png_and_refuses_bad_uploads(served):
    """/api/explain: one photo in, a PNG of it with its heatmap out; two photos, a file
    that is not a photo, or a request from another site's page get a 4xx."""
    run, photos, _, _ = served
    client = _client(served)
    photo = ("files", ("p3.jpg", open(photos / "p3.jpg", "rb").read(), "image/jpeg"))
    answer = client.post("/api/explain", files=[photo])
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.content[:8] == b"\x89PNG\r\n\x1a\n"
    two = client.post("/api/explain", files=[photo, photo])
    assert two.status_code == 413 and "at most 1" in two.json()["error"]
    text = client.post("/api/explain", files=[("files", ("a.jpg", b"not a photo", "image/jpeg"))])
    assert text.status_code == 415 and "a.jpg" in text.json()["error"]
    other = client.post("/api/explain", files=[photo], headers={"Origin": "https://evil.example"})
    assert other.status_code == 403
    assert "/api/explain" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("path", [
    "/image/../../etc/passwd", "/image/..%2F..%2Fetc%2Fpasswd", "/image/%2Fetc%2Fpasswd",
    "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/image/0", "/image/" + "a" * 20,
    "/labels/", "/labels/reviewed.csv", "/model.keras", "/pages/"])
def test_no_path_from_the_request_reaches_a_file(served, path):
    response = _client(served).get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert "root:" not in response.text


def test_an_image_symlinked_out_of_the_data_folder_is_not_served(served, tmp_path):
    run, photos, _, _ = served
    client = _client(served)
    queue = client.get("/api/queue").json()["items"]
    assert client.get(f"/image/{queue[0]['id']}").status_code == 200  # on the list: served
    secret = tmp_path / "secret.jpg"
    write_image(str(secret), colour_image(1, size=SIZE))
    link = photos / "link.jpg"
    os.symlink(secret, link)
    try:
        table = pd.read_csv(run / "suspect_labels.csv")
        table.loc[len(table)] = [3, "link", "ants", "bees", 0.9, "ants", 0.3, str(link)]
        table.to_csv(run / "suspect_labels.csv", index=False)
        fresh = _client(served)
        item = next(i for i in fresh.get("/api/queue").json()["items"] if i["name"] == "link")
        assert fresh.get(f"/image/{item['id']}").status_code == 404
    finally:
        os.remove(link)
        table = pd.read_csv(run / "suspect_labels.csv")
        table[table.name != "link"].to_csv(run / "suspect_labels.csv", index=False)


def test_an_empty_queue_says_what_is_true_of_this_run(tmp_path):
    """A run whose audit found no suspect label is not told to 'train with CV'; one
    without an audit is; neither claims a label_next that did not run."""
    from small_photo_classifier.features.task import Task
    from small_photo_classifier.workflow.use import serving
    task = Task("binary", ("ants", "bees"))
    (tmp_path / "metrics.json").write_text(json.dumps({"label_audit": {
        "suspect_labels": 0, "by": "linear probe, out-of-fold", "duplicate_pairs": 0}}))
    audited = serving.Queue(str(tmp_path), task)
    assert not audited.items
    assert "found no training label that looks wrong" in audited.empty
    assert "cross-validation" not in audited.empty and "--stage=label_next" in audited.empty
    (tmp_path / "metrics.json").write_text(json.dumps({}))
    (tmp_path / "run_config_label_next.json").write_text(json.dumps({"unlabelled_dir": "u"}))
    plain = serving.Queue(str(tmp_path), task)
    assert "No label audit ran" in plain.empty and "chose no photos" in plain.empty


def test_bad_uploads_get_a_clear_4xx(served):
    client = _client(served, max_bytes=20_000_000, max_files=4)
    big = client.post("/api/predict", files=[("files", ("huge.jpg", b"\xff" * 50_000_001,
                                                        "image/jpeg"))])
    assert big.status_code == 413 and "huge.jpg" in big.json()["error"]
    text = client.post("/api/predict", files=[("files", ("notes.txt", b"hello", "text/plain"))])
    assert text.status_code == 415 and "notes.txt" in text.json()["error"]
    many = client.post("/api/predict", files=[("files", (f"{i}.jpg", b"x", "image/jpeg"))
                                              for i in range(5)])
    assert many.status_code == 413 and "at most 4" in many.json()["error"]
    none = client.post("/api/predict")
    assert 400 <= none.status_code < 500


def test_labels_are_written_at_once_replaced_undone_and_exported(served):
    run, _, _, _ = served
    client = _label_client(served)
    items = client.get("/api/queue").json()["items"]
    assert [i["source"] for i in items] == ["label_next"] * 3 + ["suspect"] * 2
    assert items[3]["note"] == "labelled ants, the model says bees with 0.93"
    for item, label in zip(items[:3], ["ants", "bees", "bees"]):
        assert client.post("/api/labels", json={"id": item["id"], "label": label}).status_code == 200
    assert list(_reviewed(run).name) == ["new0", "new1", "new2"]
    client.post("/api/labels", json={"id": items[0]["id"], "label": "bees"})  # replaces
    client.delete(f"/api/labels/{items[1]['id']}")  # undo
    table = _reviewed(run)
    assert sorted(zip(table.name, table.label)) == [("new0", "bees"), ("new2", "bees")]
    assert client.post("/api/labels", json={"id": items[2]["id"], "label": "wasps"}).status_code == 422
    assert client.post("/api/labels", json={"id": "nope", "label": "ants"}).status_code == 404
    exported = client.get("/api/labels").text.splitlines()
    assert exported[0] == "name,bees" and sorted(exported[1:]) == ["new0,1", "new2,1"]
    for item in items[:3]:
        client.delete(f"/api/labels/{item['id']}")
    assert _reviewed(run).empty


def test_class_folder_runs_get_the_moves_that_apply_the_labels(served, tmp_path):
    from small_photo_classifier.workflow.use import serving
    run, photos, predictor, _ = served
    queue = serving.Queue(str(run), predictor.task)
    rows = {"new0": {"name": "new0", "label": "bees", "source": "label_next", "time": "t"}}
    moves = serving.labels_for_training({**predictor.info, "layout": "folders"}, queue, rows)
    # Relative to the data folder: no folder of the machine is named.
    assert moves["moves"] == [{"name": "new0", "from": "$UNLABELLED/new0.jpg", "to": "bees"}]
    assert str(run) not in json.dumps(moves) and str(photos) not in json.dumps(moves)
    assert moves["command"].splitlines()[1] == 'mkdir -p bees && mv "$UNLABELLED"/new0.jpg bees/'
    rows = {"p1": {"name": "p1", "label": "ants", "source": "suspect", "time": "t"}}
    in_data = serving.labels_for_training({**predictor.info, "layout": "folders"}, queue, rows)
    assert in_data["moves"] == [{"name": "p1", "from": "p1.jpg", "to": "ants"}]


def test_off_loopback_every_request_needs_the_token(served):
    from small_photo_classifier.workflow.use import serving
    assert serving.check_host("127.0.0.1", None) is None
    generated = serving.check_host("0.0.0.0", None)
    assert generated and len(generated) >= 24
    client = _client(served, token="s3cret")
    assert client.get("/api/health").status_code == 401
    assert client.get("/").status_code == 401
    assert client.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/?token=s3cret").status_code == 200  # sets the cookie
    assert client.get("/api/health").status_code == 200


# ------------------------------------------------------------------ a real server process

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run, port):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "serve.py", f"--workdir={run}",
                                f"--port={port}"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    import httpx
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError(process.stdout.read().decode()[-3000:])


@pytest.fixture(scope="module")
def server(served):
    run = served[0]
    port = _free_port()
    process = _start(run, port)
    yield run, f"http://127.0.0.1:{port}", process
    process.kill()
    process.wait()


@pytest.mark.slow
def test_concurrent_clients_get_their_own_answers_and_lose_no_label(server, served):
    import httpx
    run, url, _ = server
    photos = served[1]
    expected = {}
    with _client(served) as local:
        for i in range(8):
            body = open(photos / f"p{i}.jpg", "rb").read()
            expected[i] = local.post("/api/predict", files=[("files", (f"p{i}.jpg", body))]) \
                .json()["predictions"][0]["probabilities"]["bees"]

    def client(i):
        body = open(photos / f"p{i}.jpg", "rb").read()
        got = [httpx.post(f"{url}/api/predict", files=[("files", (f"p{i}.jpg", body))],
                          timeout=60).json()["predictions"][0] for _ in range(3)]
        return i, got
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for i, got in pool.map(client, range(8)):
            assert all(g["name"] == f"p{i}" and abs(g["probabilities"]["bees"] - expected[i])
                       <= 1e-5 for g in got)
    items = httpx.get(f"{url}/api/queue").json()["items"]
    own = {"X-Page-Token": page_token(lambda path: httpx.get(url + path))}

    def label(item):
        return httpx.post(f"{url}/api/labels", json={"id": item["id"], "label": "ants"},
                          headers=own, timeout=30).status_code
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        assert list(pool.map(label, items)) == [200] * len(items)
    assert sorted(_reviewed(run).name) == sorted(i["name"] for i in items)
    for item in items:
        httpx.delete(f"{url}/api/labels/{item['id']}", headers=own)


@pytest.mark.slow
def test_a_server_killed_mid_queue_leaves_a_valid_reviewed_csv(served):
    import httpx
    run = served[0]
    port = _free_port()
    process = _start(run, port)
    url = f"http://127.0.0.1:{port}"
    items = httpx.get(f"{url}/api/queue").json()["items"]
    own = {"X-Page-Token": page_token(lambda path: httpx.get(url + path))}
    acknowledged = []
    for n in range(40):
        item = items[n % len(items)]
        label = "ants" if n % 2 else "bees"
        if httpx.post(f"{url}/api/labels", json={"id": item["id"], "label": label},
                      headers=own).status_code == 200:
            acknowledged.append((item["name"], label))
        if n == 25:
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait()
    with open(run / "labels" / "reviewed.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = dict(acknowledged)
    assert {r["name"]: r["label"] for r in rows} == last  # every acknowledged answer, whole
    assert all(r["time"] and r["source"] in ("label_next", "suspect") for r in rows)
    os.remove(run / "labels" / "reviewed.csv")


@pytest.mark.slow
def test_both_pages_in_a_real_browser(server, served):
    """Chromium (Debian's, headless) drives the pages as a person would: predict a photo
    by upload; label three photos with the keyboard, undo one, reload, and find exactly
    the right rows in reviewed.csv."""
    from playwright import sync_api as playwright
    run, url, _ = server
    photos = served[1]
    chromium = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                     if os.path.exists(p)), None)
    assert chromium, "Debian's chromium is needed (.ci/run installs it)"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        page.set_input_files("#pick", str(photos / "p3.jpg"))
        page.wait_for_selector(".row[data-name='p3']")
        assert page.inner_text(".row .top") in ("ants", "bees")
        page.click(".row button.why")  # the heatmap of the predicted class, beside it
        page.wait_for_selector(".row img.heatmap")
        page.goto(url + "/label")
        page.wait_for_selector("#card:not([hidden])")
        names = []
        for key in ("1", "2", "1"):
            names.append(page.inner_text("#name"))
            page.keyboard.press(key)
            # (A selector, not wait_for_function: the pages' policy allows no eval.)
            page.wait_for_selector(f"#counter:text-matches('^{len(names)} of')")
        page.keyboard.press("u")  # undo the third
        page.wait_for_selector("#counter:text-matches('^2 of')")
        page.reload()
        page.wait_for_selector("#card:not([hidden])")
        assert page.inner_text("#counter").startswith("2 of")
        assert page.inner_text("#name") == names[2]  # back at the undone photo
        browser.close()
    table = _reviewed(run)
    assert list(zip(table.name, table.label)) == [(names[0], "ants"), (names[1], "bees")]
    os.remove(run / "labels" / "reviewed.csv")


def test_health_says_calibrated_only_when_a_map_is_applied_and_names_no_local_path():
    """A calibration fitted but not applied is recorded with kind "none" (issue 42's
    walkthrough: /api/health said calibrated for such a run); a backbone file is named,
    not located."""
    import types
    from small_photo_classifier.features.task import Task
    from small_photo_classifier.workflow.use import serving

    def health(calibration, backbone="/home/someone/nets/lite0.keras"):
        fake = types.SimpleNamespace(
            use_bag=False, workdir="/srv/runs/flowers", task=Task("multiclass", ("a", "b", "c")),
            info={"backbone": backbone, "calibration": calibration}, image_size=224, tta=1,
            reference=None)
        return serving.Predictor.health(fake)

    assert health({"kind": "none", "fitted_on": "not applied"})["calibrated"] is False
    assert health(None)["calibrated"] is False  # a run folder from before calibration
    assert health({"kind": "temperature", "temperature": [1.3]})["calibrated"] is True
    answer = health({"kind": "none"})
    assert answer["backbone"] == "lite0.keras" and answer["run"] == "flowers"
    assert "/home/someone" not in json.dumps(answer) and "/srv" not in json.dumps(answer)
    assert health({"kind": "none"}, backbone="vgg16")["backbone"] == "vgg16"
