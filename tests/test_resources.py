"""Resource limits: a full disk, SIGINT/SIGTERM, feature sets larger than memory."""

import errno
import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest


from small_photo_classifier.features import networks
from small_photo_classifier.pipeline import diskspace
from tests.conftest import said
from tests.test_finetune_predict import ROOT
from tests.test_reliability import _popen
from small_photo_classifier.features.store import cache

# Extraction in batches of 4, no progress bar: the tests' way of filling a cache.
QUIET = cache.Extraction(4, progress=False)


def _mount_tmpfs(path, size):
    """A real size-limited file system (needs root); False where it cannot be had."""
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """(folder on a 1 MB file system, whether it is real). Without root, the folder is
    ordinary and writes are made to fail by the scripts themselves (simulated)."""
    path = tmp_path / "small"
    real = os.geteuid() == 0 and _mount_tmpfs(path, "1m")
    yield path, real
    if real:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_the_estimate_names_what_where_how_much_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 5 << 20)
    with pytest.raises(diskspace.DiskSpaceError) as err:
        diskspace.check([("feature cache", 40 << 20, str(tmp_path / "cache")),
                         ("model", 1 << 20, str(tmp_path / "run"))],
                        advice="Use --cache_dtype=float16.")
    text = str(err.value)
    for part in ("feature cache 40.0 MB", str(tmp_path / "cache"), "5.0 MB is free",
                 "--cache_dtype=float16", "mounted at"):
        assert part in text, part
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 50 << 20)
    diskspace.check([("small", 1 << 20, str(tmp_path))])  # fits: no error


def test_disk_full_is_recognised_from_oserror_and_from_hdf5_text():
    assert diskspace.disk_full_error(OSError(errno.ENOSPC, "No space", "/x/a.csv")) == "/x/a.csv"
    assert diskspace.disk_full_error(OSError(errno.EDQUOT, "quota")) == ""
    hdf5 = RuntimeError("Unable to flush file (file write failed: filename = '/c/f.h5', "
                        "file descriptor = 5, errno = 28, error message = 'No space left')")
    assert diskspace.disk_full_error(hdf5) == "/c/f.h5"
    assert diskspace.disk_full_error(ValueError("bad")) is None


_EXTRACT_ON_SMALL_DISK = r"""
import errno, json, os, sys
from small_photo_classifier.pipeline import diskspace
from small_photo_classifier.workflow.base import console as cli
from small_photo_classifier.features import backbone
from small_photo_classifier.features.store import cache
from small_photo_classifier.pipeline import discovery
cache_dir, real, guard = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
if not guard:
    diskspace.ensure_room = lambda *a, **k: None   # let the HDF5 write itself fail
if not real:  # no size-limited file system: fail the 5th batch's flush as ENOSPC would
    import h5py
    calls = {"n": 0}
    flush = h5py.File.flush
    def failing_flush(self):
        calls["n"] += 1
        if calls["n"] > 8:
            raise RuntimeError(f"Unable to synchronously flush file (file write failed: "
                               f"filename = '{self.filename}', errno = 28, error message = "
                               "'No space left on device')")
        return flush(self)
    h5py.File.flush = failing_flush
    if guard:
        real_free = diskspace.free_bytes
        diskspace.free_bytes = lambda p: 1 << 20
ds = discovery.discover(sys.argv[4])
clf = backbone.build_classifier("none", False, 64, 0, backbone="vgg16")
spec = cache.CacheSpec("none(seed=0)", False, 64, data_dir=ds.data_dir, net=clf.net)
with cli.user_errors():
    r = cache.ensure_features(clf, spec, ds.frame, cache_dir, cache.Extraction(4, progress=False))
    print(json.dumps({"computed": r.computed, "reused": r.reused}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("guard", [True, False], ids=["stopped-before-full", "write-failed"])
def test_cache_on_a_full_disk_ends_cleanly_and_resumes(small_fs, kill_data, tmp_path, guard):
    folder, real = small_fs
    script = tmp_path / "extract.py"
    script.write_text(_EXTRACT_ON_SMALL_DISK)
    log = open(tmp_path / "log.txt", "w+")
    proc = _popen(log, str(script), str(folder), "1" if real else "0", "1" if guard else "0",
                  str(kill_data))
    code = proc.wait(timeout=300)
    log.seek(0)
    text = log.read()
    # One paragraph, the file and the file system named, never a traceback or a crash.
    assert code == (2 if guard else 3), text[-3000:]
    assert "Traceback" not in text and "Segmentation" not in text, text[-3000:]
    assert ".partial.h5" in text and "rerun" in text.lower()
    assert ("almost full" if guard else "is full") in said(text)
    partial = [p for p in os.listdir(folder) if p.endswith(".partial.h5")]
    assert len(partial) == 1 and not [p for p in os.listdir(folder)
                                      if p.endswith(".h5") and "partial" not in p]
    # Move the committed rows to a bigger disk: the rerun computes only the rest.
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    for name in os.listdir(folder):
        with open(folder / name, "rb") as src, open(bigger / name, "wb") as dst:
            dst.write(src.read())
    with h5py.File(bigger / partial[0], "r") as f:
        committed = int(f.attrs["rows_done"])
    # On a 1 MB disk the guard stops before the first batch (nothing to resume from); a
    # write that failed keeps every batch flushed before it, and the rerun reuses them.
    assert committed == 0 if guard else committed > 0
    from small_photo_classifier.features import backbone
    from small_photo_classifier.features.store import cache
    from small_photo_classifier.pipeline import discovery
    ds = discovery.discover(str(kill_data))
    spec = cache.CacheSpec("none(seed=0)", False, 64, data_dir=ds.data_dir, net=networks.VGG16)
    result = cache.ensure_features(backbone.build_classifier("none", False, 64, 0,
                                                             backbone="vgg16"), spec, ds.frame,
                                   str(bigger), QUIET)
    assert (result.computed, result.reused) == (48 - committed, committed)


_WRITERS = r"""
import errno, json, os, sys, glob
import numpy as np, pandas as pd
from small_photo_classifier.pipeline import diskspace
from small_photo_classifier.pipeline.atomic import atomic_write_text
folder, real = sys.argv[1], sys.argv[2] == "1"
if real:  # fill the file system to the last byte
    with open(os.path.join(folder, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
else:  # no size-limited file system here: a file-size limit makes the first big write of
    # every writer fail (EFBIG, reported like a full disk), also writes made from C++
    # (HDF5, TensorFlow checkpoints) that no Python-level patch could reach.
    import resource, signal
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (its font cache is written before the limit)
    matplotlib.font_manager.findfont("DejaVu Sans")
from small_photo_classifier.features import backbone
from small_photo_classifier.features.fit import checkpoint, finetune
from small_photo_classifier.features.serve import inference
from small_photo_classifier.workflow.base import outputs
from small_photo_classifier.workflow.views import plots

clf = backbone.build_classifier("none", False, 32, 0, backbone="vgg16")
clf.model.compile(optimizer="adam", loss="binary_crossentropy")
clf.model.optimizer.build(clf.model.trainable_variables)
if not real:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
writers = {
    "csv": lambda p: outputs.write_csv(pd.DataFrame({"a": range(100000)}), p + ".csv"),
    "json": lambda p: outputs.write_json(p + ".json", {"x": "y" * 10_000_000}),
    "predictions": lambda p: outputs.write_predictions(
        [str(i) for i in range(100000)], np.zeros(100000), p + ".csv", ("0", "1")),
    "plot": lambda p: plots.roc(np.arange(10) % 2, np.linspace(0, 1, 10), ("0", "1"),
                                p + ".png", "ROC"),
    "model": lambda p: inference.export_model(clf.model, p, {"image_size": 32}),
    "best_weights": lambda p: checkpoint.Checkpointer(
        p, clf.model, clf.model.optimizer).set_baseline({"val_auc": 0.5}),
    "checkpoint": lambda p: checkpoint.Checkpointer(p, clf.model, clf.model.optimizer)._commit(1),
}
results = {}
for name, write in writers.items():
    target = os.path.join(folder, name)
    try:
        write(target)
        results[name] = "written"
    except Exception as err:
        results[name] = diskspace.disk_full_error(err)
    left = [os.path.basename(p) for p in glob.glob(os.path.join(folder, "**", "*"),
                                                   recursive=True) if "filler" not in p]
    results[name + "_left"] = left
print(json.dumps(results))
sys.stdout.flush()
os._exit(0)  # HDF5 that failed to write must not flush at exit
"""


@pytest.mark.slow
def test_every_writer_fails_cleanly_on_a_full_disk(small_fs, tmp_path):
    folder, real = small_fs
    result = subprocess.run([sys.executable, "-c", _WRITERS, str(folder), "1" if real else "0"],
                            capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("csv", "json", "predictions", "plot", "model", "best_weights", "checkpoint"):
        assert out[name] is not None and out[name] != "written", (name, out[name])
        # Nothing is left under a final name, nor as a temporary file: the checkpoint
        # folder may hold TensorFlow's partial data files, but never the "checkpoint"
        # state file that would make a resume read them.
        leftovers = [p for p in out[name + "_left"]
                     if not os.path.isdir(os.path.join(folder, p))]
        assert not [p for p in out[name + "_left"] if p.endswith("_temp") or "tempstate" in p
                    ], (name, out[name + "_left"])  # TensorFlow's temporary files
        assert not [p for p in leftovers if p.startswith(name) or p.startswith(".tmp-")
                    or p.endswith(".tmp") or p.startswith("best-")], (name, out[name + "_left"])


# --- feature sets larger than memory ------------------------------------------------

@pytest.mark.slow
def test_streamed_heads_equal_in_memory_heads(tmp_path):
    from small_photo_classifier.features import backbone, task
    from small_photo_classifier.features.store import cache, rows
    from small_photo_classifier.features.choose import cv, probe
    from small_photo_classifier.features.fit import heads
    from small_photo_classifier.features.fit.settings import FitSettings
    from small_photo_classifier.pipeline import discovery, split
    from tests.conftest import colour_image, write_image
    for i in range(16):
        write_image(str(tmp_path / "data" / ("pos" if i % 2 else "neg") / f"img{i}.jpg"),
                    colour_image(i % 2, size=36, seed=i))
    ds = discovery.discover(str(tmp_path / "data"), positive_class="pos")
    train, val = split.split_train_val(ds.frame, 4, seed=0)
    clf = backbone.build_classifier("none", include_top=False, image_size=32, seed=0,
                                    backbone="vgg16")
    spec = cache.CacheSpec("none(seed=0)", False, 32, data_dir=ds.data_dir, net=networks.VGG16)
    path = cache.ensure_features(clf, spec, ds.frame, str(tmp_path / "c"), QUIET).path
    aug = cache.CacheSpec(**{**spec.__dict__, "augment": "keras_blog"})
    aug_path = cache.ensure_features(clf, aug, train, str(tmp_path / "c"), QUIET, views=2).path
    y_tr, y_va = train.label.to_numpy(), val.label.to_numpy()
    folds = cv.make_folds(y_tr, 2, 0)
    runs = {}
    for stream in (False, True):
        tr = cache.load_features(path, spec, train, spec.layers, stream=stream)
        va = cache.load_features(path, spec, val, spec.layers, stream=stream)
        views = cache.load_features(aug_path, aug, train, spec.layers, views=2, stream=stream)
        assert isinstance(tr["block4_pool"], rows.H5Rows) == stream
        results = heads.train_scenarios(clf, ["A", "B"], task.binary(),
                                        heads.FeatureSplit(tr, y_tr, views, folds),
                                        heads.FeatureSplit(va, y_va),
                                        FitSettings(2, 4, progress=False))
        runs[stream] = (results, probe.pooled(tr["block5_pool"]))
    (mem, pooled_mem), (streamed, pooled_streamed) = runs[False], runs[True]
    np.testing.assert_allclose(pooled_streamed, pooled_mem, rtol=1e-6)
    for s in ("A", "B"):  # same batches in the same order: equal up to float rounding
        assert streamed[s].best_epoch == mem[s].best_epoch
        np.testing.assert_allclose(streamed[s].cv.curves, mem[s].cv.curves, atol=1e-6)
    # Only the CV-best scenario is fitted on the whole split: the same one, the same way.
    best = heads.best_result(mem).scenario
    assert heads.best_result(streamed).scenario == best and mem[best].fitted
    np.testing.assert_allclose(streamed[best].val_probs, mem[best].val_probs, atol=1e-5)


def test_h5rows_reads_rows_in_the_order_asked(tmp_path):
    from small_photo_classifier.features.store.rows import H5Rows
    path = str(tmp_path / "f.h5")
    with h5py.File(path, "w") as f:
        f["a"] = np.arange(20, dtype=np.float32).reshape(10, 2)
        f["b"] = 100 + np.arange(20, dtype=np.float32).reshape(10, 2)
    a = H5Rows([(path, "a")], np.zeros(10), np.arange(10))
    b = H5Rows([(path, "b")], np.zeros(10), np.arange(10))
    both = H5Rows.concat([a.take([7, 1, 1]), b.take([0])])
    assert len(both) == 4 and both.shape == (4, 2)
    np.testing.assert_array_equal(both[[3, 0, 2]], [[100, 101], [14, 15], [2, 3]])
    np.testing.assert_array_equal(both[1:3], [[2, 3], [2, 3]])


# --- interrupts ------------------------------------------------------------------------

@pytest.mark.parametrize("kind,status,words", [
    ("Terminated", 143, "interrupted (SIGTERM)"),
    ("KeyboardInterrupt", 130, "interrupted (Ctrl-C / SIGINT)")])
def test_an_interrupt_wrapped_by_c_code_is_still_an_interrupt(capsys, kind, status, words):
    # A signal handler that raises while numpy's C code runs comes out as SystemError
    # ("returned a result with an exception set") caused by the interrupt (seen in CI).
    from small_photo_classifier.workflow.base import console
    interrupt = console.Terminated if kind == "Terminated" else KeyboardInterrupt

    class Raises:
        def __array__(self, dtype=None, copy=None):
            raise interrupt()

    with pytest.raises(SystemExit) as stop:
        with console.user_errors():
            try:
                np.asarray(Raises())
            except interrupt as err:  # numpy passes it through: wrap it as CPython does
                raise SystemError("<built-in method __array__> returned a result with an "
                                  "exception set") from err
    assert stop.value.code == status
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("signum,status,words", [
    (signal.SIGTERM, 143, "interrupted (SIGTERM)"),
    (signal.SIGINT, 130, "interrupted (Ctrl-C / SIGINT)")])
def test_an_interrupt_re_raised_from_none_is_still_an_interrupt(capsys, monkeypatch, signum,
                                                                 status, words):
    # TensorFlow's error handler re-raises the SystemError `from None` (seen in CI): the
    # interrupt is gone from the chain, but the process did receive the signal.
    from small_photo_classifier.workflow.base import console
    monkeypatch.setattr(console, "_RECEIVED", [])
    # Python's own Ctrl-C handler, as a user's terminal has it: a test worker may have
    # been started with SIGINT ignored or handled (then the tool leaves it alone, and
    # this test would call that handler instead of the tool's).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as stop:
            with console.user_errors():
                try:
                    signal.getsignal(signum)(signum, None)  # what the signal's arrival runs
                except BaseException:
                    raise SystemError("returned a result with an exception set") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stop.value.code == status
    assert words in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not console._on_sigterm  # put back


def test_atomic_link_names_one_file_twice_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from small_photo_classifier.pipeline.atomic import atomic_link
    src, dst = tmp_path / "heads" / "B.keras", tmp_path / "bag.keras"
    src.parent.mkdir()
    src.write_bytes(b"members")
    dst.write_bytes(b"a bag from another run")
    atomic_link(str(src), str(dst))
    assert os.path.samefile(src, dst) and dst.read_bytes() == b"members"
    atomic_link(str(src), str(dst))  # again, as a rerun of the export does
    src.with_name("new").write_bytes(b"new members")
    os.replace(src.with_name("new"), src)  # the heads stage renames a new file into place
    assert dst.read_bytes() == b"members"  # the exported name is not changed under it
    atomic_link(str(src), str(dst))
    assert dst.read_bytes() == b"new members"
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links")))
    atomic_link(str(dst), str(tmp_path / "copy.keras"))  # a copy where links fail
    assert (tmp_path / "copy.keras").read_bytes() == b"new members"
    left = [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    assert not left, left


def test_each_stage_records_its_own_time_and_peak_memory():
    import time
    from small_photo_classifier.workflow.base import clock as clock_lib
    clock = clock_lib.StageClock()
    with clock.stage(clock_lib.TOTAL):
        with clock.stage("small"):
            np.ones(1000).sum()
            time.sleep(0.02)
        with clock.stage("large"):
            block = np.ones((300 << 20) // 8)  # 300 MB, touched
            block.sum()
            # Held for ten sampling intervals: in a worker whose peak an earlier test
            # already set, the stage's figure is what the 20 ms sampler saw.
            time.sleep(10 * clock_lib.SAMPLE_SECONDS)
            del block
        with clock.stage("small again"):
            np.ones(1000).sum()
            time.sleep(0.02)
    record = clock.record()
    peaks = record["peak_memory_mb"]
    assert list(record["timings"]) == ["small", "large", "small again", "total"]
    # metrics.json sorts its keys; the report shows the stages in the order they ran.
    assert record["stage_order"] == ["small", "large", "small again", "total"]
    from small_photo_classifier.workflow.views import report
    stored = json.loads(json.dumps(record, sort_keys=True))
    page = report._timings_section(stored)
    assert [page.index(f">{k}<") for k in record["stage_order"]] == sorted(
        page.index(f">{k}<") for k in record["stage_order"])
    assert all(v > 0 for v in record["timings"].values())
    assert peaks["total"] == max(peaks.values())
    if clock.sampled:  # Linux: each stage's own peak, not the largest so far
        assert peaks["large"] >= peaks["small"] + 250
        assert peaks["small again"] < peaks["large"] - 250
    else:
        assert peaks["small again"] >= peaks["large"]
    assert "large" in clock.table() and record["peak_memory_is"]
    # What /usr/bin/time and a parent's wait4 read (the kernel's peak) is left alone.
    assert clock_lib.peak_so_far_mb() >= peaks["large"] - 1
