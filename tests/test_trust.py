"""Predictions you can trust (issue 30): calibrated probabilities, thresholds chosen for a
purpose, and an unfamiliar score for photos unlike the training photos."""

import csv
import json
import os

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from small_photo_classifier.features import trust
from small_photo_classifier.pipeline.errors import ConfigError
from tests.conftest import colour_image, predict_in_process, write_image

SIZE = 32


def _overconfident_multiclass(n=3000, k=4, temperature=3.0, seed=0):
    """Labels drawn from softmax(z), reported as softmax(temperature * z): over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    y = np.array([rng.choice(k, p=p) for p in softmax(z, axis=1)])
    return y, softmax(temperature * z, axis=1)


def test_temperature_scaling_recovers_the_overconfidence_and_keeps_the_ranking():
    y, p = _overconfident_multiclass()
    cal = trust.fit("multiclass", y, p, "test")
    assert cal.kind == "temperature" and cal.temperature[0] == pytest.approx(3.0, rel=0.1)
    q = cal.apply("multiclass", p)
    before, after = trust.metrics("multiclass", y, p), trust.metrics("multiclass", y, q)
    assert after["ece"] < 0.03 < before["ece"]
    assert after["log_loss"] < before["log_loss"] and after["brier"] < before["brier"]
    assert np.array_equal(q.argmax(axis=1), p.argmax(axis=1))  # top-1 unchanged


def test_binary_calibration_picks_platt_for_a_shifted_model_and_keeps_auc():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    shifted = 1 / (1 + np.exp(-(z + 2.0)))  # says "positive" far too often
    cal = trust.fit("binary", y, shifted, "test")
    assert cal.kind == "platt" and cal.bias == pytest.approx(-2.0, abs=0.3)
    q = cal.apply("binary", shifted)
    assert roc_auc_score(y, q) == pytest.approx(roc_auc_score(y, shifted), abs=1e-12)
    assert trust.metrics("binary", y, q)["log_loss"] < trust.metrics("binary", y, shifted)[
        "log_loss"] - 0.05
    # Only over-confident: whichever map the CV picks recovers the true probabilities.
    sharp = 1 / (1 + np.exp(-3 * z))
    fixed = trust.fit("binary", y, sharp, "test").apply("binary", sharp)
    assert np.max(np.abs(fixed - 1 / (1 + np.exp(-z)))) < 0.05


def test_multilabel_gets_one_temperature_per_label():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1.5, (4000, 2))
    y = (rng.random((4000, 2)) < 1 / (1 + np.exp(-z))).astype(int)
    reported = 1 / (1 + np.exp(-(z * np.array([1.0, 4.0]))))
    cal = trust.fit("multilabel", y, reported, "test")
    assert cal.temperature[0] == pytest.approx(1.0, rel=0.15)
    assert cal.temperature[1] == pytest.approx(4.0, rel=0.15)
    round_trip = trust.Calibration.from_json(json.loads(json.dumps(cal.to_json())))
    assert np.allclose(round_trip.apply("multilabel", reported), cal.apply("multilabel", reported))


def test_the_unfamiliar_score_catches_far_photos_and_photos_between_classes():
    """Distance alone misses a photo between two known clusters; uncertainty alone misses
    a confident photo far from everything. The combination catches both."""
    rng = np.random.default_rng(3)
    centres = np.eye(8)[:2] * 10
    def cluster(c, n):
        return centres[c] + rng.normal(0, 1, (n, 8))
    train = np.concatenate([cluster(0, 200), cluster(1, 200)])
    held = np.concatenate([cluster(0, 100), cluster(1, 100)])
    between = (centres[0] + centres[1]) / 2 + rng.normal(0, 1, (50, 8))
    far = np.eye(8)[5] * 10 + rng.normal(0, 1, (50, 8))

    def probs(x):  # a confident two-class model: the nearer centre wins
        d = np.stack([np.linalg.norm(x - c, axis=1) for c in centres], 1)
        return softmax(-3 * d, axis=1)
    far_probs = np.tile([0.995, 0.005], (50, 1))  # confidently wrong, as real heads are
    ref = trust.deduplicate(train)
    d_held = trust.distance(ref, held)
    fitted = trust.fit_unfamiliar(d_held, trust.uncertainty("multiclass", probs(held)), 0.05,
                                  "test")
    scores = {name: fitted.score(trust.distance(ref, x), trust.uncertainty("multiclass", p))
              for name, x, p in (("held", held, probs(held)), ("between", between,
                                 probs(between)), ("far", far, far_probs))}
    for name in ("between", "far"):
        auroc = roc_auc_score(np.r_[np.zeros(200), np.ones(50)],
                              np.r_[scores["held"], scores[name]])
        assert auroc > 0.95, name
    assert fitted.flagged(scores["held"]).mean() == pytest.approx(0.05, abs=0.011)
    assert fitted.flagged(scores["far"]).mean() > 0.9


def test_distance_ignores_near_copies_and_fold_distances_leave_the_fold_out():
    x = np.random.default_rng(4).normal(size=(30, 6)).astype(np.float32)
    doubled = np.concatenate([x, x * 1.0001])
    assert len(trust.deduplicate(doubled)) == 30
    d = trust.fold_distances(x, [np.arange(0, 15), np.arange(15, 30)], k=1)
    expected = [trust.distance(x[15:], x[:15], 1), trust.distance(x[:15], x[15:], 1)]
    assert np.allclose(d, np.concatenate(expected), atol=1e-6)
    assert (d > 1e-3).all()  # never a photo's distance to itself


def test_thresholds_for_a_purpose_meet_their_target_on_the_held_out_predictions():
    from small_photo_classifier.workflow.train import trusting
    from small_photo_classifier.workflow.base.config import parse_threshold
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 600)
    p = np.clip(y * 0.3 + rng.random(600) * 0.7, 0, 1)
    (t,), expected = trusting.choose_thresholds("binary", y, p, "precision:0.9", 0)
    assert np.mean(y[p >= t]) >= 0.9 and expected["precision"] >= 0.9
    lo, hi = expected["precision_interval"]
    assert lo <= expected["precision"] <= hi
    (t,), expected = trusting.choose_thresholds("binary", y, p, "recall:0.95", 0)
    assert np.mean(p[y == 1] >= t) >= 0.95
    (t,), _ = trusting.choose_thresholds("binary", y, p, "0.5", 0)
    assert t == 0.5
    assert parse_threshold(None) is None and parse_threshold("Precision:0.90") == "precision:0.9"
    for bad in ("1.5", "precision:2", "f1", "recall:"):
        with pytest.raises(ConfigError, match="--threshold"):
            parse_threshold(bad)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_the_graph_layers_compute_what_numpy_computes(policy):
    """The exports carry `trust_layers`; predict.py computes with `trust`: the same maths,
    in float32 whatever the global policy (mixed_bfloat16 is the default on AVX512-BF16
    CPUs; forced here so that this runs on every CPU)."""
    import keras
    from small_photo_classifier.features import trust_layers
    keras.mixed_precision.set_global_policy(policy)  # put back by restore_global_state
    rng = np.random.default_rng(6)
    multiclass = softmax(rng.normal(0, 2, (40, 3)), axis=1)
    # Ties for the top class: 1 - max counts the other top class as uncertainty.
    multiclass[:3] = [[0.4, 0.4, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.45, 0.1, 0.45]]
    for kind, p in (("multiclass", multiclass),
                    ("binary", rng.random((40, 1))), ("multilabel", rng.random((40, 3)))):
        cal = (trust.Calibration("temperature", (1.7,) * (3 if kind == "multilabel" else 1))
               if kind != "binary" else trust.Calibration("platt", (), 1.3, -0.4))
        got = np.asarray(trust_layers.Calibrate(kind, cal.to_json())(p.astype(np.float32)))
        want = cal.apply(kind, p[:, 0] if kind == "binary" else p)
        assert np.allclose(got[:, 0] if kind == "binary" else got, want, atol=1e-5), kind
        ref = trust.deduplicate(rng.normal(size=(50, 16)))
        feats = rng.normal(size=(40, 16)).astype(np.float32)
        q = want if kind != "binary" else want[:, None]
        fitted = trust.fit_unfamiliar(trust.distance(ref, feats),
                                      trust.uncertainty(kind, want), 0.05, "test")
        layer = trust_layers.UnfamiliarScore(kind, fitted.to_json(), ref)
        got = np.asarray(layer([feats, q.astype(np.float32)]))
        assert layer.compute_dtype == "float32" and got.dtype == np.float32
        assert np.allclose(got, fitted.score(trust.distance(ref, feats),
                                             trust.uncertainty(kind, want)),
                           atol=1e-5, rtol=1e-5), kind


# ------------------------------------------------------------------ predict.py end to end

@pytest.fixture(scope="module")
def trusted_run(tmp_path_factory):
    """An exported binary model with a calibration, an unfamiliar score and reference
    features (`tests.conftest.trusted_run`)."""
    from tests.conftest import trusted_run as make
    return make(tmp_path_factory.mktemp("trusted_run"), SIZE)[0]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def mixed_photos(tmp_path):
    """Photos like the training photos, and grey noise unlike any."""
    folder = tmp_path / "mixed"
    for i in range(4):
        write_image(str(folder / f"known{i}.jpg"), colour_image(i % 2, size=SIZE, seed=100 + i))
    rng = np.random.default_rng(0)
    for i in range(4):
        write_image(str(folder / f"noise{i}.jpg"),
                    rng.integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8))
    return folder


def test_predict_writes_calibrated_probabilities_and_the_unfamiliar_columns(
        trusted_run, mixed_photos, tmp_path, capsys):
    from small_photo_classifier.features import trust_layers
    from small_photo_classifier.features.serve import inference
    from small_photo_classifier.pipeline import input as input_lib
    out = tmp_path / "pred.csv"
    predict_in_process(trusted_run, mixed_photos, out)
    rows = _rows(out)
    assert list(rows[0]) == ["name", "bees", "unfamiliar_score", "unfamiliar"]
    # The numbers are the stored maps applied to the network's own outputs.
    info = json.load(open(trusted_run / "model_info.json"))
    model, _ = inference.load_exported(str(trusted_run))
    paths = [str(mixed_photos / f"{r['name']}.jpg") for r in rows]
    batch = next(iter(input_lib.eval_dataset(paths, None, paths, SIZE, 32)))["image"]
    raw = np.asarray(trust_layers.with_features(model)(batch), np.float64)
    cal = trust.Calibration.from_json(info["calibration"])
    assert np.allclose([float(r["bees"]) for r in rows], cal.apply("binary", raw[:, 0]),
                       atol=1e-5)
    assert not np.allclose(cal.apply("binary", raw[:, 0]), raw[:, 0], atol=1e-3)
    fitted = trust.Unfamiliar.from_json(info["unfamiliar"])
    ref = np.load(trusted_run / trust.REFERENCE_FILE)["features"].astype(np.float32)
    scores = fitted.score(trust.distance(ref, raw[:, 1:]),
                          trust.uncertainty("binary", cal.apply("binary", raw[:, 0])))
    # Random-weight features are nearly parallel: the tiny distances make the score
    # sensitive to float32 rounding between this eager pass and predict.py's batches.
    assert np.allclose([float(r["unfamiliar_score"]) for r in rows], scores, atol=1e-2)
    flags = [r["unfamiliar"] == "1" for r in rows]
    assert flags == list(scores > fitted.threshold)
    printed = capsys.readouterr().out
    assert f"{sum(flags)} of 8 photos" in printed and "flagged unfamiliar" in printed


def test_label_output_says_unfamiliar_unless_told_not_to(trusted_run, mixed_photos, tmp_path):
    out = tmp_path / "labels.csv"
    predict_in_process(trusted_run, mixed_photos, out, output_format="label")
    rows = _rows(out)
    flagged = [r["unfamiliar"] == "1" for r in rows]
    assert any(flagged), "grey noise should be unlike red and blue photos"
    assert [r["label"] == "unfamiliar" for r in rows] == flagged
    predict_in_process(trusted_run, mixed_photos, out, output_format="label", unfamiliar_label=False)
    assert {r["label"] for r in _rows(out)} <= {"ants", "bees"}
    assert [r["unfamiliar"] == "1" for r in _rows(out)] == flagged


def test_a_run_from_before_calibration_predicts_as_before_and_says_why(
        trusted_run, mixed_photos, tmp_path, capsys):
    old = tmp_path / "old_run"
    old.mkdir()
    info = json.load(open(trusted_run / "model_info.json"))
    for key in ("calibration", "unfamiliar"):
        info.pop(key)
    (old / "model_info.json").write_text(json.dumps(info))
    os.link(trusted_run / "model.keras", old / "model.keras")
    out = tmp_path / "old.csv"
    predict_in_process(old, mixed_photos, out)
    rows = _rows(out)
    assert list(rows[0]) == ["name", "bees"]
    new = tmp_path / "new.csv"
    predict_in_process(trusted_run, mixed_photos, new)
    raw = np.array([float(r["bees"]) for r in rows])
    cal = trust.Calibration.from_json(json.load(open(trusted_run / "model_info.json"))[
        "calibration"])
    assert np.allclose([float(r["bees"]) for r in _rows(new)], cal.apply("binary", raw),
                       atol=2e-6)  # the old run: the model's own probabilities
    assert "was exported before calibration and unfamiliar scores" in capsys.readouterr().out


def test_kaggle_columns_stay_as_the_sample_submission_says(trusted_run, tmp_path):
    root = tmp_path / "kaggle"
    for i in range(4):
        write_image(str(root / "test" / f"{i + 1}.jpg"), colour_image(i % 2, size=SIZE, seed=i))
    (root / "sample_submission.csv").write_text("name,invasive\n1,0.5\n2,0.5\n3,0.5\n4,0.5\n")
    out = tmp_path / "submission.csv"
    predict_in_process(trusted_run, root, out)
    assert list(_rows(out)[0]) == ["name", "invasive"]  # the sample's column names
    side = _rows(tmp_path / "submission_unfamiliar.csv")
    assert [r["name"] for r in side] == ["1", "2", "3", "4"]
    assert list(side[0]) == ["name", "unfamiliar_score", "unfamiliar"]


@pytest.mark.slow
def test_a_multiclass_run_fits_everything_on_held_out_predictions_and_exports_it(tmp_path):
    """The demo (3 classes, random weights) end to end: calibration and the unfamiliar
    score fitted on out-of-fold predictions, stored, and carried by ONNX and TFLite as two
    outputs that agree with what predict.py computes."""
    from tests.inprocess import run
    workdir = tmp_path / "run"
    result = run("train.py", "--demo=multiclass", f"--workdir={workdir}",
                 f"--cache_dir={tmp_path}/cache", "--export=onnx,tflite", "--finetune_epochs=0")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(workdir / "model_info.json"))
    metrics = json.load(open(workdir / "metrics.json"))
    assert "out-of-fold predictions" in metrics["trust"]["held_out"]
    assert info["calibration"]["fitted_on"].startswith("out-of-fold predictions")
    unf = info["unfamiliar"]
    assert unf["rate"] == 0.05 and unf["held_out_images"] == metrics["trust"]["images"]
    held = np.array(metrics["trust"]["unfamiliar_scores"])
    assert np.mean(held > unf["threshold"]) == pytest.approx(0.05, abs=0.02)
    split = __import__("pandas").read_csv(workdir / "split.csv")
    with np.load(workdir / trust.REFERENCE_FILE) as ref:
        assert ref["features"].dtype == np.float16
        # The exported model was refit on every label: its reference is every image.
        assert int(ref["images"]) == len(split) and str(ref["backbone"]) == "vgg16"
    for fmt in ("onnx", "tflite"):
        check = metrics["exports"][fmt]
        assert check["outputs"] == ["probabilities", "unfamiliar_score"]
        assert check["max_abs_dp"] < 1e-4, fmt
        # Random-weight features of the demo's photos are all nearly parallel, so float32
        # rounding of their cosine moves the log-distance more than real features do.
        assert check["max_abs_d_unfamiliar"] < 1e-2, fmt
    for name in ("reliability.png", "unfamiliar_scores.png", "report.html"):
        assert (workdir / name).is_file()
    assert "Calibration, threshold and unfamiliar photos" in (workdir / "report.html").read_text()


def test_a_model_never_wrong_on_the_held_out_images_is_not_made_certain():
    """No mistakes among the held-out predictions: the likelihood alone would drive the
    temperature to 0 (certainty for every later photo); the map may only soften then."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 200)
    p = np.full((200, 3), 0.1)
    p[np.arange(200), y] = 0.8  # right every time, modestly confident
    cal = trust.fit("multiclass", y, p, "test")
    assert cal.temperature[0] >= 1.0
    # With enough mistakes the same under-confidence is sharpened.
    wrong = y.copy()
    wrong[:30] = (y[:30] + 1) % 3
    assert trust.fit("multiclass", wrong, p, "test").temperature[0] < 1.0


def test_scoring_reports_the_share_flagged_and_accuracy_on_the_rest(trusted_run, tmp_path):
    folder = tmp_path / "labelled"
    rows = ["name,label"]
    for i in range(8):
        write_image(str(folder / f"p{i}.jpg"), colour_image(i % 2, size=SIZE, seed=200 + i))
        rows.append(f"p{i},{'bees' if i % 2 else 'ants'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "scored.csv"
    scores = predict_in_process(trusted_run, folder, out, labels=str(tmp_path / "labels.csv"))
    table = _rows(out)
    flagged = np.array([r["unfamiliar"] == "1" for r in table])
    assert scores["unfamiliar_share"] == pytest.approx(flagged.mean())
    if (~flagged).any():
        p = np.array([float(r["bees"]) for r in table])
        y = np.array([i % 2 for i in range(8)])[[int(r["name"][1:]) for r in table]]
        kept = ~flagged
        assert scores["accuracy_not_flagged"] == pytest.approx(
            np.mean((p[kept] >= 0.5).astype(int) == y[kept]))
    saved = json.load(open(tmp_path / "scored_metrics.json"))
    assert saved["scores"]["unfamiliar_share"] == scores["unfamiliar_share"]


def test_too_few_held_out_images_export_without_calibration_and_say_so():
    """No out-of-fold predictions and 3 validation images: nothing is fitted, the export
    goes on as before calibration existed, and metrics.json says why."""
    import types
    from small_photo_classifier.workflow.train import trusting
    job = types.SimpleNamespace(
        task=types.SimpleNamespace(kind="binary"), folds=None, val=[0, 1, 2],
        run=types.SimpleNamespace(file=lambda *p: "/nonexistent"))
    predict = types.SimpleNamespace(unfamiliar_rate=0.05, threshold=None)
    out = trusting.fit_held_out(job, None, 4, "probe", "block5_pool", None, predict,
                                oof_ok=False)
    assert out["info"] == {} and "only 3 validation image(s)" in out["metrics"]["skipped"]


def test_the_prior_shift_is_bayes_rule_and_the_graph_computes_it_too():
    """Issue 48: probabilities moved from the training shares to the field's are
    p * field/training, renormalised (Saerens et al. 2002), in NumPy and in the graph;
    the unshifted probabilities (what the unfamiliar score measures) stay available."""
    import keras
    from small_photo_classifier.features import trust_layers
    rng = np.random.default_rng(0)
    # Binary: training 50/50, field 20 % positive.
    p = rng.uniform(0.01, 0.99, 50)
    cal = trust.Calibration("temperature", (1.3,), prior_shift=trust.prior_shift(
        "binary", [0.5, 0.5], [0.8, 0.2]))
    base = trust.Calibration("temperature", (1.3,)).apply("binary", p)
    expected = base * 0.4 / (base * 0.4 + (1 - base) * 1.6)
    np.testing.assert_allclose(cal.apply("binary", p), expected, atol=1e-9)
    np.testing.assert_allclose(cal.apply("binary", p, shift=False), base, atol=1e-12)
    # Multi-class: training (0.5, 0.3, 0.2), field (0.2, 0.3, 0.5).
    q = rng.dirichlet(np.ones(3), 40)
    shifted = trust.Calibration(prior_shift=trust.prior_shift(
        "multiclass", [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]))
    ratio = q * np.array([0.4, 1.0, 2.5])
    np.testing.assert_allclose(shifted.apply("multiclass", q),
                               ratio / ratio.sum(axis=1, keepdims=True), atol=1e-9)
    again = trust.Calibration.from_json(shifted.to_json())
    assert again.prior_shift == shifted.prior_shift
    for kind, values, c in (("binary", p[:, None], cal), ("multiclass", q, shifted)):
        for shift in (True, False):
            layer = trust_layers.Calibrate(kind, c.to_json(), shift=shift)
            got = np.asarray(layer(keras.ops.convert_to_tensor(values, "float32")))
            want = c.apply(kind, values[:, 0] if kind == "binary" else values, shift=shift)
            np.testing.assert_allclose(got.reshape(want.shape), want, atol=2e-6)


def test_em_estimates_the_class_shares_of_the_photos_given():
    """Calibrated probabilities of photos drawn 20/80 from a model trained 50/50: the EM
    procedure finds about 0.2 where the mean probability says far more."""
    rng = np.random.default_rng(1)
    n = 2000
    y = (rng.random(n) < 0.2).astype(int)
    # A calibrated model at training shares 50/50: the likelihood ratio of a noisy score.
    score = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    p = 1 / (1 + np.exp(-2 * score))  # P(positive | score) at equal priors
    naive = p.mean()
    shares = trust.estimate_prior("binary", p, [0.5, 0.5])
    assert abs(shares[1] - 0.2) < 0.03 and abs(naive - 0.2) > 0.1


def test_prior_flags_are_checked_and_read_against_the_classes():
    from small_photo_classifier.features.task import Task
    from small_photo_classifier.pipeline.errors import ConfigError
    from small_photo_classifier.workflow.base import prior
    binary = Task("binary", ("ants", "bees"))
    np.testing.assert_allclose(prior.field_shares("bees:0.2", binary), [0.8, 0.2])
    np.testing.assert_allclose(prior.field_shares("ants:0.2", binary), [0.2, 0.8])
    np.testing.assert_allclose(prior.field_shares("0.05", binary), [0.95, 0.05])
    three = Task("multiclass", ("a", "b", "c"))
    np.testing.assert_allclose(prior.field_shares("a:0.5,b:0.3,c:0.2", three), [0.5, 0.3, 0.2])
    for text, task, said in (("wasps:0.2", binary, "no class 'wasps'"),
                             ("a:0.5,b:0.3", three, "name every class"),
                             ("0.2", three, "two classes only"),
                             ("a:0.5,b:0.3,c:0.3", three, "sum 1.1")):
        with pytest.raises(ConfigError, match=said):
            prior.field_shares(text, task)
    for text in ("bees:1.5", "bees:x", "bees"):
        with pytest.raises(ConfigError):
            prior.check_text(text)
    with pytest.raises(ConfigError, match="predict.py's"):
        prior.check_text("estimate")
    assert prior.check_text("estimate", allow_estimate=True) == "estimate"


@pytest.mark.slow
def test_a_prior_given_at_training_moves_every_probability_and_predict_can_estimate_one(
        tmp_path, capsys):
    """train.py --prior stores the shift with the model (model_info.json says both
    shares, the thresholds are for the field); predict.py gives the moved probabilities,
    can move them elsewhere (--prior) or to the shares it estimates (--prior=estimate)."""
    import pandas as pd
    from tests.conftest import class_folders
    from tests.inprocess import run
    data = class_folders(tmp_path / "data", 40)
    result = run("train.py", f"--data_dir={data}", f"--workdir={tmp_path}/run",
                 f"--cache_dir={tmp_path}/cache", "--weights=none", "--noinclude_top",
                 "--image_size=32", "--val_size=0.5", "--batch_size=8", "--epochs=3",
                 "--scenarios=B", "--cv_folds=0", "--finetune_epochs=0", "--tta=1",
                 "--notensorboard", "--prior=pos:0.1")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(tmp_path / "run" / "model_info.json"))
    assert info["prior"]["training"] == {"neg": 0.5, "pos": 0.5}
    assert info["prior"]["field"] == {"neg": 0.9, "pos": 0.1}
    assert info["calibration"]["prior_shift"][0] == pytest.approx(np.log(1 / 9))
    photos = tmp_path / "data" / "pos"
    predict_in_process(tmp_path / "run", photos, tmp_path / "a.csv")
    stored = pd.read_csv(tmp_path / "a.csv")
    predict_in_process(tmp_path / "run", photos, tmp_path / "b.csv", prior="pos:0.5")
    undone = pd.read_csv(tmp_path / "b.csv")
    p, q = undone.pos.to_numpy(), stored.pos.to_numpy()
    np.testing.assert_allclose(q, p / 9 / (p / 9 + (1 - p)), atol=2e-6)  # CSV rounding
    capsys.readouterr()
    predict_in_process(tmp_path / "run", photos, tmp_path / "c.csv", prior="estimate")
    said = capsys.readouterr().out
    assert "estimated class shares of these 20 photos" in said and "rough estimate" in said
