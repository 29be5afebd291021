"""Any number of classes: detecting the task, labels CSVs, splits, scores, end to end."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as sk_metrics

from small_photo_classifier.features.choose import cv
from small_photo_classifier.features import task as task_lib
from small_photo_classifier.pipeline import discovery, labels, split
from small_photo_classifier.pipeline.errors import ConfigError, DataError
from tests.conftest import class_image, said, write_image

SIZE = 32


def _folders(root, counts):
    """Class folders with the given number of images each, classes named c0, c1, ..."""
    for k, n in enumerate(counts):
        for i in range(n):
            write_image(str(root / f"c{k}" / f"img{k}_{i}.jpg"),
                        class_image(k % 4, seed=10 * k + i))
    return root


def _kaggle(root, header, rows, n=None, sample=None):
    """A Kaggle layout whose labels CSV has ``header`` and ``rows`` (name first)."""
    names = [r.split(",")[0] for r in rows]
    for name in names:
        write_image(str(root / "train" / f"{name}.jpg"), size=8, seed=len(name))
    (root / "train_labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    if sample:
        (root / "sample_submission.csv").write_text(sample)
    return str(root)


def test_three_class_folders_are_multiclass_in_sorted_order(tmp_path):
    ds = discovery.discover(str(_folders(tmp_path / "d", [3, 4, 2])))
    assert ds.kind == "multiclass" and ds.class_names == ("c0", "c1", "c2")
    assert sorted(ds.frame.label.tolist()) == [0] * 3 + [1] * 4 + [2] * 2
    assert discovery.discover(str(tmp_path / "d"), task="multiclass").kind == "multiclass"
    two = discovery.discover(str(_folders(tmp_path / "two", [2, 3])))
    assert two.kind == "binary" and two.class_names == ("c0", "c1")  # unchanged rule
    assert discovery.discover(str(tmp_path / "two"), task="multiclass").kind == "multiclass"
    with pytest.raises(ConfigError, match="exactly two class folders"):
        discovery.discover(str(tmp_path / "d"), task="binary")


def test_a_class_with_one_image_is_named(tmp_path):
    with pytest.raises(DataError, match="class folder 'c2' has 1"):
        discovery.discover(str(_folders(tmp_path / "d", [3, 3, 1])))


@pytest.mark.parametrize("header, rows, kind, classes, encoded", [
    ("name,species", ["1,oak", "2,ash", "3,elm", "4,oak"], "multiclass", ("ash", "elm", "oak"),
     [2, 0, 1, 2]),
    ("name,grade", ["1,10", "2,2", "3,1", "4,2"], "multiclass", ("1", "2", "10"), [2, 1, 0, 1]),
    ("name,label", ["1,0", "2,1", "3,1.0", "4,0"], "binary", ("0", "1"), [0, 1, 1, 0]),
    ("name,animal", ["1,dog", "2,cat", "3,cat", "4,dog"], "binary", ("cat", "dog"),
     [1, 0, 0, 1]),
    ("name,tags", ["1,sky tree", "2,tree", "3,water", "4,sky"], "multilabel",
     ("sky", "tree", "water"), [(1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0)]),
    ("name,sky,tree", ["1,1,0", "2,0,1", "3,1,1", "4,1,0"], "multilabel", ("sky", "tree"),
     [(1, 0), (0, 1), (1, 1), (1, 0)]),
])
def test_labels_csv_forms_and_their_task(tmp_path, header, rows, kind, classes, encoded):
    path = tmp_path / "labels.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    read = labels.read_labels(str(path))
    assert read.kind == kind and read.class_names == classes
    assert read.frame.label.tolist() == encoded


@pytest.mark.parametrize("header, rows, message", [
    ("name,species", ["1,oak", "2,", "3,elm"], r"line 3: label '' in column 'species'"),
    ("name,species", ["1,oak", "2,3", "3,elm"], r"mixes numbers \(e.g. line 3\) and names "
                                               r"\(e.g. line 2\)"),
    ("name,tags", ["1,sky tree", "2,", "3,sky"], r"line 3: the image has no tags"),
    ("name,sky,tree", ["1,1,0", "2,0,0"], r"line 3: the image has no label"),
    ("name,species,site", ["1,oak,a", "2,ash,b"], r"several label columns \(species, site\).*"
                                                  r"--label_column"),
])
def test_bad_labels_are_one_clear_paragraph(tmp_path, header, rows, message):
    path = tmp_path / "labels.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=message):
        labels.read_labels(str(path))


def test_label_column_chooses_and_a_wrong_one_lists_the_columns(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("name,species,site\n1,oak,a\n2,ash,b\n3,oak,c\n")
    assert labels.read_labels(str(path), label_column="species").class_names == ("ash", "oak")
    with pytest.raises(ConfigError, match="its columns are species, site"):
        labels.read_labels(str(path), label_column="kind")


def test_rare_labels_are_named_in_a_warning(tmp_path, caplog):
    path = tmp_path / "labels.csv"
    path.write_text("name,tags\n" + "".join(f"{i},sky{' owl' if i == 0 else ''}\n"
                                            for i in range(8)))
    with caplog.at_level(logging.WARNING):
        labels.read_labels(str(path))
    assert "'owl'" in caplog.text and "fewer than 5 times" in caplog.text


def test_sample_submission_fixes_the_class_order_and_must_match(tmp_path):
    rows = ["1,oak", "2,ash", "3,elm", "4,oak", "5,ash", "6,elm"]
    root = _kaggle(tmp_path / "k", "name,species", rows, sample="name,oak,elm,ash\n1,0,0,0\n")
    ds = discovery.discover(root)
    assert ds.class_names == ("oak", "elm", "ash")  # the submission's column order
    assert ds.frame.set_index("name").label.to_dict() == {"1": 0, "2": 2, "3": 1, "4": 0,
                                                          "5": 2, "6": 1}
    bad = _kaggle(tmp_path / "bad", "name,species", rows, sample="name,oak,pine\n1,0,0\n")
    with pytest.raises(DataError, match=r"do not include 'ash', 'elm'"):
        discovery.discover(bad)


def test_split_keeps_every_class_in_validation_and_is_stratified():
    frame = pd.DataFrame({"name": [f"i{i}" for i in range(60)],
                          "label": [0] * 40 + [1] * 17 + [2] * 3})
    train, val = split.split_train_val(frame, 0.1, seed=0)  # 6 images: 4 / 2 / 0 in proportion
    assert sorted(set(val.label)) == [0, 1, 2]  # the small class is represented anyway
    assert len(val) == 6 and set(train.name).isdisjoint(val.name)
    again = split.split_train_val(frame.sample(frac=1, random_state=0), 0.1, seed=0)[1]
    assert list(again.name) == list(val.name)  # same seed, same split, whatever the order


def test_multilabel_split_and_folds_share_every_label():
    rng = np.random.default_rng(0)
    y = (rng.random((80, 4)) < [0.5, 0.3, 0.15, 0.08]).astype(int)
    y[y.sum(axis=1) == 0, 0] = 1
    frame = pd.DataFrame({"name": [f"i{i}" for i in range(80)], "label": [tuple(r) for r in y]})
    train, val = split.split_train_val(frame, 0.25, seed=0)
    va = np.asarray(val.label.tolist())
    assert set(train.name).isdisjoint(val.name)
    assert len(val) == 20
    share = va.sum(axis=0) / y.sum(axis=0)
    assert np.all(np.abs(share - 0.25) < 0.12), share  # every label about a quarter in val
    folds = cv.make_folds(y, 4, 0, task_lib.Task("multilabel", tuple("abcd")))
    assert sorted(np.concatenate([v for _, v in folds])) == list(range(80))
    for _, v in folds:
        assert np.all(y[v].sum(axis=0) >= 1)  # every label in every fold


def test_the_smallest_class_is_counted_one_way_for_folds_probe_curve_and_weights():
    three = task_lib.Task("multiclass", ("a", "b", "c"))
    y = np.array([0, 0, 0, 2, 2, 0])  # "b" has no image here: it is not the smallest
    assert list(task_lib.class_counts(three, y)) == [4, 0, 2]
    assert task_lib.smallest_class(three, y) == (2, 2)
    assert task_lib.smallest_class(None, y) == (2, 2)
    tags = task_lib.Task("multilabel", ("x", "y", "z"))
    multi = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 1]])
    assert task_lib.smallest_class(tags, multi) == (1, 0)  # every fold needs every label
    with pytest.raises(ConfigError, match="class 'c' has 2"):
        cv.make_folds(y, 3, 0, three)


def test_multiclass_and_multilabel_scores_match_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 60)
    p = rng.dirichlet(np.ones(6), 60)
    t = task_lib.Task("multiclass", tuple("abcdef"))
    s = t.scores(y, p)
    assert s["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    assert s["loss"] == pytest.approx(sk_metrics.log_loss(y, p, labels=range(6)))
    assert s["auc"] == pytest.approx(sk_metrics.roc_auc_score(y, p, multi_class="ovr"))
    assert s["top5_accuracy"] == pytest.approx(np.mean(
        [yi in np.argsort(-pi)[:5] for yi, pi in zip(y, p)]))
    ym = (rng.random((60, 3)) < 0.4).astype(int)
    pm = rng.random((60, 3))
    m = task_lib.Task("multilabel", tuple("xyz")).scores(ym, pm, [0.3, 0.5, 0.7])
    assert m["map"] == pytest.approx(sk_metrics.average_precision_score(ym, pm, average="macro"))
    assert m["f1_micro"] == pytest.approx(sk_metrics.f1_score(
        ym, (pm >= [0.3, 0.5, 0.7]).astype(int), average="micro"))
    best = task_lib.choose_thresholds(ym, pm)
    f1 = [sk_metrics.f1_score(ym[:, j], pm[:, j] >= best[j]) for j in range(3)]
    for j in range(3):  # no threshold on this data does better for that label
        assert f1[j] >= max(sk_metrics.f1_score(ym[:, j], pm[:, j] >= c)
                            for c in np.linspace(0.01, 0.99, 99)) - 1e-9


def _multiclass_kaggle(root, n=24, n_test=6):
    """Three classes in the Kaggle layout (name,species), a test folder and a sample
    submission with one column per class in a non-sorted order."""
    species = ("oak", "ash", "elm")
    rows = []
    for i in range(n):
        write_image(str(root / "train" / f"{i}.jpg"), class_image(i % 3 + 1, seed=i))
        rows.append(f"{i},{species[i % 3]}")
    for i in range(n_test):
        write_image(str(root / "test" / f"t{i}.jpg"), class_image(i % 3 + 1, seed=100 + i))
    (root / "train_labels.csv").write_text("name,species\n" + "\n".join(rows) + "\n")
    (root / "sample_submission.csv").write_text(
        "name,oak,elm,ash\n" + "".join(f"t{i},0,0,0\n" for i in (3, 1, 0, 2, 5, 4)))
    return root


@pytest.mark.slow
def test_multiclass_end_to_end_through_the_flags(tmp_path):
    from tests.inprocess import run as _run
    data = _multiclass_kaggle(tmp_path / "k")
    workdir = tmp_path / "run"
    common = [f"--data_dir={data}", f"--workdir={workdir}", "--weights=none", "--noinclude_top",
              f"--image_size={SIZE}", "--val_size=6", "--batch_size=4", "--epochs=2",
              f"--cache_dir={tmp_path / 'cache'}", "--scenarios=A,B", "--finetune_epochs=1",
              "--cv_folds=2", "--augment=keras_blog", "--notensorboard", "--label_smoothing=0.1",
              "--noprobe_baseline"]
    result = _run("train.py", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((workdir / "model_info.json").read_text())
    assert info["task"] == "multiclass" and info["class_names"] == ["oak", "elm", "ash"]
    metrics = json.loads((workdir / "metrics.json").read_text())
    fitted = [s for s, h in metrics["heads"].items() if h["fitted"]]  # the CV-best one
    assert len(fitted) == 1
    assert {"cv_accuracy_mean", "best_val_accuracy", "val_auc"} <= set(metrics["heads"][fitted[0]])
    assert "val_accuracy" in metrics["probe"] and "cv_accuracy_mean" in metrics["probe"]
    report = pd.read_csv(workdir / "classification_report.csv")
    assert {"oak", "elm", "ash"} <= set(report["class"]) and "f1-score" in report
    split_csv = pd.read_csv(workdir / "split.csv")
    assert set(split_csv.label) == {"oak", "elm", "ash"}  # readable class names
    assert set(split_csv[split_csv.subset == "val"].label) == {"oak", "elm", "ash"}
    submission = pd.read_csv(workdir / "submission.csv", dtype={"name": str})
    assert list(submission.columns) == ["name", "oak", "elm", "ash"]  # the sample's columns
    assert list(submission.name) == ["t3", "t1", "t0", "t2", "t5", "t4"]  # and rows
    np.testing.assert_allclose(submission[["oak", "elm", "ash"]].sum(axis=1), 1, atol=1e-4)
    assert "accuracy" in result.stdout and "final model" in result.stdout
    # predict.py: the top class per image, and scores against a class-folder tree.
    tree = tmp_path / "tree"
    for i, name in enumerate(("oak", "ash", "elm") * 2):
        write_image(str(tree / name / f"p{i}.jpg"), class_image(("oak", "ash", "elm")
                                                                .index(name) + 1, seed=200 + i))
    out = tmp_path / "labels.csv"
    result = _run("predict.py", f"--workdir={workdir}", f"--data_dir={tree}",
                  f"--output={out}", "--output_format=label", f"--labels={tree}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pd.read_csv(out)
    assert list(rows.columns) == ["name", "label", "unfamiliar_score", "unfamiliar"]
    assert set(rows.label) <= {"oak", "elm", "ash", "unfamiliar"}
    assert len(rows) == 6 and "accuracy" in result.stdout
    assert (tmp_path / "labels_confusion_matrix.png").is_file()
    # A labelled folder with a class the model never saw: one clear paragraph.
    write_image(str(tree / "pine" / "x.jpg"), class_image(1, seed=300))
    result = _run("predict.py", f"--workdir={workdir}", f"--data_dir={tree}",
                  f"--output={out}", f"--labels={tree}")
    assert result.returncode == 2 and "'pine'" in said(result.stderr)
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_multilabel_end_to_end_writes_thresholds_per_label_metrics_and_tags(tmp_path):
    from tests.inprocess import run as _run
    root = tmp_path / "k"
    tags = ("blue", "red", "blue red", "plain")
    colours = {"blue": 1, "red": 2, "blue red": 3, "plain": 0}
    rows = []
    for i in range(24):
        t = tags[i % 4]
        write_image(str(root / "train" / f"{i}.jpg"), class_image(colours[t], seed=i))
        rows.append(f"{i},{t}")
    for i in range(4):
        write_image(str(root / "test" / f"t{i}.jpg"), class_image(colours[tags[i]], seed=50 + i))
    (root / "train_labels.csv").write_text("name,tags\n" + "\n".join(rows) + "\n")
    workdir = tmp_path / "run"
    result = _run("train.py", f"--data_dir={root}", f"--workdir={workdir}", "--weights=none",
                  "--noinclude_top", f"--image_size={SIZE}", "--val_size=8", "--batch_size=4",
                  "--epochs=2", f"--cache_dir={tmp_path / 'cache'}", "--scenarios=B",
                  "--finetune_epochs=1", "--cv_folds=2", "--notensorboard", "--noprobe_baseline")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((workdir / "model_info.json").read_text())
    assert info["task"] == "multilabel" and info["class_names"] == ["blue", "plain", "red"]
    assert len(info["thresholds"]) == 3
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert {"val_map", "val_f1_micro", "val_f1_macro", "thresholds"} <= set(metrics["final"])
    report = pd.read_csv(workdir / "classification_report.csv")
    assert {"auc", "threshold"} <= set(report.columns)  # per-label AUC and threshold
    out = tmp_path / "tags.csv"
    result = _run("predict.py", f"--workdir={workdir}", f"--data_dir={root}",
                  f"--output={out}", "--output_format=tags")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pd.read_csv(out, keep_default_na=False)
    assert list(rows.columns) == ["name", "tags", "unfamiliar_score", "unfamiliar"]
    assert len(rows) == 4
    # Per-label calibration and thresholds on the calibrated probabilities (issue 30).
    assert len(info["calibration"]["temperature"]) in (0, 3) and info["threshold_rule"] == "auto"
    assert all(set(t.split()) <= {"blue", "plain", "red"} for t in rows.tags)


def test_per_class_intervals_hold_the_point_estimates_and_match_scikit_learn():
    """Issue 48: each class's precision, recall and F1 on held-out predictions with a 95 %
    bootstrap interval around them, equal to scikit-learn's at the point."""
    from sklearn.metrics import precision_recall_fscore_support
    rng = np.random.default_rng(0)
    task = task_lib.Task("multiclass", ("a", "b", "c"))
    y = rng.integers(0, 3, 200)
    probs = np.eye(3)[np.where(rng.random(200) < 0.8, y, rng.integers(0, 3, 200))] * 0.8 + 0.2 / 3
    table = task_lib.per_class_intervals(task, y, probs, seed=1)
    p, r, f, support = precision_recall_fscore_support(y, probs.argmax(1), labels=[0, 1, 2],
                                                      zero_division=0)
    np.testing.assert_allclose(table.precision, p, atol=1e-6)
    np.testing.assert_allclose(table.recall, r, atol=1e-6)
    np.testing.assert_allclose(table.f1, f, atol=1e-6)
    assert list(table.support) == list(support)
    for m in ("precision", "recall", "f1"):
        assert (table[f"{m}_low"] <= table[m]).all() and (table[m] <= table[f"{m}_high"]).all()
        assert (table[f"{m}_high"] - table[f"{m}_low"] > 0.02).all()  # 200 images: not exact
    binary = task_lib.per_class_intervals(task_lib.binary(("ants", "bees")), y % 2,
                                          np.where(y % 2 == 1, 0.9, 0.1))
    assert list(binary["class"]) == ["ants", "bees"] and (binary.f1 == 1).all()
