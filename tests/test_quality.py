"""Model-quality machinery: scenario table, probe, CV selection, sweep, bag, val_size."""

import json
import os

import keras
import numpy as np
import pandas as pd
import pytest

from small_photo_classifier.features import backbone, networks, scenarios
from small_photo_classifier.features.choose import bag, cv, probe, sweep
from small_photo_classifier.features.store import cache, rows
from small_photo_classifier.features.fit import finetune, heads
from small_photo_classifier.features.fit.settings import FinetuneSettings, FitSettings
from small_photo_classifier.features import task as task_lib
from small_photo_classifier.features.fit.loop import restore, snapshot
from small_photo_classifier.pipeline import discovery, split
from small_photo_classifier.pipeline import input as input_lib
from small_photo_classifier.pipeline.errors import ConfigError
from tests.conftest import class_folders
from tests.inprocess import run as _run

BINARY = task_lib.binary()

SIZE = 32


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """16 tiny labelled images, a classifier, and their cached features."""
    root = tmp_path_factory.mktemp("quality")
    ds = discovery.discover(class_folders(root / "data", 16), positive_class="pos")
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    spec = cache.CacheSpec("none(seed=0)", False, SIZE, data_dir=ds.data_dir, net=networks.VGG16)
    path = cache.ensure_features(clf, spec, ds.frame, str(root / "cache"),
                                 cache.Extraction(4, progress=False)).path
    feats = cache.load_features(path, spec, ds.frame, spec.layers)
    return clf, ds, feats, ds.frame.label.to_numpy(), root


def test_scenario_table_rates_and_an_explicit_rate_wins():
    assert scenarios.get_scenario("a").learning_rate == 1e-3
    assert scenarios.get_scenario("B").learning_rate == 1e-4
    assert scenarios.get_scenario(" c ").learning_rate == 1e-4
    assert heads.HeadConfig.for_scenario("C").learning_rate == 1e-4
    assert heads.HeadConfig.for_scenario("C", 3e-2).learning_rate == 3e-2
    # A head that pools the feature map (every backbone but VGG16) learns at 1e-3.
    assert heads.HeadConfig.for_scenario("B", pooling="avg").learning_rate == 1e-3
    assert heads.HeadConfig.for_scenario("C", pooling="avg").learning_rate == 1e-3
    assert heads.HeadConfig.for_scenario("C", 3e-2, pooling="avg").learning_rate == 3e-2
    assert scenarios.get_scenario("C").start_layer(False, networks.VGG16) == "block4_pool"
    assert scenarios.get_scenario("A").start_layer(True, networks.VGG16) == "fc2"
    with pytest.raises(ConfigError, match="Unknown scenario 'D'"):
        scenarios.get_scenario("D")


def test_val_size_auto_is_200_for_large_data_and_a_fifth_for_small():
    from small_photo_classifier.workflow.train.job import resolve_val_size
    assert resolve_val_size("auto", 2295) == 200
    assert resolve_val_size("auto", 244) == 0.2
    assert resolve_val_size("50", 244) == 50


def test_folds_are_stratified_disjoint_and_cover_every_row():
    labels = np.array([0] * 12 + [1] * 8)
    folds = cv.make_folds(labels, 4, seed=3)
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen) == list(range(20))  # every row validated exactly once
    for tr, va in folds:
        assert not set(tr) & set(va)
        assert np.bincount(labels[va]).tolist() == [3, 2]  # stratified
    with pytest.raises(ConfigError, match="at least 9 training images in each class"):
        cv.make_folds(labels, 9, seed=0)


def test_the_chosen_epoch_has_the_best_mean_over_folds():
    curves = np.array([[0.6, 0.9, 0.8], [0.7, 0.7, 0.9]])  # means 0.65, 0.80, 0.85
    assert cv.best_epoch(curves) == 3
    result = cv.CVResult(curves, 3, "auc", np.zeros(2), [])
    assert result.mean == pytest.approx(0.85) and result.std == pytest.approx(0.05)
    summary = result.summary()
    assert summary["fold_aucs"] == [0.8, 0.9] and summary["auc_mean"] == pytest.approx(0.85)
    assert cv.best_epoch(np.array([[np.nan, 0.7], [np.nan, 0.6]])) == 2  # NaN never wins


def test_patient_cv_trains_in_rounds_what_one_fit_trains_and_stops_by_evidence(cached,
                                                                               tmp_path):
    """Folds trained side by side in rounds (each fold's state parked between them, in
    memory or on disk) end with the weights and curves of one uninterrupted fit per
    fold; the run stops once the mean curve has not improved for `patience` epochs, and
    an epoch chosen at the limit says so."""
    clf, _, feats, y, _ = cached
    start = scenarios.get_scenario("B").start_layer(False, clf.net)
    folds = cv.make_folds(y, 2, seed=0)
    with heads.HeadConfig.for_scenario("B", 1e-3).trainer(clf, BINARY) as trainer:
        patient = cv.cross_validate(trainer, feats[start], y, folds,
                                    FitSettings(12, 4, patience=2))
        epochs = patient.curves.shape[1]
        assert epochs >= 3  # a second round at least: the first ends at epoch 2
        # It stopped 2 epochs after the last gain of a row's worth (or at the limit).
        assert epochs == 12 or epochs - cv.last_gain(patient.curves, 1 / len(y)) == 2
        straight = cv.cross_validate(trainer, feats[start], y, folds, FitSettings(epochs, 4))
        np.testing.assert_allclose(patient.curves, straight.curves, atol=1e-6)
        np.testing.assert_allclose(patient.oof_probs, straight.oof_probs, atol=1e-6)
        # The bag's members: each fold trained again straight to the chosen epoch, as the
        # rounds trained it (a state parked on disk too).
        cv.FoldStates.IN_MEMORY, saved = 0, cv.FoldStates.IN_MEMORY
        try:
            on_disk = cv.cross_validate(trainer, feats[start], y, folds,
                                        FitSettings(12, 4, patience=2,
                                                    scratch_dir=str(tmp_path / "scratch")))
        finally:
            cv.FoldStates.IN_MEMORY = saved
        np.testing.assert_allclose(on_disk.curves, patient.curves, atol=1e-6)
        assert os.listdir(tmp_path / "scratch") == []  # parked states are removed
        limited = cv.cross_validate(trainer, feats[start], y, folds,
                                    FitSettings(1, 4, patience=2))
    assert limited.at_limit and limited.summary()["still_improving_at_limit"]
    assert patient.summary()["epochs_trained"] == epochs


def test_a_fit_continued_from_its_state_equals_one_fit(cached):
    clf, _, feats, y, _ = cached
    start = scenarios.get_scenario("B").start_layer(False, clf.net)
    initial = snapshot(clf.model)
    with heads.HeadConfig.for_scenario("B", 1e-3).trainer(clf, BINARY) as trainer:
        trainer.fit(feats[start], y, FitSettings(4, 4), keep=None)
        whole = [w.copy() for w in trainer.state()]
        restore(clf.model, initial)
        trainer.fit(feats[start], y, FitSettings(2, 4), keep=None)
        half = trainer.state()
        restore(clf.model, initial)
        trainer.set_state(half)
        trainer.fit(feats[start], y, FitSettings(4, 4), keep=None, first_epoch=2)
        for a, b in zip(whole, trainer.state()):
            np.testing.assert_allclose(a, b, atol=1e-6)
    restore(clf.model, initial)


def test_with_views_adds_the_same_images_views_view_major():
    x = np.arange(4)[:, None].astype(float)          # 4 images
    views = 10 + np.arange(8)[:, None].astype(float)  # 2 views: rows v*4 + i
    xs, ys = rows.with_views(x, np.array([0, 1, 0, 1]), views, rows=[1, 3])
    assert xs[:, 0].tolist() == [1, 3, 11, 13, 15, 17]
    assert ys.tolist() == [1, 1, 1, 1, 1, 1]


def test_probe_separates_separable_features_and_not_random_labels():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    x = rng.normal(size=(80, 2, 2, 8)) + y[:, None, None, None] * 1.5
    assert probe.pooled(x).shape == (80, 8) and probe.pooled(x, "flatten").shape == (80, 32)
    np.testing.assert_allclose(probe.pooled(x)[0], x[0].mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(probe.pooled(x, "max")[0], x[0].max(axis=(0, 1)), rtol=1e-6)
    order = rng.permutation(80)
    tr, va = order[:60], order[60:]
    choice = probe.choose(x[tr], y[tr], BINARY)
    assert choice.tried == (len(probe.POOLINGS) * 2 - len(probe.NOT_TRIED)) * len(probe.C_GRID)
    assert choice.mean > 0.9 and choice.config.c in probe.C_GRID
    fitted = probe.fit(probe.pooled(x[tr], choice.config.pooling), y[tr], BINARY, choice.config)
    auc = BINARY.scores(y[va], probe.probabilities(
        fitted, probe.pooled(x[va], choice.config.pooling), BINARY))["auc"]
    assert auc > 0.9
    noise = rng.normal(size=(80, 8))
    shuffled = rng.permutation(y)
    bad = probe.cross_validate(noise, shuffled, cv.make_folds(shuffled, 4, 0), BINARY)
    assert bad["auc_mean"] < 0.75


def test_row_space_keeps_every_inner_product_and_fits_like_the_raw_features():
    # Wide and rank-deficient, as flattened feature maps of a few hundred photos.
    from small_photo_classifier.features.choose import linear
    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 300))
    x[12:] = x[:12] * 2.0  # half the rows repeat: rank 12
    y = (x[:, :5].sum(axis=1) > 0).astype(int)
    z = linear.row_space(x, block=64)  # several column blocks
    assert z.shape == (24, 12)
    np.testing.assert_allclose(z @ z.T, x @ x.T, atol=1e-8)
    np.testing.assert_allclose(z.T @ z, np.diag(np.diag(z.T @ z)), atol=1e-8)
    from sklearn.linear_model import LogisticRegression
    raw = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x, y)
    fitted = probe.fit(x, y, BINARY, probe.ProbeConfig("flatten", False, 1.0))
    # Fitted in 12 coordinates, mapped back to the 300 features.
    assert fitted.coef.shape == (1, 300)
    np.testing.assert_allclose(probe.probabilities(fitted, x, BINARY),
                               raw.predict_proba(x)[:, 1], atol=1e-4)


@pytest.mark.parametrize("kind", ["binary", "multiclass", "two-class multiclass",
                                  "multilabel"])
@pytest.mark.parametrize("width, scaled, weighted", [(6, False, False), (6, True, True),
                                                     (90, False, True), (90, True, False)])
def test_the_probe_fits_what_scikit_learn_fits(kind, width, scaled, weighted):
    """The probe's own solver (features.choose.linear) reaches scikit-learn's
    LogisticRegression optimum: multinomial for classes, one-vs-rest for labels, class
    weights, standardisation, and features wider than the rows (row space)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, width)) * rng.uniform(0.1, 10, width) + rng.normal(size=width)
    names = {"binary": ("a", "b"), "two-class multiclass": ("a", "b")}.get(kind, ("a", "b", "c"))
    task = task_lib.Task("multiclass" if kind.endswith("multiclass") else kind, names)
    if kind == "multilabel":
        y = (x[:, :3] + rng.normal(size=(40, 3)) > 0).astype(int)
    else:
        y = (np.digitize(x[:, 0] + rng.normal(size=40), [-0.5, 0.5]) % len(names))
    weights = {0: 2.0, 1: 0.5} if weighted and kind != "multilabel" else None
    config = probe.ProbeConfig("flatten", scaled, 0.3)
    mine = probe.fit(x, y, task, config, class_weight=weights)
    features = StandardScaler().fit_transform(x) if scaled else x
    reference = LogisticRegression(C=0.3, tol=1e-10, max_iter=20000, class_weight=weights)
    if kind == "multilabel":
        reference = OneVsRestClassifier(reference)
    want = reference.fit(features, y).predict_proba(features)
    want = want[:, 1] if task.kind == "binary" else want
    np.testing.assert_allclose(probe.probabilities(mine, x, task), want, atol=2e-4)


@pytest.mark.parametrize("kind, units", [("binary", 1), ("multiclass", 3), ("multilabel", 3)])
@pytest.mark.parametrize("pooling", probe.POOLINGS)
@pytest.mark.parametrize("scaled", [False, True])
def test_probe_as_a_keras_head_predicts_what_scikit_learn_predicts(kind, units, pooling,
                                                                    scaled):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 2, 2, 5)).astype(np.float32) * 10
    if kind == "multilabel":
        y = (rng.random((30, 3)) < 0.5).astype(int)
        y[:, 0] = np.arange(30) % 2
    else:
        y = np.arange(30) % (2 if kind == "binary" else 3)
    task = task_lib.Task(kind, ("a", "b") if kind == "binary" else ("a", "b", "c"))
    config = probe.ProbeConfig(pooling, scaled, 0.1)
    fitted = probe.fit(probe.pooled(x, pooling), y, task, config)
    head = probe.keras_head(fitted, config, task, x.shape[1:])
    expected = probe.probabilities(fitted, probe.pooled(x, pooling), task)
    got = task.probabilities(head.predict(x, verbose=0))
    assert head.output.shape[-1] == units
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_heads_stage_keeps_the_weights_of_the_epoch_cv_chose(cached, tmp_path):
    clf, _, feats, y, root = cached
    folds = cv.make_folds(y, 2, seed=0)
    start = snapshot(clf.model)
    results = heads.train_scenarios(clf, ["A", "B"], BINARY,
                                    heads.FeatureSplit(feats, y, folds=folds),
                                    heads.FeatureSplit(feats, y), FitSettings(3, 4, progress=False),
                                    out_dir=str(tmp_path))
    best = heads.best_result(results)
    for r in results.values():
        assert r.selected_by == "cross-validation" and r.best_epoch == r.cv.epoch
        assert r.config.learning_rate == scenarios.get_scenario(r.scenario).learning_rate
        assert r.score == r.cv.mean  # ranked by CV, not by the validation set
        if r is not best:  # CV ranked it lower: not fitted, nothing saved
            assert not r.fitted and r.weights_path is None and r.val_probs is None
            continue
        # The saved head is the whole training split's fit stopped at the CV epoch:
        # the same fit by hand (same seed, same compiled step) gives the same outputs.
        restore(clf.model, start)
        with r.config.trainer(clf, BINARY) as trainer:
            trainer.fit(feats[r.start_layer], y, FitSettings(r.cv.epoch, 4), keep=None)
            by_hand = trainer.predict(feats[r.start_layer])
        restore(clf.model, start)
        heads.load_scenario_weights(clf, r.scenario, r.weights_path)
        saved = scenarios.get_scenario(r.scenario).part(clf).predict(feats[r.start_layer],
                                                                     verbose=0)[:, 0]
        np.testing.assert_allclose(saved, by_hand, atol=1e-5)
    restore(clf.model, start)


def test_dropout_rate_applies_for_a_while_and_is_restored(cached):
    clf = cached[0]
    layer = clf.head.get_layer("dropout")
    assert layer.rate == 0.5
    with clf.dropout_rate(0.1):
        assert layer.rate == 0.1
    assert layer.rate == 0.5
    with pytest.raises(ConfigError, match="Dropout rate"):
        with clf.dropout_rate(1.5):
            pass


def test_sweep_grid_validates_and_collapses_dropout_without_a_dropout_layer():
    grid = sweep.build_grid(["a", "B"], [1e-3, 1e-4], ["adam", "SGD"], [0.2, 0.5], [0, 2],
                            head_has_dropout=False)
    assert len(grid) == 2 * 2 * 2 * 1 * 2 and all(c.dropout is None for c in grid)
    assert {c.optimizer for c in grid} == {"adam", "sgd"}
    assert len(sweep.build_grid(["A"], [1e-3], ["adam"], [0.2, 0.5], [0])) == 2
    with pytest.raises(ConfigError, match="Unknown optimizer 'adagrad'"):
        sweep.build_grid(["A"], [1e-3], ["adagrad"], [0.5], [0])


@pytest.mark.slow
def test_sweep_scores_every_configuration_by_its_folds_and_ranks_them(cached, tmp_path):
    clf, _, feats, y, _ = cached
    grid = sweep.build_grid(["A", "B"], [1e-3], ["adam", "rmsprop"], [0.5], [0, 1])
    mirrored = {k: v[:, :, ::-1] for k, v in feats.items()}  # one "view" per image
    folds = cv.make_folds(y, 2, seed=0)
    table = sweep.run(clf, grid, BINARY, heads.FeatureSplit(feats, y, mirrored, folds),
                      FitSettings(2, 4, progress=False))
    assert list(table["rank"]) == list(range(1, len(grid) + 1))
    assert set(zip(table.scenario, table.optimizer, table.views)) == {
        (c.scenario, c.optimizer, c.views) for c in grid}
    for row in table.itertuples():  # each row's numbers are its own folds' scores
        folds_auc = [float(a) for a in row.fold_aucs.split()]
        assert len(folds_auc) == 2
        assert row.cv_auc_mean == pytest.approx(np.mean(folds_auc), abs=1e-4)
        assert row.cv_auc_std == pytest.approx(np.std(folds_auc), abs=1e-4)
    csv_path = str(tmp_path / "sweep.csv")
    table.to_csv(csv_path, index=False)
    again = sweep.read_table(csv_path)
    assert sweep.best_config(again) == sweep.best_config(table)
    assert sweep.best_config(table).scenario == table.scenario[0]
    with pytest.raises(ConfigError, match="2 augmented views"):
        sweep.run(clf, sweep.build_grid(["A"], [1e-3], ["adam"], [0.5], [2]), BINARY,
                  heads.FeatureSplit(feats, y, folds=folds), FitSettings(1, 4, progress=False))


@pytest.mark.slow
def test_bag_is_the_average_of_its_members_and_loads_in_safe_mode(cached, tmp_path):
    clf, ds, feats, y, _ = cached
    images = np.concatenate([b["image"].numpy() for b in input_lib.eval_dataset(
        ds.frame.path.tolist(), None, ds.frame.name.tolist(), SIZE, 4)])
    for scenario in ("A", "B", "C"):
        row = scenarios.get_scenario(scenario)
        start = row.start_layer(False, clf.net)
        folds = cv.make_folds(y, 2, seed=0)
        with heads.HeadConfig.for_scenario(scenario).trainer(clf, BINARY) as trainer:
            result = cv.cross_validate(trainer, feats[start], y, folds, FitSettings(2, 4))
            weights = cv.fold_weights(trainer, feats[start], y, folds, FitSettings(2, 4),
                                      result.epoch)
        members = [bag.as_member(clf, row.blocks, m) for m in weights]
        assert list(members[0]) == [l.name for l in bag.trainable_layers(clf)]
        # Stored as the heads stage stores it: the members alone, no copy of the conv base.
        path = bag.save(bag.members_model(clf, row.blocks, members),
                        bag.members_file(str(tmp_path / "bag"), scenario))
        loaded = bag.load_members(path)
        assert bag.size(loaded) == len(members)
        stored = {w.path.split("/")[0] for w in loaded.weights}
        assert not stored & {l.name for l in clf.stem.layers}
        start_layer = bag.member_start(clf, row.blocks)
        assert len(loaded.weights) == len(members) * len(clf.model_from(start_layer).weights)
        model = bag.assemble(clf, start_layer, loaded)
        part = row.part(clf)
        initial = part.get_weights()
        expected = [part.predict(feats[start], verbose=0)[:, 0]]
        clf.set_trainable(row.blocks, log=False)
        for values in weights:
            for variable, value in zip(part.trainable_variables, values):
                variable.assign(value)
            expected.append(part.predict(feats[start], verbose=0)[:, 0])
        part.set_weights(initial)
        got = model.predict(images, verbose=0)[:, 0]
        np.testing.assert_allclose(got, np.mean(expected, axis=0), atol=1e-5)
        assert not np.allclose(expected[1], expected[2])  # really different members
        # predict.py's way: model.keras joined with the stored members, in safe mode.
        clf.model.save(str(tmp_path / "model.keras"))
        single = keras.models.load_model(str(tmp_path / "model.keras"), safe_mode=True)
        again = bag.load(single, path, start_layer)
        np.testing.assert_allclose(again.predict(images, verbose=0)[:, 0], got, atol=1e-6)
        if scenario == "C":  # members on block4_pool: another image size cannot feed them
            other = backbone.build_classifier("none", include_top=False, image_size=2 * SIZE,
                                              backbone="vgg16")
            with pytest.raises(ConfigError, match="another run"):
                bag.load(other.model, path, start_layer)

def test_finetuning_never_exports_worse_than_its_starting_head(cached, tmp_path):
    clf, ds, _, _, _ = cached
    train, val = split.split_train_val(ds.frame, 6, seed=0)
    before = clf.model.predict(np.zeros((2, SIZE, SIZE, 3)), verbose=0)
    initial = clf.model.get_weights()
    # A learning rate this large wrecks every epoch: epoch 0 (the start) must win.
    out = finetune.finetune(clf, ["fc", "predictions"], BINARY, train, val,
                            FinetuneSettings(epochs=2, image_size=SIZE, batch_size=4,
                                             learning_rate=50.0, optimizer="sgd", patience=5,
                                             monitor="loss"),
                            workdir=str(tmp_path))
    assert out["best_epoch"] == 0 and out["epochs_run"] == 2
    assert out["best_val_loss"] == pytest.approx(out["start_val_loss"])
    assert list(out["history"].epoch) == [0, 1, 2]  # epoch 0, the start, is a row
    np.testing.assert_allclose(clf.model.predict(np.zeros((2, SIZE, SIZE, 3)), verbose=0),
                               before, atol=1e-6)
    clf.model.set_weights(initial)


@pytest.mark.slow
def test_sweep_then_use_sweep_through_the_flags(kaggle_dir, tmp_path):
    workdir = tmp_path / "run"
    common = [f"--data_dir={kaggle_dir}", f"--workdir={workdir}", "--weights=none",
              "--noinclude_top", f"--image_size={SIZE}", "--val_size=4", "--batch_size=4",
              f"--cache_dir={tmp_path / 'cache'}", "--epochs=2"]
    result = _run("train.py", *common, "--stage=sweep", "--sweep_folds=2",
                  "--sweep_optimizers=adam,sgd", "--sweep_views=0,1", "--sweep_scenarios=A,B",
                  "--sweep_learning_rates=1e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(workdir / "sweep.csv")
    assert len(table) == 2 * 2 * 2 and (workdir / "sweep.png").is_file()
    assert "cv_auc_mean" in table and "cv_auc_std" in table and "seconds" in table
    assert "linear probe CV AUC" in result.stdout and "rank" in result.stdout
    best = table.iloc[0]

    result = _run("train.py", *common, "--stage=all", "--use_sweep", "--finetune_epochs=1",
                  "--cv_folds=2", "--augment=none")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert list(metrics["heads"]) == [best.scenario]
    used = metrics["heads"][best.scenario]
    assert used["optimizer"] == best.optimizer and used["views"] == best.views
    assert used["learning_rate"] == pytest.approx(best.learning_rate)
    assert metrics["finetune"]["scenario"] == best.scenario
    # the probe is reported beside the heads, on the validation set and the same folds
    assert {"val_auc", "cv_auc_mean", "cv_auc_std", "C"} <= set(metrics["probe"])
    assert "linear probe (baseline)" in result.stdout
    assert metrics["bag"]["members"] == 3 and (workdir / "bag.keras").is_file()
    # bag.keras is the 2 fold members alone: the conv base and the final model are
    # model.keras's, joined at load time.
    stored = keras.models.load_model(str(workdir / "bag.keras"), safe_mode=True)
    assert len(stored.outputs) == 2
    assert not [w for w in stored.weights if w.path.startswith("block1_")]
    # ... and it is the heads stage's file under a second name, not a second copy.
    assert os.path.samefile(workdir / "bag.keras",
                            workdir / "heads" / "bag" / f"{metrics['finetune']['scenario']}.keras")

    out = tmp_path / "pred.csv"
    default = _run("predict.py", f"--workdir={workdir}", f"--data_dir={kaggle_dir}",
                   f"--output={out}")
    chosen = json.loads((workdir / "model_info.json").read_text())["default_model"]
    assert default.returncode == 0
    assert ("bag of 3 models" if chosen == "bag" else "one model") in default.stdout
    with_bag = _run("predict.py", f"--workdir={workdir}", f"--data_dir={kaggle_dir}",
                    f"--output={out}", "--bag")
    assert with_bag.returncode == 0 and "bag of 3 models" in with_bag.stdout
    bag_probs = pd.read_csv(out).invasive.to_numpy()
    single = _run("predict.py", f"--workdir={workdir}", f"--data_dir={kaggle_dir}",
                  f"--output={out}", "--nobag")
    assert single.returncode == 0 and "one model" in single.stdout
    assert not np.allclose(bag_probs, pd.read_csv(out).invasive.to_numpy())


def test_top_losses_are_the_errors_with_the_largest_loss_first():
    from small_photo_classifier.workflow.views import interpret
    labels = np.array([1, 1, 0, 0, 1, 0])
    probs = np.array([0.9, 0.05, 0.8, 0.1, 0.4, 0.99])
    # errors: index 1 (true 1, P .05), 2 (true 0, P .8), 4 (true 1, P .4), 5 (true 0, P .99)
    assert interpret.top_losses(BINARY, labels, probs).tolist() == [5, 1, 2, 4]
    assert interpret.top_losses(BINARY, labels, probs, n=2).tolist() == [5, 1]
    assert interpret.top_losses(BINARY, [1, 0], [0.9, 0.1]).tolist() == []


@pytest.mark.slow
def test_only_the_cv_best_scenario_is_fitted_and_a_later_fit_gives_the_same_head(
        kaggle_dir, tmp_path):
    """With CV, a scenario ranked below the best cannot be chosen: the heads stage does not
    fit it on the whole training split. --stage=finetune --scenario=<it> fits it then, to
    its CV epoch, and gets exactly the head the heads stage would have fitted."""
    import h5py

    def train(name, *args):
        workdir = tmp_path / name
        result = _run("train.py", f"--data_dir={kaggle_dir}", f"--workdir={workdir}",
                      "--weights=none", "--noinclude_top", f"--image_size={SIZE}",
                      "--val_size=4", "--batch_size=4", f"--cache_dir={tmp_path / 'cache'}",
                      "--epochs=3", "--cv_folds=2", "--notensorboard", *args)
        assert result.returncode == 0, result.stderr[-3000:]
        return workdir, result

    both, result = train("both", "--stage=heads", "--scenarios=A,B")
    metrics = json.loads((both / "metrics.json").read_text())
    ranked = sorted("AB", key=lambda s: -metrics["cross_validation"][s]["auc_mean"])
    best, other = ranked
    assert metrics["heads"][best]["fitted"] and not metrics["heads"][other]["fitted"]
    assert (both / "heads" / f"{best}.weights.h5").is_file()
    assert not (both / "heads" / f"{other}.weights.h5").exists()
    assert "val_auc" not in pd.read_csv(both / "heads" / other / "history.csv")
    assert {"cv_auc", "val_auc"} <= set(pd.read_csv(both / "heads" / best / "history.csv"))
    assert not list(both.glob("history_heads_*"))  # the top level is the exported model's
    assert f"scenario {other}: 2-fold CV AUC" in result.stdout and "not fitted" in result.stdout

    train("both", "--stage=finetune", f"--scenario={other}", "--finetune_epochs=0")
    alone, _ = train("alone", "--stage=heads", f"--scenarios={other}")

    def weights(path):
        with h5py.File(path, "r") as h5:
            found = {}
            h5.visititems(lambda k, v: found.update({k: v[()]})
                          if isinstance(v, h5py.Dataset) else None)
        return found

    later, direct = (weights(w / "heads" / f"{other}.weights.h5") for w in (both, alone))
    assert later.keys() == direct.keys() and later
    for key in later:
        np.testing.assert_array_equal(later[key], direct[key], err_msg=key)


@pytest.mark.slow
def test_with_tensorboard_off_no_logs_are_written(kaggle_dir, tmp_path):
    workdir = tmp_path / "run"
    result = _run("train.py", f"--data_dir={kaggle_dir}", f"--workdir={workdir}",
                  "--weights=none", "--noinclude_top", f"--image_size={SIZE}", "--val_size=4",
                  "--batch_size=4", f"--cache_dir={tmp_path / 'cache'}", "--epochs=1",
                  "--scenarios=A", "--stage=heads", "--notensorboard", "--cv_folds=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "heads" / "A.weights.h5").is_file()
    assert not (workdir / "tensorboard").exists()
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["heads"]["A"]["epoch_selected_by"] == "validation"
    assert "cross_validation" not in metrics and not (workdir / "bag.keras").exists()


def test_config_is_typed_frozen_and_demo_defaults_never_touch_the_flags(tmp_path):
    import dataclasses as dc
    from absl import flags as absl_flags
    from small_photo_classifier.workflow.base import config, flags
    fv = absl_flags.FlagValues()
    flags.define_train(fv)
    fv(["train.py", "--demo", "--epochs=2", f"--data_dir={tmp_path}"])
    cfg = config.train_config(fv, list(fv))
    assert cfg.heads.epochs == 2                       # passed: the user's value wins
    assert cfg.model.weights == "none" and cfg.model.image_size == 64   # not passed: demo's
    assert fv.weights == "imagenet" and fv.image_size is None  # the flags are untouched
    assert cfg.runtime.workdir == os.path.join("runs", "demo")
    # The demo's own settings count as given (its opening lines list them), so a summary
    # says when one could not act; a setting the user overrode is the user's.
    assert {"epochs", "finetune_epochs", "monitor"} <= set(cfg.given)
    assert "patience" not in cfg.given
    fv.unparse_flags()
    fv(["train.py", "--demo", "--finetune_epochs=7", f"--data_dir={tmp_path}"])
    assert "finetune_epochs" in config.train_config(fv, list(fv)).given
    with pytest.raises(dc.FrozenInstanceError):
        cfg.heads.epochs = 3
    fv.unparse_flags()
    fv(["train.py", f"--data_dir={tmp_path}", "--scenarios=A,Z"])
    with pytest.raises(ConfigError, match="Unknown scenario 'Z'"):
        config.train_config(fv, list(fv))
    fv.unparse_flags()
    fv(["train.py", f"--data_dir={tmp_path}", "--tta=99"])
    with pytest.raises(ConfigError, match="--tta must be between 1 and 8"):
        config.train_config(fv, list(fv))


def test_evidence_needs_a_margin_beyond_noise():
    from small_photo_classifier.features.choose import evidence
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    good = np.clip(y * 0.6 + rng.random(60) * 0.4, 0, 1)        # separates the classes
    noisy = rng.random(60)                                      # does not
    assert evidence.compare(BINARY, y, good, noisy).better       # the bag must win here
    assert not evidence.compare(BINARY, y, noisy, good).better   # and must lose here
    close = np.clip(good + rng.normal(0, 0.02, 60), 0, 1)       # the same model, jittered
    tie = evidence.compare(BINARY, y, close, good)
    assert not tie.better and tie.low <= 0 <= tie.high          # a tie keeps the baseline


def test_class_weights_reach_the_loss(cached):
    """1 positive in 10 with a weak signal: unweighted, the head predicts only the majority;
    balanced weights make it predict the minority too."""
    clf = cached[0]
    rng = np.random.default_rng(0)
    y = np.array([1] * 10 + [0] * 90)
    x = (rng.normal(size=(100, 1, 1, 512)) + y[:, None, None, None] * 0.35).astype(np.float32)
    assert task_lib.class_weights(BINARY, y, "auto") == pytest.approx({0: 100 / 180,
                                                                       1: 100 / 20})
    assert task_lib.class_weights(BINARY, np.arange(100) % 2, "auto") is None  # balanced data
    predicted = {}
    for mode in ("none", "balanced"):
        with heads.HeadConfig.for_scenario("B", 1e-3).trainer(clf, BINARY) as trainer:
            state = snapshot(clf.model)
            trainer.fit(x, y, FitSettings(5, 20, class_weight=task_lib.class_weights(
                BINARY, y, mode)), keep=None)
            predicted[mode] = (trainer.predict(x) >= 0.5).sum()
            restore(clf.model, state)
    assert predicted["none"] == 0 and predicted["balanced"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("heads_views,cv_folds", [(0, "2"), (2, "2"), (0, "0")])
def test_refit_trains_on_every_labelled_row(kaggle_dir, tmp_path, monkeypatch, heads_views,
                                            cv_folds):
    """Whether CV or the validation split made the choices, the exported model is trained
    again on training + validation images: every labelled row reaches the head and the
    fine-tuning; its expected score is the one measured before, on validation images
    that chose nothing of it."""
    from absl import flags as absl_flags
    from small_photo_classifier.features.fit import loop as training
    from small_photo_classifier.workflow.base import config, flags
    from small_photo_classifier.workflow.train import stages
    from small_photo_classifier.workflow.train import final_fit
    seen, refitting = [], []
    real_fit, real_fixed = training.HeadTrainer.fit, finetune.fit_fixed
    real_refit = final_fit.refit

    def spy_refit(*args, **kw):
        refitting.append(True)  # head fits from here on are the refit's (not a bag's folds)
        try:
            return real_refit(*args, **kw)
        finally:
            refitting.clear()

    def spy_fit(self, x, y, settings, **kw):
        if refitting:
            seen.append(("head", len(y)))
        return real_fit(self, x, y, settings, **kw)

    def spy_fixed(classifier, blocks, task, frame, cached, settings):
        seen.append(("finetune", len(cached.train_y) // cached.views if cached else len(frame)))
        return real_fixed(classifier, blocks, task, frame, cached, settings)

    monkeypatch.setattr(training.HeadTrainer, "fit", spy_fit)
    monkeypatch.setattr(finetune, "fit_fixed", spy_fixed)
    monkeypatch.setattr(final_fit, "refit", spy_refit)
    fv = absl_flags.FlagValues()
    flags.define_train(fv)
    fv(["train.py", f"--data_dir={kaggle_dir}", f"--workdir={tmp_path / 'run'}",
        f"--cache_dir={tmp_path / 'cache'}", "--weights=none", "--noinclude_top",
        f"--image_size={SIZE}", "--val_size=4", "--batch_size=4", "--epochs=2",
        "--scenarios=B", f"--cv_folds={cv_folds}", "--finetune_epochs=2", "--patience=5",
        "--monitor=loss", "--augment=keras_blog", "--notensorboard", "--precision=float32",
        "--tta=1", f"--heads_views={heads_views}", "--noprobe_baseline"])
    try:
        stages.run(config.train_config(fv, list(fv)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    refit = metrics["finetune"]["refit"]
    # 8 training + 4 validation images; with K cached views the head's epochs chosen on
    # (1+K) rows per image are run on (1+K) rows per image again.
    assert seen[0] == ("head", 12 * (1 + heads_views)) and refit["rows"] == 12
    assert [kind for kind, _ in seen].count("head") == 1
    assert refit["head_rows"] == 12 * (1 + heads_views)
    # The fine-tuning refit runs the epochs the validation run kept, on every image.
    assert refit["finetune_epochs"] == metrics["finetune"]["best_epoch"]
    assert seen[1:] == ([("finetune", 12)] if refit["finetune_epochs"] else [])
    export = metrics["export"]
    assert export["refit"] and "the 4 validation images" in export["estimate"]["how"]
    assert ("chosen on the other validation images" in export["estimate"]["how"]
            if refit["finetune_epochs"] or cv_folds == "0" else
            "cross-validation on the training split" in export["estimate"]["how"])
    assert 0 <= export["estimate"]["value"] <= 1
    info = json.loads((tmp_path / "run" / "model_info.json").read_text())
    assert info["refit"] and info["default_model"] in ("model", "bag")


def test_bootstrap_auc_weighs_images_as_drawing_them_would():
    from small_photo_classifier.features.choose import evidence
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40), 1)  # ties between classes
    counts = rng.multinomial(40, np.full(40, 1 / 40), 6).astype(float)
    expected = [roc_auc_score(np.repeat(y, c.astype(int)), np.repeat(scores, c.astype(int)))
                for c in counts]
    np.testing.assert_allclose(evidence._weighted_auc(y, scores, counts), expected)


@pytest.mark.slow
def test_without_cv_the_probe_must_beat_the_scenario_on_the_validation_images(tmp_path):
    """No cross-validation: the probe replaces the best scenario only when it beats it
    on the validation images beyond a paired bootstrap's noise."""
    workdir = tmp_path / "run"
    result = _run("train.py", "--demo", f"--workdir={workdir}", f"--cache_dir={tmp_path}/c",
                  "--cv_folds=0", "--scenarios=A", "--finetune_epochs=1", "--notensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    choice = metrics["heads_choice"]
    versus = choice["probe_vs_head"]
    assert versus["on"].startswith("the validation images")
    assert versus["images"] == 40 and versus["candidate_is"] == "the linear probe"
    assert versus["baseline_is"] == "scenario A"
    # The rule, whichever way it went on these images.
    better = versus["candidate_better_beyond_noise"]
    assert (choice["scenario"] == "probe") == better
    assert ("finetune" in metrics) == (not better)
