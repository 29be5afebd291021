"""Honest outputs (issue 27): nothing is given a number it was not computed for, and every
column and line says what it is."""

import csv
import os

import numpy as np
import pandas as pd
import pytest

from small_photo_classifier.pipeline import discovery
from tests.conftest import colour_image, predict_in_process, write_image

SIZE = 32


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """An exported ants/bees model (random weights; in-process, no training needed)."""
    from small_photo_classifier.features import backbone
    from small_photo_classifier.features.serve import inference
    root = tmp_path_factory.mktemp("honest_run")
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    inference.export_model(clf.model, str(root), {
        "image_size": SIZE, "task": "binary", "class_names": ["ants", "bees"],
        "positive_class": "bees", "binary_column": "bees"})
    return root


@pytest.fixture
def photos_with_a_broken_one(tmp_path):
    """Six readable photos and one truncated JPEG."""
    folder = tmp_path / "photos"
    for i in range(6):
        write_image(str(folder / f"p{i}.jpg"), colour_image(i % 2, size=SIZE, seed=i))
    whole = open(folder / "p0.jpg", "rb").read()
    (folder / "broken.jpg").write_bytes(whole[: len(whole) // 3])
    return folder


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("output_format", ["probabilities", "label"])
def test_an_unreadable_photo_gets_no_row_and_is_listed_with_its_reason(
        binary_run, photos_with_a_broken_one, tmp_path, output_format, capsys):
    out = tmp_path / "pred.csv"
    predict_in_process(binary_run, photos_with_a_broken_one, out, output_format=output_format)
    rows = _rows(out)
    assert len(rows) == 1 + 6
    assert "broken" not in [r[0] for r in rows[1:]]
    assert all(r[1] for r in rows[1:])  # every written row has a value
    bad = _rows(tmp_path / "pred_bad_images.csv")
    assert bad[0] == ["path", "reason"] and len(bad) == 2
    assert bad[1][0].endswith("broken.jpg") and "truncated" in bad[1][1]
    printed = capsys.readouterr().out
    assert "Wrote 6 predictions" in printed and "1 unreadable image(s) got no prediction" in printed
    if output_format == "label":
        assert "P(bees)" not in printed and "the most probable class" in printed


def test_kept_bad_rows_are_empty_with_a_status(binary_run, photos_with_a_broken_one,
                                                tmp_path):
    for output_format in ("probabilities", "label"):
        out = tmp_path / f"{output_format}.csv"
        predict_in_process(binary_run, photos_with_a_broken_one, out, output_format=output_format,
                 keep_bad_rows=True)
        rows = _rows(out)
        assert rows[0][-1] == "status" and len(rows) == 1 + 7
        by_name = {r[0]: r for r in rows[1:]}
        assert by_name["broken"][1] == "" and by_name["broken"][2].startswith("unreadable:")
        assert all(r[1] != "" and r[2] == "ok" for n, r in by_name.items() if n != "broken")


def test_binary_column_names_the_positive_class_unless_a_csv_names_it(binary_run, tmp_path):
    from small_photo_classifier.workflow.base import outputs
    folder = tmp_path / "two"
    for i in range(2):
        write_image(str(folder / f"q{i}.jpg"), colour_image(i, size=SIZE, seed=i))
    predict_in_process(binary_run, folder, tmp_path / "a.csv")
    assert _rows(tmp_path / "a.csv")[0] == ["name", "bees"]
    # The rule itself: sample_submission's column, then the labels CSV's, then the class.
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("name,invasive\n1,0.5\n")
    assert outputs.binary_column(("ants", "bees"), str(sample), "x") == "invasive"
    assert outputs.binary_column(("0", "1"), None, "invasive") == "invasive"
    assert outputs.binary_column(("0", "1"), None, "alien") == "alien"
    assert outputs.binary_column(("ants", "bees")) == "bees"
    assert outputs.binary_column(("0", "1")) == "invasive"  # a model from before the column


def test_kaggle_layout_records_its_labels_column(kaggle_dir, tmp_path):
    from tests.conftest import class_folders
    assert discovery.discover(str(kaggle_dir)).label_column == "invasive"
    assert discovery.discover(class_folders(tmp_path / "cf", 8)).label_column is None


def test_predict_frame_gives_unreadable_rows_no_number(binary_run, photos_with_a_broken_one,
                                                       tmp_path):
    from small_photo_classifier.features.serve import inference
    from small_photo_classifier.pipeline import scan
    frame = discovery.discover_unlabelled(str(photos_with_a_broken_one))
    frame = scan.filter_bad_images(frame, SIZE, "skip", str(tmp_path / "bad.csv"),
                                   keep_rows=True)
    model, _ = inference.load_exported(str(binary_run))
    outputs = inference.predict_frame(model, frame, SIZE, 4, progress=False)
    broken = frame.name.tolist().index("broken")
    assert np.isnan(outputs[broken]).all()
    assert np.isfinite(np.delete(outputs, broken, axis=0)).all()
    assert "truncated" in frame.reason[broken]


def _choice(head_oof, probe_oof, probe_baseline):
    """The heads stage's choice on out-of-fold predictions of 40 images in 2 folds."""
    from types import SimpleNamespace
    from small_photo_classifier.features import task as task_lib
    from small_photo_classifier.workflow.train import heads_choice
    y = np.tile([0, 1], 20)
    folds = [(np.arange(20, 40), np.arange(20)), (np.arange(20), np.arange(20, 40))]
    job = SimpleNamespace(task=task_lib.binary(), y_train=y, folds=folds, seed=0,
                          train=pd.DataFrame({"name": [f"p{i}" for i in range(40)]}))
    best = SimpleNamespace(scenario="B", selected_by="cross-validation", score=0.9,
                           cv=SimpleNamespace(oof_probs=head_oof(y)))
    probe_choice = SimpleNamespace(oof_probs=probe_oof(y))
    choice = heads_choice.probe_or_head(job, best, probe_choice, {"cv_auc_mean": 0.8},
                                        probe_baseline)
    return choice, heads_choice.choice_sentence(choice, "B")


def test_the_probe_is_kept_unless_a_scenario_beats_it_beyond_noise():
    rng = np.random.default_rng(0)
    perfect = lambda y: np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.01, len(y))  # noqa: E731
    noisy = lambda y: np.clip(y * 0.2 + rng.random(len(y)) * 0.8, 0, 1)  # noqa: E731
    # About as good as each other: the simpler probe stays, and the words say so.
    choice, words = _choice(perfect, perfect, probe_baseline=True)
    assert choice["scenario"] == "probe"
    assert choice["probe_vs_head"]["kept"] == "the linear probe"
    assert words.startswith("neither scenario B nor the linear probe is better beyond noise")
    assert "the probe, the simpler model, is kept" in words
    # A scenario that clearly wins is kept, and the difference is the scenario's gain.
    choice, words = _choice(perfect, noisy, probe_baseline=True)
    assert choice["scenario"] == "B" and "scenario B beats the linear probe beyond noise" in words
    assert "scenario B minus the probe +" in words
    # --noprobe_baseline: the scenario stays unless the probe clearly wins.
    choice, words = _choice(perfect, perfect, probe_baseline=False)
    assert choice["scenario"] == "B" and choice["probe_vs_head"]["kept"] == "scenario B"
    assert "--noprobe_baseline" in words
    # The scenario as the baseline and better beyond noise: said so, with a positive
    # difference (the words once said "the probe is not better ... difference -0.1181").
    choice, words = _choice(perfect, noisy, probe_baseline=False)
    assert choice["scenario"] == "B"
    assert words.startswith("scenario B beats the linear probe beyond noise (scenario B minus "
                            "the probe +")
    choice, words = _choice(noisy, perfect, probe_baseline=False)
    assert choice["scenario"] == "probe"
    assert words.startswith("the linear probe beats scenario B beyond noise (scenario B minus "
                            "the probe -")


def test_scoring_says_when_the_model_was_trained_on_the_scored_images(
        binary_run, photos_with_a_broken_one, tmp_path, capsys):
    import pandas as pd
    from small_photo_classifier.workflow.use import predicting
    photos = sorted(str(p) for p in photos_with_a_broken_one.glob("p*.jpg"))
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.keras", "model_info.json"):
        (run / name).write_bytes((binary_run / name).read_bytes())
    pd.DataFrame({"name": [os.path.basename(p)[:-4] for p in photos],
                  "label": ["ants", "bees"] * 3,
                  "subset": ["train", "train", "val", "val", "train", "val"],
                  "path": photos}).to_csv(run / "split.csv", index=False)
    assert predicting.trained_on(str(run), photos, {}) == 3
    assert predicting.trained_on(str(run), photos, {"refit": True}) == 6
    assert predicting.trained_on(str(tmp_path), photos, {}) == 0  # no split.csv
    labels = tmp_path / "labels.csv"
    labels.write_text("name,label\n" + "".join(
        f"p{i},{'bees' if i % 2 else 'ants'}\n" for i in range(6)) + "broken,ants\n")
    scores = predict_in_process(run, photos_with_a_broken_one, tmp_path / "s.csv", labels=str(labels))
    assert scores["trained_on_images"] == 3 and scores["n"] == 6
    assert "was trained on 3 of these 6 images" in capsys.readouterr().out
    assert "not a held-out score" in (tmp_path / "s_report.html").read_text()


def test_fine_tuning_that_cannot_change_the_export_is_skipped_and_said(tmp_path):
    """An epoch is kept only when it beats the head on the monitored score: a head that
    already scores 1 cannot be beaten, so no epoch (nor a cached view) is spent on it."""
    from types import SimpleNamespace
    from small_photo_classifier.features import task as task_lib
    from small_photo_classifier.workflow.train import export
    from small_photo_classifier.workflow.base import state as state_lib
    state_lib.update(str(tmp_path), heads={"A": state_lib.HeadState(3, val_score=1.0),
                                           "B": state_lib.HeadState(3, val_score=0.99)})
    job = SimpleNamespace(task=task_lib.binary(), run=SimpleNamespace(path=str(tmp_path)),
                          val=list(range(40)))

    def config(**kw):
        return SimpleNamespace(**{"epochs": 5, "monitor": None, **kw})
    said = export._cannot_improve(job, config(), "A")
    assert said.startswith("fine-tuning skipped: scenario A's head already scores AUC 1.0000 "
                           "on the 40 validation images")
    assert "--finetune_epochs=5 had no effect" in said
    assert export._cannot_improve(job, config(), "B") is None  # room to improve
    assert export._cannot_improve(job, config(monitor="loss"), "A") is None  # loss can fall
    assert export._cannot_improve(job, config(epochs=0), "A") is None  # nothing asked
    assert export._cannot_improve(job, config(), "C") is None  # no head recorded
