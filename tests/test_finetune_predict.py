"""Second stage: fine-tuning with checkpoints/resume, export, safe loading, prediction."""

import csv
import json
import os
import re
import subprocess
import sys

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from small_photo_classifier.features import backbone, networks
from small_photo_classifier.features.fit import checkpoint, finetune
from small_photo_classifier.features.serve import inference
from small_photo_classifier.features.fit.settings import FinetuneSettings
from small_photo_classifier.features import task as task_lib
from small_photo_classifier.pipeline import augment, discovery
from small_photo_classifier.pipeline import split as split_lib
from small_photo_classifier.pipeline import input as input_lib
from tests.conftest import said, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
BINARY = task_lib.binary()


def _run(script, *args, cwd=None, env=None):
    # No TF_CPP_MIN_LOG_LEVEL: the scripts must keep TensorFlow quiet by themselves.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture
def split(kaggle_dir):
    ds = discovery.discover(str(kaggle_dir))
    return split_lib.split_train_val(ds.frame, 4, seed=0)


@pytest.mark.slow
def test_finetune_writes_checkpoints_and_resume_continues(split, tmp_path):
    train, val = split
    workdir = str(tmp_path / "run")
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    settings = FinetuneSettings(epochs=2, image_size=SIZE, batch_size=4, learning_rate=1e-4,
                                augment="keras_blog", patience=10, monitor="auc")
    blocks = ["block5", "fc", "predictions"]
    first = finetune.finetune(clf, blocks, BINARY, train, val, settings, workdir=workdir)
    assert first["epochs_run"] == 2 and first["resumed_from_epoch"] == 0
    folder = os.path.join(workdir, "finetune")
    assert "ckpt-2" in open(os.path.join(folder, checkpoint.CHECKPOINT_FILE)).read()
    assert os.path.isfile(os.path.join(folder, f"best-{first['best_epoch']:06d}.index"))
    # The state after epoch 2, as a fresh process would find it.
    ref = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=5,
                                    backbone="vgg16")
    import tensorflow as tf
    tf.train.Checkpoint(weights=list(ref.model.weights)).read(
        tf.train.latest_checkpoint(folder)).expect_partial()

    # A fresh process would start from a new classifier: resume must load epoch 2's
    # weights and optimizer state, and run only epoch 3.
    clf2 = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=5,
                                     backbone="vgg16")
    seen = {}

    class Spy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["kernel"] = clf2.head.get_layer("predictions").kernel.numpy().copy()
            seen["iterations"] = int(self.model.optimizer.iterations.numpy())  # the model fit

    real_fit = keras.Model.fit

    def fit_with_spy(self, *args, callbacks=(), **kw):
        return real_fit(self, *args, callbacks=[Spy(), *callbacks], **kw)

    keras.Model.fit = fit_with_spy
    try:
        second = finetune.finetune(clf2, blocks, BINARY, train, val,
                                   settings.replace(epochs=3, resume=True), workdir=workdir)
    finally:
        keras.Model.fit = real_fit
    np.testing.assert_array_equal(seen["kernel"],
                                  ref.head.get_layer("predictions").kernel.numpy())
    assert seen["iterations"] == 2 * 2  # 2 epochs x 2 steps (8 train images / batch 4)
    assert second["resumed_from_epoch"] == 2 and second["epochs_run"] == 3
    assert list(second["history"].epoch) == [0, 1, 2, 3]  # epoch 0 = the starting head

    # Without --resume a run starts clean.
    third = finetune.finetune(clf2, ["fc", "predictions"], BINARY, train, val,
                              settings.replace(epochs=1), workdir=workdir)
    assert third["resumed_from_epoch"] == 0 and third["epochs_run"] == 1


@pytest.mark.slow
def test_augmentation_inside_the_model_reaches_training_and_is_not_exported(split, tmp_path):
    train, val = split
    images = np.random.default_rng(0).normal(0, 50, (2, SIZE, SIZE, 3)).astype("float32")
    layer = augment.Augment("aggressive", seed=0)
    assert not np.allclose(layer(images, training=True), images)  # changes training inputs
    np.testing.assert_array_equal(layer(images, training=False), images)  # identity otherwise
    weights = {}
    for preset in ("none", "aggressive"):
        clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                        backbone="vgg16")
        out = finetune.finetune(clf, ["fc", "predictions"], BINARY, train, val,
                                FinetuneSettings(epochs=1, image_size=SIZE, batch_size=4,
                                                 learning_rate=1e-2, augment=preset,
                                                 augment_on="model", patience=2,
                                                 monitor="loss"),
                                workdir=str(tmp_path / preset))
        assert out["epochs_run"] == 1
        # the trained epoch, whether or not it beat epoch 0
        import tensorflow as tf
        tf.train.Checkpoint(weights=list(clf.model.weights)).read(tf.train.latest_checkpoint(
            str(tmp_path / preset / "finetune"))).expect_partial()
        weights[preset] = clf.head.get_layer("fc1").kernel.numpy()
        classes = {l.__class__.__name__ for l in clf.model._flatten_layers()}
        assert "Augment" not in classes and "Lambda" not in classes
    # Same seed, same data: only the in-model augmentation can make the weights differ.
    assert not np.allclose(weights["none"], weights["aggressive"])


def test_export_loads_in_safe_mode_and_predicts_identically(split, tmp_path):
    train, _ = split
    # The guard is real: safe mode refuses a model that carries Python code.
    inputs = keras.Input((3,))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    unsafe.save(str(tmp_path / "unsafe.keras"))
    with pytest.raises(ValueError, match="(?i)lambda|unsafe|safe_mode"):
        keras.models.load_model(str(tmp_path / "unsafe.keras"), safe_mode=True)

    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    clf.head.get_layer("predictions").bias.assign([0.3])
    inference.export_model(clf.model, str(tmp_path), {"image_size": SIZE,
                                                      "positive_class": "1"})
    model, info = inference.load_exported(str(tmp_path))
    assert info["image_size"] == SIZE
    paths, names_ = train.path.tolist(), train.name.tolist()
    direct = inference.predict_paths(clf.model, paths, names_, SIZE, 3, progress=False)[:, 0]
    exported = inference.predict_paths(model, paths, names_, SIZE, 5, progress=False)[:, 0]
    np.testing.assert_allclose(direct, exported, atol=1e-6)
    # tta=2 is the mean of the plain and the mirrored image, computed here by hand.
    mirror = inference.predict_paths(model, paths, names_, SIZE, 3, tta=2, progress=False)[:, 0]
    batch = np.concatenate([b["image"].numpy() for b in input_lib.eval_dataset(
        paths, None, names_, SIZE, 4)])
    by_hand = (model.predict(batch, verbose=0)[:, 0] +
               model.predict(batch[:, :, ::-1], verbose=0)[:, 0]) / 2
    np.testing.assert_allclose(mirror, by_hand, atol=1e-5)
    assert not np.allclose(mirror, direct)


def test_held_out_outputs_from_cached_features_equal_the_whole_network(split, tmp_path,
                                                                       monkeypatch):
    """The export validates its models (single, bag, probe; 1 or 2 views) from the cached
    features of the validation images instead of running them through the frozen layers
    again: the outputs must equal the whole network's, view for view."""
    from small_photo_classifier.features.choose import bag as bag_lib
    from small_photo_classifier.features.store import cache as cache_lib
    train, _ = split
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    spec = cache_lib.CacheSpec("none(seed=0)", False, SIZE, net=networks.VGG16)
    feats, _ = cache_lib.load(clf, spec, train, str(tmp_path / "cache"),
                              cache_lib.Extraction(4, progress=False))
    paths, names_ = train.path.tolist(), train.name.tolist()
    held = inference.HeldOut(clf, paths, SIZE, 4, cached={k: np.asarray(v)
                                                           for k, v in feats.items()})
    from small_photo_classifier.features.store import extract
    calls, extractor = [], extract.extractor  # every pass through the frozen layers

    def spy(classifier, layers):
        run = extractor(classifier, layers)

        def counted(images):
            calls.append(int(images.shape[0]))
            return run(images)
        return counted
    monkeypatch.setattr(extract, "extractor", spy)
    for layer in ("block4_pool", "block5_pool"):
        for tta in (1, 2):
            whole = inference.predict_paths(clf.model, paths, names_, SIZE, 4, tta,
                                            progress=False)
            above = held.outputs(clf.model_from(layer), layer, tta)
            np.testing.assert_allclose(above, whole, atol=1e-5, err_msg=f"{layer} tta={tta}")
    # The mirrored view went through the frozen layers once, for both layers, then was
    # reused: one pass over the images.
    assert {k for k in held._features} == {("block4_pool", 0), ("block5_pool", 0),
                                           ("block4_pool", 1), ("block5_pool", 1)}
    assert sum(calls) == len(paths)
    # A bag (two fold heads that differ from the model) above block5_pool.
    blocks = ["fc", "predictions"]
    part = clf.model_from("block5_pool")  # fc1 and predictions: all trainable in B
    members = bag_lib.members_model(clf, blocks, [
        bag_lib.as_member(clf, blocks, [w + 0.01 * (k + 1) for w in part.get_weights()])
        for k in range(2)])
    start = bag_lib.member_start(clf, blocks)
    whole = inference.predict_paths(bag_lib.assemble(clf, start, members), paths, names_,
                                    SIZE, 4, 2, progress=False)
    assert start == "flatten"  # not a cached layer: derived from block5_pool's features
    above = held.outputs(bag_lib.on_features(clf, start, members), start, 2)
    np.testing.assert_allclose(above, whole, atol=1e-5)
    # Still no image went through the frozen layers again: both views of flatten came from
    # block5_pool's (cached, and mirrored once above).
    assert ("flatten", 1) in held._features
    assert sum(calls) == len(paths)  # the mirrored view, once


def test_tta_views_are_deterministic_and_first_is_identity():
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    views = inference.tta_views(x, 8)
    again = inference.tta_views(x, 8)
    assert len(views) == 8 and all(v.shape == x.shape for v in views)
    for a, b in zip(views, again):  # the same views every time: no random crops
        np.testing.assert_array_equal(a, b)
    assert len({np.asarray(v).tobytes() for v in views}) == 8  # and all different
    np.testing.assert_array_equal(views[0], x)
    np.testing.assert_array_equal(views[1], x[:, :, ::-1])
    with pytest.raises(Exception, match="--tta"):
        inference.check_tta(9)
    from small_photo_classifier.workflow.base import config
    with pytest.raises(Exception, match="--tta"):
        config.parse_tta(0)


def test_prediction_order_follows_sample_submission_then_natural_order(tmp_path):
    root = tmp_path / "k"
    for i in (1, 2, 10, 11):
        write_image(str(root / "test" / f"{i}.jpg"), size=8, seed=i)
    (root / "sample_submission.csv").write_text("name,invasive\n11,0.5\n2,0.5\n10,0.5\n1,0.5\n")
    assert discovery.discover_unlabelled(str(root)).name.tolist() == ["11", "2", "10", "1"]
    os.remove(root / "sample_submission.csv")
    assert discovery.discover_unlabelled(str(root)).name.tolist() == ["1", "2", "10", "11"]
    assert discovery.discover_unlabelled(str(root / "test")).name.tolist() == ["1", "2", "10",
                                                                               "11"]
    (root / "sample_submission.csv").write_text("name,invasive\n1,0.5\n3,0.5\n")
    with pytest.raises(Exception, match="line 3: '3'"):
        discovery.discover_unlabelled(str(root))


def test_labels_scoring_matches_sklearn(tmp_path):
    names = [str(i) for i in range(1, 9)]
    probs = np.array([0.1, 0.8, 0.4, 0.35, 0.9, 0.2, 0.6, 0.7])
    labels = [0, 1, 0, 1, 1, 0, 0, 1]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("name,invasive\n" + "".join(f"{n},{l}\n" for n, l in zip(names, labels)))
    png = str(tmp_path / "roc.png")
    from small_photo_classifier.workflow.views import plots
    from small_photo_classifier.workflow.use import predicting
    scores = predicting.score_against_labels(names, probs, str(csv_path), BINARY)
    assert scores["auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert scores["accuracy"] == pytest.approx(np.mean((probs >= 0.5) == np.array(labels)))
    assert scores["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    plots.roc(labels, probs, ("0", "1"), png, "ROC")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # The legend's AUC is the reported one, to the same 4 decimals.
    figure = plots.roc_figure(labels, probs, ("0", "1"), "ROC")
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    import matplotlib.pyplot as plt
    plt.close(figure)
    assert legend == [f"P(1) (AUC {scores['auc']:.4f})"]


@pytest.mark.slow
def test_round_trip_through_the_scripts(kaggle_dir, tmp_path):
    workdir = tmp_path / "run"
    common = [f"--data_dir={kaggle_dir}", f"--workdir={workdir}", "--weights=none",
              "--noinclude_top", f"--image_size={SIZE}", "--val_size=4", "--batch_size=4",
              f"--cache_dir={tmp_path / 'cache'}", "--epochs=2", "--finetune_epochs=1",
              "--scenarios=A,C", "--augment=keras_blog", "--cv_folds=2",
              # The fine-tuning path, whatever the probe scores, and even when a head
              # already has validation AUC 1 (then only the loss can improve).
              "--noprobe_baseline", "--monitor=loss"]
    result = _run("train.py", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model.keras", "model_info.json", "metrics.json", "split.csv",
                 "heads/A/history.csv", "heads/C/history.csv", "heads_comparison.png",
                 "history_finetune.csv", "finetune_history.png", "submission.csv",
                 "confusion_matrix.png", "roc.png",
                 "top_losses.png", "bag.keras"):
        assert (workdir / name).is_file(), name
    metrics = json.loads((workdir / "metrics.json").read_text())
    # Only the scenario CV ranks first is fitted on the whole split (and fine-tuned).
    tuned = metrics["finetune"]["scenario"]
    # Its head's plots are in a folder named for it, never beside the exported model's.
    for name in ("confusion_matrix.png", "roc.png", "top_losses.png"):
        assert (workdir / "heads" / tuned / name).is_file() and \
            not (workdir / "heads" / name).exists(), name
    # Every file the run wrote is one the README's table names, and the console listed it.
    from small_photo_classifier.workflow.base import run_files
    listed = result.stdout[result.stdout.index("Outputs in"):]
    for entry in sorted(os.listdir(workdir)):
        assert run_files.role(entry), f"{entry}: not in workflow/base/run_files.py"
        assert f" {entry}" in listed, f"{entry} not listed on the console"
    assert set(metrics["heads"]) == {"A", "C"} and tuned in ("A", "C")
    assert [s for s in "AC" if metrics["heads"][s]["fitted"]] == [tuned]
    # Kept files hold weights only: no optimizer moments from training (2x the head).
    for name in ("model.keras", "bag.keras", f"heads/{tuned}.weights.h5"):
        assert not _optimizer_state(workdir / name), name
    for board in (f"heads_{tuned}", "finetune"):
        events = list((workdir / "tensorboard" / board).rglob("events.out.tfevents.*"))
        assert events and all(e.stat().st_size > 0 for e in events), board
    assert set(metrics["cross_validation"]) == {"A", "C"}
    assert len(metrics["cross_validation"]["C"]["fold_aucs"]) == 2
    # A and C start above a cached layer: fine-tuned from 5 cached views (the default),
    # and the stage's seconds include extracting them.
    assert metrics["finetune"]["views"] == 5
    assert metrics["finetune"]["seconds"] >= metrics["finetune"]["fit_seconds"]
    # The views hold the one layer the tuned blocks train from, not every cached layer.
    start = {"A": "block5_pool", "C": "block4_pool"}[tuned]
    view_files = [f for f in os.listdir(tmp_path / "cache")
                  if "-aug_" in f and f.endswith(".h5")]
    assert len(view_files) == 1, view_files
    split = pd.read_csv(workdir / "split.csv")
    # (The refit fine-tunes on every labelled image when the validation run kept an epoch.)
    refit_tuned = metrics["finetune"].get("refit", {}).get("finetune_epochs", 0) > 0
    trained_on = split if refit_tuned else split[split.subset == "train"]
    with h5py.File(tmp_path / "cache" / view_files[0], "r") as views_file:
        assert views_file.attrs["layers"] == start and start in views_file
        assert views_file[start].shape[0] == 5 * len(trained_on)
    resolved = json.loads((workdir / "run_config.json").read_text())["precision_resolved"]
    assert resolved["policy"] in ("float32", "mixed_bfloat16") and resolved["reason"]
    history = pd.read_csv(workdir / "heads" / tuned / "history.csv")
    assert list(history.columns[:7]) == ["epoch", "loss", "accuracy", "auc", "val_loss",
                                         "val_accuracy", "val_auc"]
    assert {"cv_auc", "cv_auc_std"} <= set(history.columns)  # what ranked the scenarios
    assert "Outputs in" in result.stdout and "submission" in result.stdout
    # Every stage's seconds and peak memory: metrics.json, the console's last lines, and
    # the report (check_report below compares each number on the page with metrics.json).
    stages, peaks = metrics["timings"], metrics["peak_memory_mb"]
    assert {"start-up and data check", "feature cache (extraction or reuse)",
            "linear probe (choice by CV, fit)", "scenarios on cached features",
            "final model (fine-tuning, output choice, export)", "test-set prediction"} \
        < set(stages) and list(stages)[-1] == "total" and set(peaks) == set(stages)
    assert all(stages[k] > 0 and peaks[k] > 0 for k in stages), (stages, peaks)
    assert peaks["total"] == max(peaks.values())
    last_lines = result.stdout[result.stdout.index("Time and peak memory (RSS) by stage"):]
    for stage in stages:
        assert re.search(rf"^  {re.escape(stage)} +[0-9.]+ +[0-9.]+ GB$", last_lines, re.M)
    assert 'data-metric="peak_memory_mb/total"' in (workdir / "report.html").read_text()
    check_console(result, (workdir / "train.log").read_text(), summary_in_log=True)
    # Comparison, fine-tuning history, confusion matrix, ROC, top losses; suspect labels
    # when there are any.
    # No empty table: suspect_labels.csv exists exactly when the audit found some.
    suspects = metrics["label_audit"]["suspect_labels"]
    assert (workdir / "suspect_labels.csv").is_file() == (suspects > 0)
    if suspects:
        assert len(pd.read_csv(workdir / "suspect_labels.csv")) == suspects
    assert ("none found" in result.stdout) == (
        not suspects or not metrics["label_audit"]["duplicate_pairs"])
    # + reliability.png and unfamiliar_scores.png (issue 30) when the export was calibrated:
    # on the head's out-of-fold predictions, which a kept fine-tuning epoch makes not this
    # model's (then 4 validation images are too few, and metrics.json says why).
    calibrated = "skipped" not in metrics["trust"]
    assert calibrated == (metrics["finetune"]["best_epoch"] == 0), metrics["trust"]
    # (The top losses' heatmaps only when the final model made mistakes.)
    heatmaps = (workdir / "top_losses_heatmaps.png").is_file()
    assert check_report(workdir / "report.html", metrics) == (5 + 2 * calibrated
                                                              + (suspects > 0) + heatmaps)

    out = tmp_path / "pred.csv"
    labels = tmp_path / "test_labels.csv"
    labels.write_text("name,invasive\n" + "".join(f"{i},{i % 2}\n" for i in range(1, 6)))
    result = _run("predict.py", f"--workdir={workdir}", f"--data_dir={kaggle_dir}",
                  f"--output={out}", "--tta=2", f"--labels={labels}", "--precision=float32")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["name", "invasive"]
    assert [r[0] for r in rows[1:]] == ["2", "5", "1", "4", "3"]  # sample submission order
    probs = np.array([float(r[1]) for r in rows[1:]])
    truth = [int(r[0]) % 2 for r in rows[1:]]
    assert f"ROC AUC {roc_auc_score(truth, probs):.4f}" in result.stdout
    for plot in ("pred_roc.png", "pred_confusion_matrix.png", "pred_top_losses.png"):
        assert open(tmp_path / plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n", plot
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    check_console(result, (tmp_path / "pred.log").read_text())
    scored = json.loads((tmp_path / "pred_metrics.json").read_text())
    assert scored["scores"]["auc"] == pytest.approx(roc_auc_score(truth, probs), abs=1e-6)
    # the three plots and (with an unfamiliar score: see above) the most unfamiliar photos
    assert check_report(tmp_path / "pred_report.html", scored) == 3 + calibrated


def _optimizer_state(path) -> list:
    """The optimizer variables saved in a .keras or .weights.h5 file."""
    import zipfile
    import h5py
    if str(path).endswith(".keras"):
        with zipfile.ZipFile(path) as z, z.open("model.weights.h5") as f, \
                h5py.File(f, "r") as h5:
            return _optimizer_paths(h5)
    with h5py.File(path, "r") as h5:
        return _optimizer_paths(h5)


def _optimizer_paths(h5) -> list:
    found = []
    h5.visit(lambda name: found.append(name) if "optimizer" in name.split("/") else None)
    return found


NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cuda drivers", "cuInit",
         "retracing", "Total params", "Layer (type)", "FutureWarning", "DeprecationWarning",
         "UserWarning")


def check_console(result, log_text: str, summary_in_log: bool = False) -> None:
    """What a person sees: no TensorFlow C++ start-up lines, no model summary, no
    retracing warnings, no progress-bar control characters on a pipe; and the log file
    holds every line the terminal showed (log lines in their long form)."""
    shown = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in shown, noise
    assert "\r" not in shown and "\x1b[" not in shown
    assert ("Total params" in log_text) == summary_in_log  # the summary went to the file
    import re
    for line in shown.splitlines():
        text = re.sub(r"^\d\d:\d\d:\d\d (warning: |error: )?", "", line).strip()
        if text:
            assert text in log_text, f"terminal line missing from the log: {line!r}"


def check_report(path, metrics: dict) -> int:
    """Parses a report page: it needs nothing from the network or a script, every image is
    an embedded PNG, and every number equals the JSON it names. Returns the image count."""
    import base64
    from html.parser import HTMLParser
    from small_photo_classifier.workflow.views import html as page_parts

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.numbers, self.key, self.scripts = [], [], None, 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.images.append(attrs["src"])
            if tag == "script" or tag == "link":
                self.scripts += 1
            self.key = attrs.get("data-metric", self.key if tag != "span" else None)

        def handle_data(self, data):
            if self.key is not None:
                self.numbers.append((self.key, data))
                self.key = None

    page = Page()
    page.feed(path.read_text())
    # No address to fetch from (base64 image data can spell "http", never "http:").
    assert page.scripts == 0 and not re.search(r"(?i)https?:", path.read_text())
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.numbers, "no number on the page"
    for key, text in page.numbers:
        value = page_parts.lookup(metrics, key)
        digits = len(text.split(".")[1]) if "." in text else 0
        assert float(text) == pytest.approx(value, abs=0.51 * 10 ** -digits), key
    return len(page.images)


@pytest.fixture(scope="module")
def no_tensorflow(tmp_path_factory):
    """PYTHONPATH under which importing TensorFlow fails loudly: a run that stops on a
    wrong flag must not pay TensorFlow's start-up first."""
    root = tmp_path_factory.mktemp("no_tf")
    (root / "tensorflow").mkdir()
    (root / "tensorflow" / "__init__.py").write_text(
        "raise ImportError('tensorflow was imported before the flags were checked')\n")
    return {"PYTHONPATH": os.pathsep.join([str(root), ROOT])}


@pytest.mark.parametrize("args, message", [
    ([], "--data_dir"),
    (["--data_dir=/nonexistent/folder"], "does not exist"),
    (["--data_dir={tmp}", "--weights=/nonexistent/w.h5"], "no such file"),
    (["--data_dir={tmp}", "--scenarios=A,Z"], "Unknown scenario 'Z'"),
    (["--data_dir={tmp}", "--trainable_blocks=block5,head"], "'head' matches no block"),
    (["--data_dir={tmp}", "--image_size=64"], "--noinclude_top"),
    (["--data_dir={tmp}", "--tta=99"], "--tta must be between 1 and 8"),
    (["--data_dir={tmp}", "--cv_folds=many"], "--cv_folds must be an integer"),
    (["--data_dir={tmp}", "--val_size=half"], "--val_size must be a count"),
    (["--data_dir={tmp}", "--optimizer=adagrad"], "Unknown optimizer 'adagrad'"),
    (["--data_dir={tmp}", "--augment=wild"], "--augment='wild' is not a preset"),
    # Data, labels CSV and run folder: checked before TensorFlow too.
    (["--data_dir={tmp}/train"], "class folder"),
    (["--data_dir={tmp}", "--workdir={tmp}/train_labels.csv"], "is a file"),
    (["--data_dir={tmp}", "--label_column=colour"], "--label_column='colour'"),
])
def test_train_bad_flags_are_one_clear_paragraph_before_tensorflow(kaggle_dir, no_tensorflow,
                                                                    args, message):
    args = [a.replace("{tmp}", str(kaggle_dir)) for a in args]
    result = _run("train.py", "--val_size=4", "--weights=none", *args, env=no_tensorflow)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in said(result.stderr)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("depth", [1, 40])
def test_error_paragraphs_break_lines_between_words_only(depth):
    """However long a temporary path, it is never cut: it can be copied from the terminal."""
    from small_photo_classifier.workflow.base import console
    path = "/tmp/" + "/".join(["pytest-of-root-0"] * depth) + "/train_labels.csv"
    message = f"--workdir={path} is a file, not a run folder: " + "pick another one " * 12
    lines = console._paragraphs(message).splitlines()
    assert said("\n".join(lines)) == said(message) and len(lines) > 1
    assert any(f"--workdir={path}" in line for line in lines)
    assert all(len(line) <= 100 for line in lines if path not in line)


def test_predict_bad_flags_stop_before_tensorflow(kaggle_dir, no_tensorflow, tmp_path):
    result = _run("predict.py", f"--workdir={tmp_path}", f"--data_dir={kaggle_dir}",
                  "--tta=0", env=no_tensorflow)
    assert result.returncode == 2 and "--tta must be between 1 and 8" in said(result.stderr)
    assert "Traceback" not in result.stderr


@pytest.fixture
def fake_run(tmp_path):
    """A run folder as predict.py's checks see it (no real model: they never load one)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"not read before TensorFlow")
    (run / "model_info.json").write_text(json.dumps(
        {"image_size": 32, "task": "binary", "class_names": ["ants", "bees"]}))
    return run


def test_predict_run_folder_data_and_label_errors_come_before_tensorflow(
        kaggle_dir, no_tensorflow, tmp_path, fake_run):
    other = tmp_path / "other_classes"
    for name in ("wasps", "ants"):
        write_image(str(other / name / f"{name}1.jpg"), size=8)
    out = tmp_path / "pred.csv"
    cases = [
        ([f"--workdir={kaggle_dir / 'train_labels.csv'}"], "is a file, not a run folder"),
        ([f"--workdir={tmp_path / 'missing'}"], "does not exist"),
        ([f"--workdir={kaggle_dir}"], "No exported model"),
        ([f"--workdir={fake_run}", f"--data_dir={tmp_path / 'nowhere'}"], "does not exist"),
        ([f"--workdir={fake_run}", f"--data_dir={other}", f"--labels={other}"],
         "'wasps' that the model was not trained on"),
        ([f"--workdir={fake_run}", "--output_format=tags"], "--output_format=tags is for"),
    ]
    for args, message in cases:
        if not any(a.startswith("--data_dir") for a in args):
            args = args + [f"--data_dir={kaggle_dir}"]
        result = _run("predict.py", *args, f"--output={out}", env=no_tensorflow)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in said(result.stderr), (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert not out.exists()  # nothing predicted or written before the error


def test_one_image_file_is_a_folder_of_one(tmp_path):
    photo = write_image(str(tmp_path / "photo.jpg"), size=8)
    frame = discovery.discover_unlabelled(photo)
    assert frame.name.tolist() == ["photo"] and frame.path.tolist() == [photo]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(Exception, match="is a file but not an image"):
        discovery.discover_unlabelled(str(tmp_path / "notes.txt"))


@pytest.mark.slow
def test_train_names_an_undecodable_image(kaggle_dir, tmp_path):
    from tests.inprocess import run  # train.py's main in this process (no TF import)
    (kaggle_dir / "train" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    result = run("train.py", f"--data_dir={kaggle_dir}", "--weights=none", "--noinclude_top",
                  "--image_size=32", "--val_size=4", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(kaggle_dir / "train" / "3.jpg") in said(result.stderr)
    # Stopped before training: the new run folder holds only its log, and says so.
    assert os.listdir(tmp_path / "w") == ["train.log"]
    assert "holds only this log" in (tmp_path / "w" / "train.log").read_text()
