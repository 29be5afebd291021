"""HDF5 feature cache: hits, misses, rebuilds, resume, corruption, equivalences."""

import dataclasses
import logging
import os

import h5py
import numpy as np
import pytest
import tensorflow as tf

from small_photo_classifier.features import backbone, networks, task as task_lib
from small_photo_classifier.features.store import cache, extract, h5file as store
from small_photo_classifier.features.choose import cv
from small_photo_classifier.features.fit import heads
from small_photo_classifier.features.fit.settings import FitSettings
from small_photo_classifier.features.fit.loop import restore, snapshot
from small_photo_classifier.pipeline import augment, discovery, input as input_lib, ops
from small_photo_classifier.pipeline.errors import DataError
from tests.conftest import colour_image, write_image

# Extraction in batches of 4, no progress bar: the tests' way of filling a cache.
QUIET = cache.Extraction(4, progress=False)

SIZE = 32


@pytest.fixture(scope="module")
def classifier():
    return backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                     backbone="vgg16")


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for i in range(10):
        cls = "pos" if i % 2 else "neg"
        write_image(str(root / cls / f"img{i}.jpg"), colour_image(i % 2, size=36, seed=i))
    return discovery.discover(str(root), positive_class="pos")


def _spec(ds, dtype="float32", **kw):
    return cache.CacheSpec(weights_id="none(seed=0)", include_top=False, image_size=SIZE,
                           dtype=dtype,
                           data_dir=ds.data_dir, **{"net": networks.VGG16, **kw})


def _direct(classifier, frame):
    model = classifier.feature_model(["block4_pool", "block5_pool"])
    batches = input_lib.eval_dataset(frame.path.tolist(), frame.label.tolist(),
                                     frame.name.tolist(), SIZE, 4)
    outs = [model(b["image"], training=False) for b in batches]
    return {k: np.concatenate([o[k].numpy() for o in outs]) for k in outs[0]}


def test_layout_and_provenance(classifier, data, tmp_path):
    spec = _spec(data)
    result = cache.ensure_features(classifier, spec, data.frame, str(tmp_path / "c"), QUIET)
    assert result.computed == 10 and result.reused == 0
    assert os.path.basename(result.path) == spec.file_name()
    with h5py.File(result.path) as f:
        assert f["names"].asstr()[:].tolist() == data.frame.name.tolist()
        assert f["labels"][:].tolist() == data.frame.label.tolist()
        assert f["block5_pool"].shape == (10, 1, 1, 512)
        assert f["block4_pool"].chunks[0] == 4  # chunked by batch
        for key in ("backbone", "weights", "image_size", "preprocessing", "layers",
                    "tensorflow_version", "keras_version"):
            assert key in f.attrs
        assert f.attrs["weights"] == "none(seed=0)"
    assert not os.path.exists(result.path[:-3] + ".partial.h5")


def test_cached_features_equal_direct_model_outputs(classifier, data, tmp_path):
    spec = _spec(data)
    result = cache.ensure_features(classifier, spec, data.frame, str(tmp_path), QUIET)
    shuffled = data.frame.sample(frac=1, random_state=0)
    cached = cache.load_features(result.path, spec, shuffled, spec.layers)
    direct = _direct(classifier, shuffled)
    for layer in spec.layers:
        np.testing.assert_allclose(cached[layer], direct[layer], rtol=1e-5, atol=1e-4)


def test_hit_then_only_new_and_changed_images_are_computed(classifier, data, tmp_path):
    spec, cdir = _spec(data), str(tmp_path / "c")
    first = data.frame.iloc[:6]
    assert cache.ensure_features(classifier, spec, first, cdir, QUIET).computed == 6
    hit = cache.ensure_features(classifier, spec, first, cdir, QUIET)
    assert (hit.computed, hit.reused) == (0, 6)
    more = cache.ensure_features(classifier, spec, data.frame, cdir, QUIET)
    assert (more.computed, more.reused) == (4, 6)
    # Changing an image (new content, new mtime) recomputes just that image.
    changed = data.frame.path.iloc[0]
    write_image(changed, colour_image(1, size=36, seed=99))
    os.utime(changed, ns=(1, 10**18))
    again = cache.ensure_features(classifier, spec, data.frame, cdir, QUIET)
    assert (again.computed, again.reused) == (1, 9)
    loaded = cache.load_features(again.path, spec, data.frame.iloc[:1], spec.layers)
    np.testing.assert_allclose(loaded["block5_pool"], _direct(classifier, data.frame.iloc[:1])
                               ["block5_pool"], rtol=1e-5, atol=1e-4)


def test_every_provenance_change_is_a_miss(classifier, data, tmp_path, caplog):
    base = _spec(data)
    variants = [
        _spec(data, dtype="float16"),
        dataclasses.replace(base, weights_id="none(seed=1)"),
        dataclasses.replace(base, image_size=64),
        dataclasses.replace(base, include_top=True),
        dataclasses.replace(base, data_dir="/elsewhere"),
        dataclasses.replace(base, layers=("block5_pool",)),
        dataclasses.replace(base, augment="keras_blog"),
    ]
    names = {v.file_name() for v in variants}
    assert len(names) == len(variants) and base.file_name() not in names
    # A real miss: the cache of `base` exists, the changed spec still computes every image.
    cdir = str(tmp_path)
    assert cache.ensure_features(classifier, base, data.frame, cdir, QUIET).computed == 10
    assert cache.ensure_features(classifier, base, data.frame, cdir, QUIET).computed == 0
    with caplog.at_level(logging.INFO):
        miss = cache.ensure_features(classifier, variants[0], data.frame, cdir, QUIET)
    assert miss.computed == 10 and miss.path != os.path.join(cdir, base.file_name())
    assert "Extracting block4_pool, block5_pool for 10 image(s)" in caplog.text


@pytest.mark.parametrize("attr, value", [("tensorflow_version", "0.0.1"),
                                         ("preprocessing", "something else"),
                                         ("weights", "imagenet")])
def test_mismatched_attributes_in_same_file_are_rebuilt(classifier, data, tmp_path, caplog,
                                                         attr, value):
    spec, cdir = _spec(data), str(tmp_path)
    path = cache.ensure_features(classifier, spec, data.frame, cdir, QUIET).path
    with h5py.File(path, "r+") as f:
        f.attrs[attr] = value
    with caplog.at_level(logging.WARNING):
        result = cache.ensure_features(classifier, spec, data.frame, cdir, QUIET)
    assert result.computed == 10
    assert "rebuilding" in caplog.text and attr in caplog.text
    with h5py.File(path) as f:
        assert f.attrs[attr] == spec.provenance()[attr]


class _Interrupt(Exception):
    pass


def test_interrupted_extraction_resumes_where_it_stopped(classifier, data, tmp_path,
                                                          monkeypatch):
    spec, cdir = _spec(data), str(tmp_path)
    real_append, calls = store._append, []

    def dying_append(f, rows):
        calls.append(len(rows["names"]))
        if len(calls) == 2:
            raise _Interrupt()  # dies after one flushed batch of 4
        real_append(f, rows)

    monkeypatch.setattr(store, "_append", dying_append)
    with pytest.raises(_Interrupt):
        cache.ensure_features(classifier, spec, data.frame, cdir, QUIET)
    final = os.path.join(cdir, spec.file_name())
    assert not os.path.exists(final)  # a partial file is never the cache
    assert os.path.exists(final[:-3] + ".partial.h5")
    with pytest.raises(DataError, match="cannot be opened"):
        cache.load_features(final, spec, data.frame, spec.layers)
    monkeypatch.setattr(store, "_append", real_append)
    resumed = cache.ensure_features(classifier, spec, data.frame, cdir, QUIET)
    assert resumed.computed == 6  # 10 minus the 4 already flushed
    got = cache.load_features(resumed.path, spec, data.frame, spec.layers)
    np.testing.assert_allclose(got["block5_pool"], _direct(classifier, data.frame)["block5_pool"],
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_cache_is_detected_and_repaired(classifier, data, tmp_path, caplog, damage):
    """A flipped byte costs the rows it damaged (recomputed, superseding them); a file that
    cannot be read as a whole is rebuilt."""
    spec, cdir = _spec(data), str(tmp_path)
    path = cache.ensure_features(classifier, spec, data.frame, cdir, QUIET).path
    if damage == "flip":
        with h5py.File(path) as f:
            offset = f["block4_pool"].id.get_chunk_info(0).byte_offset
        with open(path, "r+b") as f:
            f.seek(offset + 100)
            byte = f.read(1)
            f.seek(offset + 100)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match="fail their checksum|cannot be opened|damaged"):
        cache.load_features(path, spec, data.frame, spec.layers)
    with caplog.at_level(logging.WARNING):
        feats, result = cache.load(classifier, spec, data.frame, cdir, QUIET)
    if damage == "flip":  # byte 100 of the first chunk: the first row of 4
        assert result.computed == 1 and "recomputing just those rows" in caplog.text
    else:
        assert result.computed == 10 and "rebuilding" in caplog.text
    np.testing.assert_allclose(feats["block4_pool"], _direct(classifier, data.frame)
                               ["block4_pool"], rtol=1e-5, atol=1e-4)
    cache.load_features(path, spec, data.frame, spec.layers)  # intact again


@pytest.mark.slow
def test_head_trained_on_cache_drops_onto_conv_base(data, tmp_path):
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=1,
                                    backbone="vgg16")
    spec = _spec(data)
    path = cache.ensure_features(clf, spec, data.frame, str(tmp_path), QUIET).path
    feats = cache.load_features(path, spec, data.frame, spec.layers)
    y = data.frame.label.to_numpy()
    for scenario in ("B", "C"):
        results = heads.train_scenarios(clf, [heads.HeadConfig.for_scenario(scenario, 1e-3)],
                                        task_lib.binary(), heads.FeatureSplit(feats, y),
                                        heads.FeatureSplit(feats, y),
                                        FitSettings(2, 4, progress=False),
                                        out_dir=str(tmp_path / "run"))
        fresh = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=1,
                                          backbone="vgg16")
        heads.load_scenario_weights(fresh, scenario, results[scenario].weights_path)
        start = results[scenario].start_layer
        on_cache = fresh.model_from(start).predict(feats[start], verbose=0)[:, 0]
        images = np.concatenate([b["image"].numpy() for b in input_lib.eval_dataset(
            data.frame.path.tolist(), y.tolist(), data.frame.name.tolist(), SIZE, 4)])
        on_base = fresh.model.predict(images, verbose=0)[:, 0]
        np.testing.assert_allclose(on_base, on_cache, atol=1e-4)
        # ... and training actually changed the head (the test would be vacuous otherwise).
        untrained = backbone.build_classifier("none", include_top=False, image_size=SIZE,
                                              seed=1, backbone="vgg16")
        untrained = untrained.model.predict(images, verbose=0)[:, 0]
        assert not np.allclose(untrained, on_base, atol=1e-4)


FLOAT16_TOLERANCE = 2e-3  # max |P16 - P32| documented in the README


@pytest.mark.slow
def test_float16_cache_changes_predictions_within_tolerance(classifier, data, tmp_path):
    f32, f16 = _spec(data, "float32"), _spec(data, "float16")
    p32 = cache.ensure_features(classifier, f32, data.frame, str(tmp_path), QUIET)
    p16 = cache.ensure_features(classifier, f16, data.frame, str(tmp_path), QUIET)
    x32 = cache.load_features(p32.path, f32, data.frame, f32.layers)
    x16 = cache.load_features(p16.path, f16, data.frame, f16.layers)
    assert x16["block5_pool"].dtype == np.float16
    y = data.frame.label.to_numpy()
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    results = heads.train_scenarios(clf, [heads.HeadConfig.for_scenario("B", 1e-3)],
                                    task_lib.binary(), heads.FeatureSplit(x32, y),
                                    heads.FeatureSplit(x32, y), FitSettings(3, 4, progress=False),
                                    out_dir=str(tmp_path / "run"))
    heads.load_scenario_weights(clf, "B", results["B"].weights_path)
    p_32 = clf.head.predict(x32["block5_pool"], verbose=0)[:, 0]
    p_16 = clf.head.predict(x16["block5_pool"].astype(np.float32), verbose=0)[:, 0]
    assert np.max(np.abs(p_32 - p_16)) <= FLOAT16_TOLERANCE
    assert np.ptp(p_32) > 1e-3  # the head is not constant, so the comparison means something


def test_augmented_views_are_cached_per_image_and_differ_from_the_plain_view(classifier, data,
                                                                               tmp_path, caplog):
    plain = _spec(data)
    aug = cache.CacheSpec(**{**plain.__dict__, "augment": "keras_blog"})
    p = cache.ensure_features(classifier, plain, data.frame, str(tmp_path), QUIET)
    with caplog.at_level(logging.INFO):
        a = cache.ensure_features(classifier, aug, data.frame, str(tmp_path), QUIET, views=2)
    assert a.computed == 20 and a.path != p.path
    assert "for 20 view(s) of 10 image(s)" in caplog.text  # rows are views, not photos
    views = cache.load_features(a.path, aug, data.frame, aug.layers, views=2)
    base = cache.load_features(p.path, plain, data.frame, plain.layers)
    assert views["block5_pool"].shape[0] == 20
    first, second = views["block4_pool"][:10], views["block4_pool"][10:]
    assert not np.allclose(first, base["block4_pool"], atol=1e-3)
    assert not np.allclose(first, second, atol=1e-3)
    # Deterministic per (image, view): a rebuild reproduces the same views.
    os.remove(a.path)
    cache.ensure_features(classifier, aug, data.frame, str(tmp_path), QUIET, views=2)
    again = cache.load_features(a.path, aug, data.frame, aug.layers, views=2)
    np.testing.assert_allclose(again["block4_pool"], views["block4_pool"], rtol=1e-5, atol=1e-4)


def test_views_made_from_one_decode_equal_each_view_made_alone(data, monkeypatch):
    """Views are made from one decode per image and their transforms applied a batch at a
    time; each equals the view drawn for (name, view) alone (as before issue 39's change,
    so rows cached then still match), whichever rows are computed together (a resume, a
    Ray block, another batch size)."""
    items = cache._items(data.frame, 3)
    preset = augment.get_preset("keras_blog")
    front = input_lib.decode_and_resize(SIZE)

    def alone(row):
        image = front({"path": tf.constant(row.path)})["image"]
        seed = tf.stack([tf.strings.to_hash_bucket_fast(row.name, 2**31 - 1),
                         tf.constant(row.view, tf.int64)])
        return ops.vgg_mean_centre_image(augment.augment_batch(image[None], preset, seed)[0])

    decodes = tf.Variable(0, dtype=tf.int64)

    def counted(image_size):
        def op(element):
            decodes.assign_add(1)
            return front(element)
        return op

    monkeypatch.setattr(extract.input_lib, "decode_and_resize", counted)

    def made(rows, batch_size):
        rows = extract.image_major(rows)
        batches = extract._extraction_dataset(rows, SIZE, batch_size, "keras_blog")
        out = np.concatenate([b["image"].numpy() for b in batches])
        return dict(zip(zip(rows.path, rows.view), out))

    every = made(items, 4)
    assert len(every) == 30 and int(decodes.numpy()) == 10  # one decode per image
    some = made(items.iloc[::-3], 3)  # other neighbours, order and batches
    assert len(some) == 10
    for key, image in some.items():
        np.testing.assert_array_equal(image, every[key])
    for row in items.iloc[[0, 11, 29]].itertuples():
        np.testing.assert_array_equal(every[(row.path, row.view)], alone(row).numpy())
    first = data.frame.path.iloc[0]
    assert not np.allclose(every[(first, 1)], every[(first, 2)], atol=1e-3)


@pytest.mark.slow
def test_cross_validation_scores_each_fold_exactly_and_members_are_trained_again_alike(
        classifier, data, tmp_path):
    spec = _spec(data)
    path = cache.ensure_features(classifier, spec, data.frame, str(tmp_path), QUIET).path
    feats = cache.load_features(path, spec, data.frame, spec.layers)["block5_pool"]
    y = data.frame.label.to_numpy()
    task = task_lib.binary()
    folds = cv.make_folds(y, 2, seed=0)
    before = classifier.model.get_weights()
    config = heads.HeadConfig.for_scenario("B", 1e-4)
    with config.trainer(classifier, task) as trainer:
        result = cv.cross_validate(trainer, feats, y, folds, FitSettings(2, 4))
        # The members are trained again to the chosen epoch only when a bag needs them.
        members = cv.fold_weights(trainer, feats, y, folds, FitSettings(2, 4), result.epoch)
    assert result.curves.shape == (2, 2) and 1 <= result.epoch <= 2
    for w0, w1 in zip(before, classifier.model.get_weights()):  # left as it was found
        np.testing.assert_array_equal(w0, w1)
    # Fold 1 by hand, through the same compiled trainer, for both epochs with every
    # epoch's weights recorded: the same seed gives the same model, whose exact AUC is
    # the curve's, whose weights at the chosen epoch are the re-derived member and whose
    # validation probabilities are the kept out-of-fold ones.
    tr, va = folds[1]
    state = snapshot(classifier.model)
    with config.trainer(classifier, task) as trainer:
        fitted = trainer.fit(feats[tr], y[tr], FitSettings(2, 4, seed=1), keep=result.epoch,
                             record=("weights",))
        probs = trainer.predict(feats[va])
        weights = fitted.weights[result.epoch - 1]
    restore(classifier.model, state)
    assert result.curves[1, result.epoch - 1] == pytest.approx(task.scores(y[va], probs)["auc"])
    np.testing.assert_allclose(result.oof_probs[va], probs, atol=1e-6)
    for kept, by_hand in zip(members[1], weights):
        np.testing.assert_allclose(kept, by_hand, atol=1e-6)
    assert np.ptp(probs) > 1e-4  # trained into something that is not constant
    assert not np.allclose(members[0][-2], members[1][-2])  # folds differ


@pytest.mark.slow
def test_a_run_reads_each_cache_file_once(kaggle_dir, tmp_path, monkeypatch):
    """The heads stage, the probe's export and its refit on every label all use the plain
    features: the file is opened and its rows CRC-checked once, the rest come from memory
    (only cached views, of another file, are a second read)."""
    from tests.inprocess import run
    reads = []
    real_load = cache.load

    def counting_load(classifier, spec, frame, cache_dir, how=cache.Extraction(), views=0,
                      stream=False):
        reads.append((spec.file_name(), views, len(frame)))
        return real_load(classifier, spec, frame, cache_dir, how, views, stream)

    monkeypatch.setattr(cache, "load", counting_load)
    result = run("train.py", f"--data_dir={kaggle_dir}", f"--workdir={tmp_path / 'run'}",
                 f"--cache_dir={tmp_path / 'cache'}", "--weights=none", "--noinclude_top",
                 f"--image_size={SIZE}", "--val_size=4", "--batch_size=4", "--epochs=1",
                 "--scenarios=A", "--cv_folds=2", "--finetune_epochs=0", "--tta=1",
                 "--notensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    plain = [r for r in reads if r[1] == 0]
    assert len({name for name, _, _ in plain}) == 1
    assert len(plain) == 1, reads  # 12 labelled images, read once for every step
