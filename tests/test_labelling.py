"""Label efficiency: the learning curve, which photos to label next, suspect labels,
duplicates across splits."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from features import audit, curve, cv, selection, task as task_lib
from tests.conftest import colour_image, write_image

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
    assert "doubling the labels (200 -> 400)" in result.sentence("AUC", "probe")
    rng = np.random.default_rng(0)
    noisy = pd.DataFrame(rows).assign(score=rng.uniform(0.5, 1.0, len(rows)))
    assert not curve.forecast(noisy, boots=60).supported


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
def test_label_next_and_curve_through_the_script(kaggle_dir, tmp_path):
    from tests.test_finetune_predict import _run
    pool = tmp_path / "pool"
    for i in range(8):
        write_image(str(pool / f"u{i}.jpg"), colour_image(i % 2, seed=500 + i))
    shutil.copy(kaggle_dir / "train" / "1.jpg", pool / "copy_of_1.jpg")  # already labelled
    (pool / "broken.jpg").write_bytes(b"\xff\xd8\xffnot a jpeg")
    common = [f"--data_dir={kaggle_dir}", f"--workdir={tmp_path / 'run'}", "--weights=none",
              "--noinclude_top", "--image_size=32", "--val_size=4", "--batch_size=4",
              f"--cache_dir={tmp_path / 'cache'}"]
    result = _run("train.py", *common, "--stage=label_next", f"--unlabelled_dir={pool}",
                  "--budget=5", "--on_bad_image=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already labelled" in result.stdout and "copy_of_1" in result.stdout
    table = pd.read_csv(tmp_path / "run" / "to_label.csv")
    assert list(table.columns) == ["name", "rank", "score", "reason"]
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
    assert "has no photos to choose from" in " ".join(result.stderr.split())
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
