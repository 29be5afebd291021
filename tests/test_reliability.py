"""Reliability: messy images, hostile inputs, kills at every stage, concurrent cache use.

Rows of docs/hazards.md point at the tests here.
"""

import io
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from small_photo_classifier.features import networks
from small_photo_classifier.pipeline import discovery, input as input_lib, ops, scan
from small_photo_classifier.pipeline.errors import DataError
from tests.conftest import checkpoint_epoch, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
ARRAY = RNG.integers(0, 255, (40, 50, 3), dtype=np.uint8)


def _pil_bytes(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _jpeg():
    return _pil_bytes(Image.fromarray(ARRAY), "JPEG")


def _gif():
    frames = [Image.fromarray(ARRAY), Image.fromarray(255 - ARRAY)]
    return _pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])


# name -> (file bytes, expected: "ok" or a fragment of the reason)
IMAGE_HAZARDS = {
    "zero_byte.jpg": (b"", "empty (0 bytes)"),
    "truncated.jpg": (_jpeg()[:len(_jpeg()) // 2], "truncated or corrupt"),
    "random_bytes.jpg": (RNG.bytes(700), "not a JPEG or PNG"),
    "png_saved_as.jpg": (_pil_bytes(Image.fromarray(ARRAY), "PNG"), "ok"),
    "grayscale.jpg": (_pil_bytes(Image.fromarray(ARRAY[..., 0]), "JPEG"), "ok"),
    "cmyk.jpg": (_pil_bytes(Image.fromarray(ARRAY).convert("CMYK"), "JPEG"), "ok"),
    "alpha.png": (_pil_bytes(Image.fromarray(np.dstack([ARRAY, ARRAY[..., :1]])), "PNG"), "ok"),
    "sixteen_bit.png": (_pil_bytes(Image.fromarray(ARRAY[..., 0].astype(np.uint16) * 257),
                                   "PNG"), "ok"),
    "animated_gif.jpg": (_gif(), "is a GIF"),
    "tiny_5x5.JPG": (_pil_bytes(Image.fromarray(ARRAY[:5, :5]), "JPEG"), "ok"),
    "UPPER CASE.JPEG": (_jpeg(), "ok"),
    "spaces and ünïcödé é.jpg": (_jpeg(), "ok"),
}


@pytest.fixture(scope="module")
def hazard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hazards")
    for name, (data, _) in IMAGE_HAZARDS.items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("name", sorted(IMAGE_HAZARDS))
def test_image_hazard_matrix(hazard_dir, name):
    path = str(hazard_dir / name)
    expected = IMAGE_HAZARDS[name][1]
    reason = scan.check_image(path, 32)
    if expected == "ok":
        assert reason == ""
        # ... and the real pipeline turns it into one well-formed batch.
        batch = next(iter(input_lib.eval_dataset([path], [1], ["x"], 32, 1)))
        assert batch["image"].shape == (1, 32, 32, 3)
        assert np.all(np.isfinite(batch["image"].numpy()))
    else:
        assert expected in reason


def test_pixels_of_odd_formats_are_right(hazard_dir):
    def decode(name):
        return ops.decode_image_bytes((hazard_dir / name).read_bytes(), 32).numpy()
    np.testing.assert_array_equal(decode("png_saved_as.jpg"), ARRAY)
    np.testing.assert_array_equal(decode("alpha.png"), ARRAY)
    sixteen = decode("sixteen_bit.png")
    np.testing.assert_array_equal(sixteen[..., 0], ARRAY[..., 0])  # 16-bit scaled to 8-bit
    np.testing.assert_array_equal(sixteen[..., 0], sixteen[..., 2])
    assert np.abs(decode("cmyk.jpg").astype(int) - ARRAY).mean() < 12  # colours survive


def test_very_large_jpeg_is_decoded_downscaled(tmp_path):
    big = np.tile(np.linspace(0, 255, 8000, dtype=np.uint8)[None, :, None], (6000, 1, 3))
    path = str(write_image(str(tmp_path / "huge.jpg"), big))
    del big
    contents = tf.io.read_file(path)
    # 6000 / 8 = 750 >= 224: the decoder never materialises the 144 MB full image.
    assert ops.decode_image_bytes(contents, 224).shape == (750, 1000, 3)
    assert scan.check_image(path, 224) == ""
    batch = next(iter(input_lib.eval_dataset([path], [0], ["huge"], 64, 1)))
    assert batch["image"].shape == (1, 64, 64, 3)


def test_bad_images_skip_policy_writes_report_and_keeps_the_rest(hazard_dir, tmp_path):
    paths = sorted(str(p) for p in hazard_dir.iterdir())
    frame = pd.DataFrame({"path": paths, "name": [os.path.basename(p) for p in paths]})
    with pytest.raises(DataError) as err:
        scan.filter_bad_images(frame, 32, "fail", str(tmp_path / "r.csv"))
    for name, (_, expected) in IMAGE_HAZARDS.items():
        assert (name in str(err.value)) == (expected != "ok")
    kept = scan.filter_bad_images(frame, 32, "skip", str(tmp_path / "r.csv"))
    report = pd.read_csv(tmp_path / "r.csv")
    assert len(kept) + len(report) == len(frame)
    assert set(report.path.map(os.path.basename)) == {
        n for n, (_, e) in IMAGE_HAZARDS.items() if e != "ok"}
    flagged = scan.filter_bad_images(frame, 32, "skip", str(tmp_path / "p.csv"), keep_rows=True)
    assert len(flagged) == len(frame) and flagged.bad.sum() == len(report)


def test_gif_files_are_ignored_and_counted_in_class_folders(tmp_path):
    for cls in ("a", "b"):
        write_image(str(tmp_path / cls / "x.jpg"), size=8)
        write_image(str(tmp_path / cls / f"{cls}.jpg"), size=8)
    (tmp_path / "a" / "imageNotFound.gif").write_bytes(_gif())
    ds = discovery.discover(str(tmp_path))
    assert ds.ignored == 1 and len(ds.frame) == 4
    assert sorted(ds.frame.name) == ["a", "a/x", "b", "b/x"]  # x.jpg is in both classes


# ---------------------------------------------------------------- hostile inputs (fuzz)

@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.text(max_size=300),
    st.lists(st.tuples(st.text(max_size=12), st.sampled_from(
        ["0", "1", "1.0", "0.0", "2", "", "nan", "-1", " 1 ", "x"])), max_size=8).map(
        lambda rows: "name,invasive\n" + "".join(f"{n},{l}\n" for n, l in rows))))
def test_fuzz_labels_csv_either_parses_cleanly_or_raises_data_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "train_labels.csv"
    path.write_text(text, encoding="utf-8")
    try:
        frame = discovery.read_labels_csv(str(path))
    except DataError:
        return
    assert set(frame.label) <= {0, 1}
    assert not frame.name.duplicated().any()
    for name in frame.name:
        assert name and "/" not in name and "\\" not in name and name not in (".", "..")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(["name", "tags", "a", "b", "invasive", "species"]), min_size=1,
                max_size=3, unique=True),
       st.lists(st.lists(st.sampled_from(["0", "1", "x", "y z", "", "2", "oak", "a b c",
                                          "1.0", "-1"]), min_size=3, max_size=3),
                max_size=8))
def test_fuzz_any_labels_csv_parses_consistently_or_is_a_clear_error(tmp_path_factory, header,
                                                                      rows):
    from small_photo_classifier.pipeline import labels
    from small_photo_classifier.pipeline.errors import ConfigError
    path = tmp_path_factory.mktemp("fuzzany") / "labels.csv"
    path.write_text(",".join(header) + "\n" + "".join(
        f"n{i}," + ",".join(r[:len(header) - 1]) + "\n" for i, r in enumerate(rows)))
    try:
        read = labels.read_labels(str(path))
    except (DataError, ConfigError):
        return
    k = len(read.class_names)
    assert read.kind in labels.KINDS and len(read.frame) == len(rows)
    for label in read.frame.label:
        if read.kind == "multilabel":
            assert len(label) == k and set(label) <= {0, 1} and any(label)
        else:
            assert 0 <= label < k
    if read.kind == "binary":
        assert k == 2


_SEEDS = [_jpeg(), _pil_bytes(Image.fromarray(ARRAY), "PNG")]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=3000),
    st.tuples(st.sampled_from([0, 1]), st.integers(0, 10**6), st.integers(0, 255),
              st.integers(1, 10**6)).map(lambda t: _mutate(*t))))
def test_fuzz_image_check_never_raises_and_accepted_means_decodable(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzzimg") / "x.jpg"
    path.write_bytes(data)
    reason = scan.check_image(str(path), 32)
    assert isinstance(reason, str)
    if not reason:
        batch = next(iter(input_lib.eval_dataset([str(path)], [0], ["x"], 32, 1)))
        assert batch["image"].shape == (1, 32, 32, 3)


def _mutate(which, position, value, cut):
    data = bytearray(_SEEDS[which])
    data[position % len(data)] = value
    return bytes(data[:max(1, cut % (len(data) + 1))])


# ---------------------------------------------------------------- interruptions

def _popen(log, *args):
    # PYTHONPATH: a helper script written to tmp_path imports the checkout's modules,
    # which are not installed (setup.cfg installs only the dependencies).
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT}
    # A background process inherits SIGINT ignored; a user's Ctrl-C is not.
    return subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _kill_when(proc, ready, timeout=300, delay=0.3, sig=signal.SIGKILL):
    """Sends ``sig`` to ``proc`` once ``ready()`` is true and waits for it; returns False
    if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            time.sleep(delay)
            if proc.poll() is not None:
                return False
            proc.send_signal(sig)
            proc.wait(timeout=120)
            return True
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out waiting for the kill point")


def _read(path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.slow
def test_killed_or_interrupted_at_every_stage_then_the_rerun_resumes(kill_data, tmp_path):
    """One kill-and-resume story, a different signal at each stage: SIGKILL (a crash: no
    handler runs), SIGINT (Ctrl-C: 130) and SIGTERM (143, e.g. a scheduler), each
    followed by the rerun the message promised."""
    workdir, cache_dir = tmp_path / "run", tmp_path / "cache"
    args = [os.path.join(ROOT, "train.py"), f"--data_dir={kill_data}", f"--workdir={workdir}",
            f"--cache_dir={cache_dir}", "--weights=none", "--noinclude_top", "--image_size=48",
            "--batch_size=2", "--val_size=8", "--epochs=2", "--finetune_epochs=6",
            "--patience=10", "--augment=keras_blog", "--cv_folds=0", "--scenarios=A,B",
            "--finetune_views=0", "--heads_memory_gb=0.0001", "--notensorboard",
            # The scenario is fine-tuned whatever the probe scores, and even when its head
            # already has validation AUC 1 (then only the loss can improve): the
            # fine-tuning is what step 3 interrupts.
            "--noprobe_baseline", "--monitor=loss"]
    logs = [open(tmp_path / f"log{i}.txt", "w+") for i in range(6)]

    def text(i):
        logs[i].seek(0)
        return logs[i].read()

    def partial_cache_with_rows():
        """True once the extraction has flushed a few batches into its partial file."""
        partials = list(cache_dir.glob("*.partial.h5")) if cache_dir.exists() else []
        try:
            with h5py.File(partials[0], "r", locking=False) as f:
                return int(f.attrs["rows_done"]) >= 4
        except Exception:  # not there yet, or caught mid-write: poll again
            return False

    # 1. SIGKILL during extraction: no finished cache exists, only the partial one.
    assert _kill_when(_popen(logs[0], *args), partial_cache_with_rows, delay=0.0)
    assert not [p for p in os.listdir(cache_dir) if p.endswith(".h5")
                and not p.endswith(".partial.h5")]
    # 2. Rerun: resumes the extraction; Ctrl-C during the heads stage (features streamed
    #    from the cache): 130, one paragraph, what a rerun does.
    proc = _popen(logs[1], *args)
    assert _kill_when(proc, lambda: (workdir / "heads" / "A.weights.h5").exists(),
                      delay=0.0, sig=signal.SIGINT)
    assert proc.returncode == 130, text(1)[-3000:]
    assert "Resuming the interrupted extraction" in text(1)
    assert "streaming batches from the HDF5 cache" in text(1)
    assert "interrupted (Ctrl-C / SIGINT)" in text(1) and "repeat the heads stage" in text(1)
    assert "Traceback" not in text(1)
    finished = [p for p in os.listdir(cache_dir) if p.endswith(".h5")]
    assert len(finished) == 1 and not finished[0].endswith(".partial.h5")
    # 3. Rerun: cache hit, heads from scratch; SIGTERM during fine-tuning after a
    #    checkpoint: 143, and the hint names the epoch to continue from.
    proc = _popen(logs[2], *args)
    folder = workdir / "finetune"
    assert _kill_when(proc, lambda: checkpoint_epoch(folder) >= 1, delay=0.0,
                      sig=signal.SIGTERM)
    assert proc.returncode == 143, text(2)[-3000:]
    assert "Feature cache hit" in text(2)
    assert "continue the fine-tuning from epoch" in text(2) and "--resume" in text(2)
    epoch = checkpoint_epoch(folder)
    assert f"from epoch {epoch} " in text(2)
    assert not (workdir / "model.keras").exists()
    assert not list(workdir.rglob(".tmp-*"))
    # 4. The rerun the message promised: resume fine-tuning from that epoch and finish.
    proc = _popen(logs[3], *args, "--stage=finetune", "--resume", "--finetune_epochs=2")
    assert proc.wait(timeout=600) == 0, text(3)[-3000:]
    assert f"Resumed fine-tuning after epoch {epoch}" in text(3)
    assert (workdir / "model.keras").exists()
    # 5. SIGTERM during prediction: 143 and no CSV at all; the rerun writes every row.
    out = tmp_path / "pred.csv"
    pred = [os.path.join(ROOT, "predict.py"), f"--workdir={workdir}",
            f"--data_dir={kill_data}", f"--output={out}", "--batch_size=1", "--tta=8"]
    proc = _popen(logs[4], *pred)
    assert _kill_when(proc, lambda: "Predicting" in text(4), delay=0.5, sig=signal.SIGTERM)
    assert proc.returncode == 143, text(4)[-3000:]
    assert "interrupted (SIGTERM)" in text(4) and "predict again" in text(4)
    assert not out.exists() and not list(tmp_path.glob(".tmp-pred*"))
    assert _popen(logs[5], *pred).wait() == 0
    rows = pd.read_csv(out, dtype={"name": str})
    assert rows.name.tolist() == [str(i) for i in range(1, 21)]
    assert rows.invasive.between(0, 1).all()


_EXTRACT = """
import sys, json
sys.path.insert(0, {root!r})
from small_photo_classifier.features import backbone
from small_photo_classifier.features.store import cache
from small_photo_classifier.pipeline import discovery
ds = discovery.discover({data!r})
clf = backbone.build_classifier("none", False, 64, 0, backbone="vgg16")
spec = cache.CacheSpec("none(seed=0)", False, 64, "float16",
                       ds.data_dir, net=clf.net)
r = cache.ensure_features(clf, spec, ds.frame, {cache_dir!r}, cache.Extraction(2, progress=False))
print(json.dumps({{"computed": r.computed, "reused": r.reused, "path": r.path}}))
"""


@pytest.mark.slow
def test_two_runs_sharing_a_cache_dir_do_not_corrupt_it(kill_data, tmp_path):
    code = _EXTRACT.format(root=ROOT, data=str(kill_data), cache_dir=str(tmp_path / "c"))
    logs = [open(tmp_path / f"c{i}.txt", "w+") for i in range(2)]
    procs = [_popen(log, "-c", code) for log in logs]
    assert [p.wait() for p in procs] == [0, 0]
    import json
    results = []
    for log in logs:
        log.seek(0)
        results.append(json.loads(log.read().strip().splitlines()[-1]))
    assert sorted(r["computed"] for r in results) == [0, 48]  # one built, one waited and hit
    with h5py.File(results[0]["path"]) as f:
        assert int(f.attrs["rows_done"]) == 48
    # Everything in it passes its checksum.
    from small_photo_classifier.features.store import cache
    spec = cache.CacheSpec("none(seed=0)", False, 64, "float16",
                           str(kill_data), net=networks.VGG16)
    frame = discovery.discover(str(kill_data)).frame
    feats = cache.load_features(results[0]["path"], spec, frame, spec.layers)
    assert feats["block5_pool"].shape[0] == 48


def test_skipped_test_image_gets_no_number(kaggle_dir, tmp_path):
    from small_photo_classifier.features import backbone
    from small_photo_classifier.features.serve import inference
    (kaggle_dir / "test" / "3.jpg").write_bytes(b"")
    frame = discovery.discover_unlabelled(str(kaggle_dir))
    frame = scan.filter_bad_images(frame, 32, "skip", str(tmp_path / "bad.csv"), keep_rows=True)
    clf = backbone.build_classifier("none", False, 32, 0, backbone="vgg16")
    probs = inference.predict_frame(clf.model, frame, 32, 2, progress=False)[:, 0]
    assert len(probs) == len(frame) == 5
    assert np.isnan(probs[frame.name.tolist().index("3")])
    assert np.isfinite(np.delete(probs, frame.name.tolist().index("3"))).all()
    assert pd.read_csv(tmp_path / "bad.csv").path.str.endswith("3.jpg").all()
