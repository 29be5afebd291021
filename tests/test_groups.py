"""Groups of photos (issue 48): several photos of one plant, camera or site stay on one
side of every split and fold the run makes."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from small_photo_classifier.features import task as task_lib
from small_photo_classifier.features.choose import cv, honest
from small_photo_classifier.pipeline import groups, split
from small_photo_classifier.pipeline.errors import ConfigError, DataError
from tests.conftest import colour_image, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = task_lib.Task("binary", ("neg", "pos"))


def _grouped(n_groups: int, per_group: int, classes: int = 2, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, per_group + 1, n_groups)
    rows = [(f"g{g}_{k}", g % classes, f"g{g}") for g in range(n_groups)
            for k in range(sizes[g])]
    return pd.DataFrame(rows, columns=["name", "label", "group"]).assign(path="")


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("val_size", [0.2, 0.35, 9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_validation_split_keeps_every_group_whole(classes, val_size, seed):
    frame = _grouped(30, 4, classes, seed)
    train, val = split.split_train_val(frame, val_size, seed)
    assert not set(train.group) & set(val.group)
    assert len(train) + len(val) == len(frame)
    assert set(val.label) == set(train.label) == set(range(classes))
    # As close to the count asked as whole groups allow (a group has at most 4 photos).
    want = val_size if isinstance(val_size, int) else round(val_size * len(frame))
    assert abs(len(val) - want) <= 4 * classes
    # Photos without groups are still split one by one, to the exact count.
    train, val = split.split_train_val(frame.drop(columns="group"), val_size, seed)
    assert len(val) == want


def test_a_multilabel_split_keeps_every_group_whole():
    frame = _grouped(30, 3)
    rng = np.random.default_rng(0)
    tags = {g: tuple(int(v) for v in rng.integers(0, 2, 3)) for g in frame.group.unique()}
    frame["label"] = [tags[g] for g in frame.group]
    train, val = split.split_train_val(frame, 0.25, 0)
    assert not set(train.group) & set(val.group) and len(val) > 0


def test_a_class_in_one_group_cannot_be_split_and_says_so():
    frame = _grouped(10, 3).assign(label=lambda f: (f.group == "g0").astype(int))
    with pytest.raises(ConfigError, match="in 1 group"):
        split.split_train_val(frame, 0.2, 0)


@pytest.mark.parametrize("kind", ["binary", "multilabel"])
def test_cross_validation_folds_keep_every_group_whole(kind):
    frame = _grouped(40, 5)
    g = frame.group.to_numpy()
    task = BINARY if kind == "binary" else task_lib.Task("multilabel", ("a", "b"))
    y = (frame.label.to_numpy() if kind == "binary" else
         np.stack([frame.label, (frame.group.str[1:].astype(int) % 3 == 0)], 1).astype(int))
    folds = cv.make_folds(y, 5, 0, task, groups=g)
    assert len(folds) == 5
    held = np.concatenate([va for _, va in folds])
    assert sorted(held) == list(range(len(frame)))  # every row held out once
    for tr, va in folds:
        assert not set(g[tr]) & set(g[va])
    for part in honest.parts(BINARY, frame.label.to_numpy(), 0, 5, g):
        assert not set(g[part]) & set(np.delete(g, part))


def test_too_few_groups_for_the_folds_is_one_clear_paragraph():
    frame = _grouped(4, 3)
    with pytest.raises(ConfigError) as err:
        cv.make_folds(frame.label.to_numpy(), 5, 0, BINARY, groups=frame.group.to_numpy())
    text = str(err.value)
    assert "4 group(s)" in text and "--cv_folds=4" in text and "\n" not in text


def test_groups_named_by_a_pattern_or_a_column(tmp_path):
    frame = pd.DataFrame({"name": ["cam1_001", "cam1_002", "cam2_001", "cam3_009"],
                          "label": [0, 1, 0, 1], "path": ""})
    out, summary = groups.assign(frame, None, groups.check_pattern(r"^(cam\d+)_"), None)
    assert list(out.group) == ["cam1", "cam1", "cam2", "cam3"]
    assert (summary.groups, summary.largest, summary.largest_name) == (3, 2, "cam1")
    assert "3 groups of photos from the file names" in summary.sentence()
    with pytest.raises(ConfigError, match="no capture group"):
        groups.check_pattern(r"^cam\d+_")
    with pytest.raises(ConfigError, match="not a regular expression"):
        groups.check_pattern(r"^(cam")
    with pytest.raises(DataError, match="no group for 1 of 4 photos.*'cam3_009'"):
        groups.assign(frame, None, r"^(cam[12])_", None)
    csv = tmp_path / "train_labels.csv"
    csv.write_text("name,invasive,site\ncam1_001,0,a\ncam1_002,1,a\ncam2_001,0,b\n"
                   "cam3_009.jpg,1,c\n")
    out, summary = groups.assign(frame, "site", None, str(csv))
    assert list(out.group) == ["a", "a", "b", "c"] and "'site'" in summary.source
    with pytest.raises(DataError, match="no such column.*invasive, site"):
        groups.assign(frame, "plot", None, str(csv))
    csv.write_text("name,invasive,site\ncam1_001,0,a\ncam1_002,1,\ncam2_001,0,b\n"
                   "cam3_009,1,c\n")
    with pytest.raises(DataError, match=r"line\(s\) 3"):
        groups.assign(frame, "site", None, str(csv))
    with pytest.raises(ConfigError, match="both"):
        groups.assign(frame, "site", r"^(cam\d)", str(csv))
    with pytest.raises(ConfigError, match="--group_pattern"):
        groups.assign(frame, "site", None, None)  # class folders have no labels CSV


def _grouped_kaggle(root, n_groups: int = 16, copies: int = 3):
    """A Kaggle layout of ``n_groups`` subjects photographed ``copies`` times each
    (names <subject>_<k>), half of each class."""
    lines = ["name,invasive"]
    for g in range(n_groups):
        for k in range(copies):
            name = f"s{g:02d}_{k}"
            write_image(str(root / "train" / f"{name}.jpg"),
                        colour_image(g % 2, seed=100 * g + k))
            lines.append(f"{name},{g % 2}")
    (root / "train_labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _spy(tmp_path, *flags):
    log = tmp_path / "spy.jsonl"
    env = {**os.environ, "GROUP_SPY_LOG": str(log), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "group_spy.py"),
                             *flags], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_every_split_and_fold_of_a_run_keeps_groups_whole(tmp_path):
    data = _grouped_kaggle(tmp_path / "data")
    common = [f"--data_dir={data}", f"--workdir={tmp_path / 'run'}", "--weights=none",
              "--noinclude_top", "--image_size=32", "--batch_size=8",
              f"--cache_dir={tmp_path / 'cache'}", "--group_pattern=^(.*)_\\d$"]
    # The whole run: validation split, CV folds (and the bag's and the audit's, which are
    # the same folds), fine-tuning's validation parts.
    result, calls = _spy(tmp_path, *common, "--val_size=12", "--cv_folds=3", "--epochs=2",
                         "--finetune_epochs=1", "--scenarios=A", "--monitor=loss",
                         "--noprobe_baseline")
    assert "16 groups of photos from the file names" in result.stdout + result.stderr
    table = pd.read_csv(tmp_path / "run" / "split.csv", dtype=str)
    assert not set(table.group[table.subset == "val"]) & set(table.group[table.subset == "train"])
    assert set(table.group) == {f"s{g:02d}" for g in range(16)}
    train = table[table.subset == "train"]
    assert train.groupby("group").fold.nunique().max() == 1  # a group in one fold
    assert set(train.fold) == {"1", "2", "3"}
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["groups"]["groups"] == 16 and metrics["label_audit"]
    assert "bag" in metrics and metrics["groups"]["largest"] == 3
    assert "16 groups of photos" in (tmp_path / "run" / "report.html").read_text()
    # The learning curve and the backbone comparison, without CV in the run: their own
    # folds.
    _, curve_calls = _spy(tmp_path, *common, "--val_size=12", "--cv_folds=0",
                          "--stage=curve")
    _, auto_calls = _spy(tmp_path, *common, "--val_size=12", "--cv_folds=0",
                         "--backbone=auto", "--backbones=vgg16@32,vgg16@40",
                         "--finetune_epochs=0", "--scenarios=A", "--epochs=2")
    for record in calls + curve_calls + auto_calls:
        assert record["grouped"] and record["pure"], record
    callers = {c for r in calls + curve_calls + auto_calls for c in r["callers"]}
    assert {"prepare", "curve_stage", "_finish"} <= callers, callers
    assert any(r["kind"] == "folds" and "make_folds" in r["callers"] and "run" in r["callers"]
               for r in auto_calls), auto_calls  # the backbones' own folds
    assert {r["kind"] for r in calls} >= {"split", "folds", "parts"}


def test_near_duplicates_joined_transitively():
    from small_photo_classifier.workflow.train import near_groups
    names = np.array(["e", "a", "b", "c", "d", "f"])
    # e~a, a~b: one group named by its first photo in name order; c~d; f alone.
    assert near_groups._components(names, [(0, 1, 0.99), (1, 2, 0.97), (3, 4, 0.96)]) == \
        ["a", "a", "a", "c", "c", "f"]


def test_near_duplicates_become_groups_of_the_split_and_folds(tmp_path, monkeypatch):
    """Without named groups, a run's near-duplicates (copies of one subject) are joined
    into groups and the split and folds are made again around them; the features and the
    threshold are stand-ins here (near-duplicates need pretrained weights)."""
    from absl import flags as absl_flags
    from small_photo_classifier.workflow.base import config, flags
    from small_photo_classifier.workflow.train import job as job_lib, near_groups
    data = _grouped_kaggle(tmp_path / "data", n_groups=16, copies=3)
    fv = absl_flags.FlagValues()
    flags.define_train(fv)
    fv(["train.py", f"--data_dir={data}", f"--workdir={tmp_path / 'run'}",
        f"--cache_dir={tmp_path / 'cache'}", "--weights=none", "--noinclude_top",
        "--image_size=32", "--val_size=12", "--cv_folds=3", "--precision=float32"])
    cfg = config.train_config(fv, list(fv))
    job = job_lib.prepare(cfg.data, cfg.model, cfg.heads, cfg.cache, cfg.runtime,
                          cfg.flag_values)
    subject = job.frame.name.str[:3].to_numpy()  # s07_2 -> s07
    rng = np.random.default_rng(0)
    centres = {s: rng.normal(size=8) for s in set(subject)}

    class Stand_in:  # one feature map per photo: its subject's direction, a little noise
        def __init__(self, *args):
            pass

        def of(self, frame):
            x = np.stack([centres[n[:3]] + rng.normal(0, 0.01, 8) for n in frame.name])
            return {job.classifier.net.feature_layer: x[:, None, None, :]}

    monkeypatch.setattr(near_groups, "Features", Stand_in)
    monkeypatch.setattr(near_groups.labelling, "near_duplicate_threshold",
                        lambda job, batch_size: (0.99, "a stand-in"))
    monkeypatch.setattr(near_groups, "wanted", lambda job, cfg: True)
    before = set(job.train.name[job.train.name.str[:3].isin(set(job.val.name.str[:3]))])
    assert before  # split one by one, copies of a subject were on both sides
    job = near_groups.regroup(job, cfg)
    assert not set(job.train.name.str[:3]) & set(job.val.name.str[:3])
    for tr, va in job.folds:
        assert not set(job.train.name.str[:3].iloc[tr]) & set(job.train.name.str[:3].iloc[va])
    table = pd.read_csv(tmp_path / "run" / "split.csv", dtype=str)
    assert table.groupby("group").subset.nunique().max() == 1
    record = json.load(open(tmp_path / "run" / "metrics.json"))["groups"]
    assert record["groups"] == 16 and record["source"].startswith("near-duplicate photos")


def test_comparisons_resample_whole_groups():
    """Ten copies of each of 30 photos are 30 pieces of evidence: the cluster bootstrap's
    interval is the one of the 30 photos, wider than the one that counts 300."""
    from small_photo_classifier.features.choose import evidence
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 30)
    candidate = np.clip(y * 0.3 + rng.uniform(0, 0.7, 30), 0, 1)
    baseline = rng.uniform(0, 1, 30)
    copies = np.repeat(np.arange(30), 10)
    alone = evidence.compare(BINARY, y, candidate, baseline, seed=1)
    by_photo = evidence.compare(BINARY, y[copies], candidate[copies], baseline[copies], seed=1)
    by_group = evidence.compare(BINARY, y[copies], candidate[copies], baseline[copies], seed=1,
                                clusters=copies)
    width = {k: c.high - c.low for k, c in
             (("alone", alone), ("photo", by_photo), ("group", by_group))}
    assert width["photo"] < 0.5 * width["group"]
    assert abs(width["group"] - width["alone"]) < 0.25 * width["alone"]


def test_calibration_cross_validates_whole_groups(monkeypatch):
    """The binary map's choice (temperature or Platt) and the cross-fitted 'after' fit
    each map on whole groups: copies of a photo never on both sides of a fold."""
    from small_photo_classifier.features import trust
    from small_photo_classifier.workflow.train import trusting
    rng = np.random.default_rng(0)
    subjects, copies = 40, 5
    group = np.repeat(np.arange(subjects), copies)
    y = np.repeat(rng.integers(0, 2, subjects), copies)
    # Each copy's probability tells its group (0.2 + 0.01 g) and its copy (1e-5 k).
    p = 0.2 + 0.01 * group + 1e-5 * np.tile(np.arange(copies), subjects)
    seen = []
    real = trust._fit_binary

    def spy(kind, yt, pt):
        seen.append(np.bincount(np.round((np.asarray(pt) - 0.2) / 0.01).astype(int),
                                minlength=subjects))
        return real(kind, yt, pt)

    monkeypatch.setattr(trust, "_fit_binary", spy)
    trust.fit("binary", y, p, "held-out", groups=group)
    trusting._cross_fitted("binary", y, p, 0, groups=group)
    assert len(seen) > 10
    for counts in seen:  # every group wholly in the map's training part, or wholly out
        assert set(np.unique(counts)) <= {0, copies}
    seen.clear()
    trust.fit("binary", y, p, "held-out")  # without groups copies do straddle: the check bites
    assert any(set(np.unique(c)) - {0, copies} for c in seen)
