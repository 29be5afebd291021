"""Data discovery, label parsing and the train/validation split."""

import os

import pandas as pd
import pytest

from small_photo_classifier.pipeline import discovery, split
from small_photo_classifier.pipeline.errors import ConfigError, DataError
from tests.conftest import write_image


def test_kaggle_layout_labels_and_extras(kaggle_dir):
    ds = discovery.discover(str(kaggle_dir))
    assert ds.layout == "kaggle"
    assert list(ds.frame.name) == sorted(str(i) for i in range(1, 13))
    labels = dict(zip(ds.frame.name, ds.frame.label))
    assert all(labels[str(i)] == (i - 1) % 2 for i in range(1, 13))
    assert all(os.path.isfile(p) for p in ds.frame.path)
    assert ds.test_dir == str(kaggle_dir / "test")
    assert ds.sample_submission == str(kaggle_dir / "sample_submission.csv")


def test_class_folder_layout_default_positive_is_second(folders_dir):
    ds = discovery.discover(str(folders_dir))
    assert ds.layout == "folders"
    assert ds.class_names == ("ants", "bees")
    assert ds.ignored == 1  # notes.txt
    by_name = dict(zip(ds.frame.name, ds.frame.label))
    assert {n for n, l in by_name.items() if l == 1} == {f"bee{i}" for i in range(5)}
    assert {n for n, l in by_name.items() if l == 0} == {f"ant{i}" for i in range(4)}


def test_class_folder_positive_class_settable(folders_dir):
    ds = discovery.discover(str(folders_dir), positive_class="ants")
    assert ds.class_names == ("bees", "ants")
    assert set(ds.frame.name[ds.frame.label == 1]) == {f"ant{i}" for i in range(4)}
    with pytest.raises(ConfigError, match="wasps"):
        discovery.discover(str(folders_dir), positive_class="wasps")


def _kaggle(tmp_path, csv_text, images=("1", "2", "3", "4")):
    root = tmp_path / "k"
    for name in images:
        write_image(str(root / "train" / f"{name}.jpg"), size=8)
    (root / "train_labels.csv").write_text(csv_text, encoding="utf-8")
    return str(root)


@pytest.mark.parametrize("csv_text, message", [
    ("name,label\n1,0\n", r"3 image\(s\) in .* have no label"),
    ("name,invasive\n1,0\n2,1\n3,0\n4,1\n9,1\n", r"line 6: '9'"),
    ("name,invasive\n1,0\n2,2\n3,0\n4,1\n", r"line 3: label '2'"),
    ("name,invasive\n1,0\n2,yes\n3,0\n4,1\n", r"line 3: label 'yes'"),
    ("name,invasive\n1,0\n2,1\n2,0\n3,0\n4,1\n", r"'2' on lines 3, 4"),
    ("name,invasive\n1,0\n2,1\n3,0\n", r"no label.*'4.jpg'"),
    ("name,invasive\n1,0\n2,\n3,0\n4,1\n", r"line 3: label ''"),
    ("name,invasive\n1,0\n../2,1\n3,0\n4,1\n", r"line 3: name '../2' contains a path"),
    ("name,invasive\n1,0\n/etc/passwd,1\n3,0\n4,1\n", r"line 3: name '/etc/passwd'"),
    ("name,invasive\n", r"no rows"),
])
def test_bad_labels_csv_is_a_clear_error(tmp_path, csv_text, message):
    with pytest.raises(DataError, match=message):
        discovery.discover(_kaggle(tmp_path, csv_text))


def test_labels_csv_tolerates_bom_whitespace_floats_and_extra_columns(tmp_path):
    text = "\ufeff name , invasive ,extra\n 1 , 0.0 ,x\n2,1.0,y\n3 ,0,z\n4, 1,w\n"
    ds = discovery.discover(_kaggle(tmp_path, text))
    assert dict(zip(ds.frame.name, ds.frame.label)) == {"1": 0, "2": 1, "3": 0, "4": 1}


def test_names_keep_leading_zeros(tmp_path):
    ds = discovery.discover(_kaggle(tmp_path, "name,invasive\n001,1\n002,0\n003,1\n004,0\n",
                                    images=("001", "002", "003", "004")))
    assert list(ds.frame.name) == ["001", "002", "003", "004"]


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, r"does not exist"),
    (lambda root: root.mkdir(), r"is empty"),
    (lambda root: (root.mkdir(), (root / "a.txt").write_text("x")), r"neither layout"),
    (lambda root: (root.mkdir(), (root / "only").mkdir(),
                   write_image(str(root / "only" / "a.jpg"), size=8)), r"at least two class"),
    (lambda root: (write_image(str(root / "a" / "x.jpg"), size=8), (root / "b").mkdir()),
     r"Class folder .*b has no images"),
    (lambda root: (write_image(str(root / "train" / "x.jpg"), size=8)), r"train/ folder but no"),
])
def test_bad_data_dir_is_a_clear_error(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        discovery.discover(str(root))


def test_empty_data_dir_flag():
    with pytest.raises(DataError, match="--data_dir"):
        discovery.discover("")


def _frame(n_pos, n_neg):
    names = [f"p{i}" for i in range(n_pos)] + [f"n{i}" for i in range(n_neg)]
    return pd.DataFrame({"name": names, "label": [1] * n_pos + [0] * n_neg,
                         "path": names})


def test_split_count_keeps_the_datas_shares_and_is_reproducible():
    """A count keeps each class's share of the data (issue 48: validation had been split
    100/100 whenever the classes allowed, and calibration fitted on it leaned towards a
    uniform prior); the balanced split is there when asked for, as 100+100."""
    frame = _frame(500, 300)
    train, val = split.split_train_val(frame, 200, seed=3)
    assert len(val) == 200 and len(train) == 600
    assert (val.label == 1).sum() == 125 and (val.label == 0).sum() == 75
    assert not set(train.name) & set(val.name)
    _, again = split.split_train_val(frame.sample(frac=1, random_state=1), 200, seed=3)
    assert list(again.name) == list(val.name)  # input order does not matter
    _, other = split.split_train_val(frame, 200, seed=4)
    assert list(other.name) != list(val.name)
    from small_photo_classifier.workflow.base import config
    balanced = config.parse_val_size("100+100")
    assert balanced == split.Balanced(100, 2) and str(balanced) == "100+100"
    _, even = split.split_train_val(frame, balanced, seed=3)
    assert (even.label == 1).sum() == 100 and (even.label == 0).sum() == 100
    with pytest.raises(ConfigError, match="names 3 classes"):
        split.split_train_val(frame, config.parse_val_size("50+50+50"), seed=0)
    with pytest.raises(ConfigError, match="each class needs at least one image on both"):
        split.split_train_val(_frame(500, 100), balanced, seed=0)
    for bad in ("100+50", "100+", "+100", "a+b"):
        with pytest.raises(ConfigError, match="same count for every class"):
            config.parse_val_size(bad)


def test_split_fraction_is_stratified():
    frame = _frame(300, 100)
    train, val = split.split_train_val(frame, 0.25, seed=0)
    assert len(val) == 100
    assert (val.label == 1).sum() == 75 and (val.label == 0).sum() == 25


def test_split_count_falls_back_to_proportional_when_a_class_is_small():
    frame = _frame(380, 120)
    _, val = split.split_train_val(frame, 200, seed=0)
    assert len(val) == 200
    assert (val.label == 1).sum() == 152 and (val.label == 0).sum() == 48


def test_split_rejects_sizes_that_leave_too_little():
    with pytest.raises(ConfigError, match="val_size"):
        split.split_train_val(_frame(10, 10), 15, seed=0)
    from small_photo_classifier.workflow.base import config
    with pytest.raises(ConfigError):
        config.parse_val_size("-3")
    assert config.parse_val_size("200") == 200
    assert config.parse_val_size("0.2") == 0.2
    assert config.parse_val_size("auto") == "auto"
