"""Label efficiency: the learning curve, which photos to label next, suspect labels,
duplicates across splits."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from small_photo_classifier.features.data import audit, curve, selection
from small_photo_classifier.features.choose import cv
from small_photo_classifier.features import task as task_lib
from tests.conftest import colour_image, said, write_image

BINARY = task_lib.binary()


def test_curve_subsets_grow_with_the_fraction_and_are_stratified():
    y = np.array([0] * 30 + [1] * 10)
    folds = cv.make_folds(y, 4, 0)
    table = curve.measure(lambda tr, va: len(tr), y, folds, BINARY, repeats=2)
    assert len(table) == (len(curve.FRACTIONS) - 1) * 2 * 4 + 4  # 100% once per fold
    sizes = table.groupby("fraction").labels.mean()
    assert sizes.is_monotonic_increasing and sizes[1.0] == 30  # 3/4 of 40 per fold model
    part = curve.subset(y, 0.2, 0)
    assert np.bincount(y[part]).tolist() == [6, 2]  # stratified: both classes kept


def test_forecast_recovers_a_clean_law_and_refuses_noise():
    rows = []
    for fraction in curve.FRACTIONS:
        for r in range(3):
            n = 200 * fraction
            rows.append({"fraction": fraction, "repeat": r, "fold": 0, "labels": n,
                         "score": 0.95 - 0.8 * n ** -0.5 + 0.001 * (r - 1)})
    result = curve.forecast(pd.DataFrame(rows), boots=60)
    truth = (0.95 - 0.8 * 400 ** -0.5) - (0.95 - 0.8 * 200 ** -0.5)
    assert result.supported and result.gain_2x == pytest.approx(truth, abs=0.005)
    assert result.range_2x[0] <= result.gain_2x <= result.range_2x[1]
    assert "doubling the labels (200 labels; 200 -> 400)" in result.sentence("AUC", "probe")
    rng = np.random.default_rng(0)
    noisy = pd.DataFrame(rows).assign(score=rng.uniform(0.5, 1.0, len(rows)))
    assert not curve.forecast(noisy, boots=60).supported


def test_degenerate_scores_give_answers_without_warnings():
    # Tiny data: a fold that cannot score an epoch, a constant learning curve, a bootstrap
    # group without an AUC. The answers stay defined; nothing is printed about them.
    from small_photo_classifier.features.choose import cv, evidence
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cv.best_epoch(np.array([[np.nan, 0.6], [np.nan, 0.8]])) == 2
        rows = [{"fraction": f, "repeat": 0, "fold": 0, "labels": 100 * f, "score": 0.5}
                for f in curve.FRACTIONS]
        assert not curve.forecast(pd.DataFrame(rows), boots=20).supported
        y = np.array([0, 1, 0, 1, 1, 1])
        groups = np.array([0, 0, 0, 0, 1, 1])  # group 1 has one class: no AUC there
        probs = np.array([0.2, 0.8, 0.3, 0.7, 0.6, 0.9])
        result = evidence.compare(task_lib.binary(), y, probs, probs[::-1], groups=groups)
    assert np.isfinite(result.summary()["difference"])


def _pool():
    """A pool of 4D features: a tight ambiguous cluster (near-duplicates, p ~ 0.5), other
    ambiguous photos spread out, and easy ones."""
    rng = np.random.default_rng(0)
    cluster = rng.normal([1, 1, 0, 0], 0.001, (10, 4))
    spread = rng.normal(0, 1, (10, 4)) + [0, 0, 3, 3]
    easy = rng.normal(0, 1, (20, 4)) + [5, -5, 0, 0]
    x = np.concatenate([cluster, spread, easy])
    probs = np.concatenate([np.full(10, 0.5), np.full(10, 0.45), np.full(20, 0.98)])
    return x, probs


def test_selection_prefers_uncertain_photos_but_not_copies_of_one():
    x, probs = _pool()
    picks = selection.select("combined", x, probs, 6)
    rows = [r for r, _, _ in picks]
    assert len(rows) == len(set(rows)) == 6
    assert all(r < 20 for r in rows)  # uncertain photos before easy ones
    assert sum(r < 10 for r in rows) == 1  # one photo of the tight cluster, not six copies
    sims = selection.normalised(x[rows]) @ selection.normalised(x[rows]).T
    assert (sims[~np.eye(6, dtype=bool)] < 0.999).all()
    plain = [r for r, _, _ in selection.select("uncertainty", x, probs, 6)]
    assert all(r < 10 for r in plain)  # pure uncertainty would take the six copies
    assert len(selection.select("random", x, probs, 100)) == len(x)  # never more than the pool


def test_flipped_labels_of_a_separable_set_are_found():
    rng = np.random.default_rng(0)
    y = np.arange(100) % 2
    probs = np.clip(0.9 * y + 0.05 + rng.normal(0, 0.03, 100), 0, 1)  # a good model
    flips = np.array([3, 10, 41, 77])
    noisy = y.copy()
    noisy[flips] = 1 - noisy[flips]
    table = audit.suspects(BINARY, noisy, probs)
    assert set(table.row.head(len(flips))) == set(flips)
    assert (table.head(len(flips)).confidence > 0.8).all()
    multi = task_lib.Task("multiclass", ("a", "b", "c"))
    y3 = np.arange(90) % 3
    p3 = np.eye(3)[y3] * 0.9 + 0.033
    wrong = y3.copy()
    wrong[[5, 50]] = (wrong[[5, 50]] + 1) % 3
    found = audit.suspects(multi, wrong, p3)
    assert set(found.row) == {5, 50} and set(found.predicted) == {"c"}  # their true class


def test_duplicates_across_splits_are_flagged():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8))
    x[4] = x[1] * 1.01  # a near-copy of photo 1 in the other split
    groups = ["train", "train", "train", "val", "val", "val"]
    pairs = selection.duplicate_pairs(x, 0.9, groups)
    assert [(a, b) for a, b, _ in pairs] == [(1, 4)]
    x[2] = x[0]  # same split: not a leak between splits
    assert [(a, b) for a, b, _ in selection.duplicate_pairs(x, 0.9, groups)] == [(1, 4)]


@pytest.mark.slow
def test_label_next_and_curve_through_train_py_s_flags(kaggle_dir, tmp_path):
    from tests.inprocess import run as _run
    pool = tmp_path / "pool"
    for i in range(8):
        write_image(str(pool / f"u{i}.jpg"), colour_image(i % 2, seed=500 + i))
    shutil.copy(kaggle_dir / "train" / "1.jpg", pool / "copy_of_1.jpg")  # already labelled
    (pool / "broken.jpg").write_bytes(b"\xff\xd8\xffnot a jpeg")
    common = [f"--data_dir={kaggle_dir}", f"--workdir={tmp_path / 'run'}", "--weights=none",
              "--noinclude_top", "--image_size=32", "--val_size=4", "--batch_size=4",
              f"--cache_dir={tmp_path / 'cache'}"]
    # A trained run first (heads only: seconds), then the later stages in its folder.
    result = _run("train.py", *common, "--stage=heads", "--scenarios=A", "--epochs=1",
                  "--cv_folds=2")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((tmp_path / "run" / "run_config.json").read_text())
    timings = json.loads((tmp_path / "run" / "metrics.json").read_text())["timings"]
    result = _run("train.py", *common, "--stage=label_next", f"--unlabelled_dir={pool}",
                  "--budget=5", "--on_bad_image=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    # The training's record is kept; the later stage has its own beside it.
    assert json.loads((tmp_path / "run" / "run_config.json").read_text()) == trained
    assert trained["stage"] == "heads"
    later = json.loads((tmp_path / "run" / "run_config_label_next.json").read_text())
    assert later["stage"] == "label_next" and later["budget"] == 5
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["timings"] == timings and metrics["heads"]["A"]
    assert metrics["stages"]["label_next"]["picked"] == 5
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Probe and heads on cached features" in page  # the training's results
    assert "Photos to label next (--stage=label_next)" in page
    assert "--stage=heads" in page and "Run --stage=label_next again" in page
    assert "already labelled" in result.stdout and "copy_of_1" in result.stdout
    table = pd.read_csv(tmp_path / "run" / "to_label.csv")
    assert list(table.columns) == ["name", "rank", "score", "reason", "path"]
    assert all(os.path.isfile(p) and os.path.dirname(p) == str(pool) for p in table.path)
    assert len(table) == 5 and table.name.is_unique and list(table["rank"]) == [1, 2, 3, 4, 5]
    assert set(table.name) <= {f"u{i}" for i in range(8)}  # never labelled or broken ones
    template = pd.read_csv(tmp_path / "run" / "labels_template.csv")
    assert list(template.columns) == ["name", "invasive"] and template.invasive.isna().all()
    assert (tmp_path / "run" / "to_label.png").is_file()
    result = _run("train.py", *common, "--stage=label_next", f"--unlabelled_dir={pool}",
                  "--budget=50", "--on_bad_image=skip")
    assert result.returncode == 0 and "covers the whole pool of 8" in result.stdout
    assert len(pd.read_csv(tmp_path / "run" / "to_label.csv")) == 8
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run("train.py", *common, "--stage=label_next", f"--unlabelled_dir={empty}")
    assert result.returncode == 2
    assert "has no photos to choose from" in said(result.stderr)
    assert "Traceback" not in result.stderr
    result = _run("train.py", *common, "--stage=curve", "--epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    curve_csv = pd.read_csv(tmp_path / "run" / "learning_curve.csv")
    measured = curve_csv[curve_csv.kind == "measured"]
    assert measured.groupby("model").labels.apply(lambda s: s.is_monotonic_increasing).all()
    assert (tmp_path / "run" / "learning_curve.png").is_file()
    assert "labels" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["learning_curve"]) == 2


def test_label_next_reasons_say_what_the_numbers_say():
    x, probs = _pool()
    picks = selection.select("combined", x, probs, len(x))
    first_row, _, first = picks[0]
    assert first.startswith("uncertain (") and "unlike the labelled" in first
    # A copy of a photo already picked (distance ~0) the model is sure of is never called
    # "uncertain" or "unlike" anything.
    x2 = np.concatenate([x, x[first_row:first_row + 1]])
    probs2 = np.concatenate([probs, [0.995]])
    by_row = {r: why for r, _, why in selection.select("combined", x2, probs2, len(x2))}
    copy = by_row[len(x)]
    assert "fairly sure" in copy and "nearly the same as a labelled or chosen photo" in copy
    assert "uncertain (" not in copy and "unlike" not in copy


def test_suspects_follow_confident_learning_not_any_class_over_its_threshold():
    # The case: labels [1,1,1,0,0,0], P(class 1) [.38,.36,.40,.40,.42,.45]. The
    # thresholds are t1 = mean(.38,.36,.40) = .38 and t0 = mean(.60,.58,.55) = .577.
    # Images 3 and 4 (label 0) reach t1, but class 0 is confident too and more probable:
    # their label is the likely class, so they are not suspect (the old rule flagged all 6).
    y = np.array([1, 1, 1, 0, 0, 0])
    p1 = np.array([.38, .36, .40, .40, .42, .45])
    p = np.stack([1 - p1, p1], axis=1)
    assert audit.likely_classes(p, y).tolist() == [0, 0, 0, 0, 0, 1]
    table = audit.suspects(BINARY, y, p1)
    assert sorted(table.row) == [0, 1, 2, 5]
    assert list(table.row) == [1, 0, 2, 5]  # by margin: .28, .24, .20, -.10
    for r in table.itertuples():
        assert r.predicted != r.label and r.margin == pytest.approx(r.confidence - r.given)


@pytest.mark.parametrize("classes", [2, 4])
def test_suspects_equal_cleanlabs_confident_joint_on_random_cases(classes):
    from cleanlab import count  # the test extra's independent implementation
    rng = np.random.default_rng(classes)
    for case in range(40):
        n = int(rng.integers(12, 80))
        y = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])
        p = rng.dirichlet(np.full(classes, 0.7), n)
        p[np.arange(n), y] += rng.uniform(0, 0.6, n)  # labels mostly right, some not
        p /= p.sum(axis=1, keepdims=True)
        task = task_lib.Task("binary", ("a", "b")) if classes == 2 else task_lib.Task(
            "multiclass", tuple("abcd"))
        ours = set(audit.suspects(task, y, p[:, 1] if classes == 2 else p).row)
        _, theirs = count.compute_confident_joint(y, p, return_indices_of_off_diagonals=True)
        theirs = set(int(i) for i in theirs)
        if classes > 2:
            # cleanlab takes the overall argmax when 2+ classes are confident; the rule
            # (and the issue) takes the most probable confident class. Compare where the
            # two coincide: the overall argmax is itself confident.
            guess = audit.likely_classes(p, y)
            same = {i for i in range(n) if guess[i] < 0 or guess[i] == p[i].argmax()}
            ours, theirs = ours & same, theirs & same
        assert ours == theirs, case


def test_multilabel_curve_subsets_keep_their_size_and_every_labels_share():
    # 60 images over 6 labels, nearly every label set distinct: stratifying by whole sets
    # (one image per set at least) made a "10 %" subset hold most of the images.
    rng = np.random.default_rng(0)
    y = (rng.random((60, 6)) < 0.4).astype(int)
    y[y.sum(axis=1) == 0, 0] = 1
    multi = task_lib.Task("multilabel", tuple("abcdef"))
    assert len({tuple(r) for r in y}) > 30
    for fraction in (0.1, 0.4):
        part = curve.subset(y, fraction, 0, multi)
        assert len(part) == round(fraction * 60)
    part = curve.subset(y, 0.4, 0, multi)
    share, whole = y[part].mean(axis=0), y.mean(axis=0)
    assert np.abs(share - whole).max() < 0.15


def test_curve_table_counts_whole_labels_and_the_sentence_names_the_fold():
    y = np.array([0] * 21 + [1] * 10)
    folds = cv.make_folds(y, 5, 0)
    table = curve.measure(lambda tr, va: len(tr) / 40, y, folds, BINARY, repeats=2)
    summary = curve.summary_table(table, "m")
    assert summary["labels"].dtype.kind == "i"
    result = curve.forecast(table)
    text = result.sentence("AUC", "probe", total=31)
    assert f"{result.labels} labels, a cross-validation fold's training part of the 31" in text
