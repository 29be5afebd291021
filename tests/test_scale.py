"""Scale-out: MirroredStrategy over CPU replicas, Ray Data for extraction and prediction."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from small_photo_classifier.features import backbone, distribute, networks
from small_photo_classifier.features.store import cache
from small_photo_classifier.features.serve import inference, ray_engine
from small_photo_classifier.pipeline import discovery
from small_photo_classifier.pipeline.errors import ConfigError
from tests.conftest import class_folders, checkpoint_epoch
from tests.test_reliability import _kill_when, _popen
from tests.test_finetune_predict import ROOT, _run

# Extraction in batches of 4, no progress bar: the tests' way of filling a cache.
QUIET = cache.Extraction(4, progress=False)

SIZE = 32


def test_strategy_names_and_late_cpu_split_are_clear_errors():
    with pytest.raises(ConfigError, match="--strategy='many'"):
        distribute.make_strategy("many")
    # Once TensorFlow has started its devices, splitting the CPU cannot work.
    import tensorflow as tf
    tf.config.list_logical_devices()
    with pytest.raises(ConfigError, match="before TensorFlow starts"):
        distribute.split_cpu(3)
    assert distribute.make_strategy("one").num_replicas_in_sync == 1


@pytest.mark.slow
def test_without_ray_address_ray_is_never_imported():
    code = ("import sys; import small_photo_classifier.features.store.cache, "
            "small_photo_classifier.features.serve.inference, "
            "small_photo_classifier.features.serve.ray_engine; "
            "import train; assert 'ray' not in sys.modules, 'ray imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return discovery.discover(class_folders(root / "data", 20), positive_class="pos"), root


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-worker Ray cluster for the Ray tests (started once: ~5 s)."""
    engine = ray_engine.RayEngine("local", 2, build={"weights": "none", "include_top": False,
                                                     "image_size": SIZE, "seed": 0,
                                                     "backbone": "vgg16"}).start()
    yield engine
    engine.stop()


@pytest.mark.slow
def test_ray_rows_equal_a_plain_run_and_only_missing_rows_are_computed(images, ray_cluster,
                                                                        tmp_path):
    ds, _ = images
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    spec = cache.CacheSpec("none(seed=0)", False, SIZE, data_dir=ds.data_dir, net=networks.VGG16)
    plain = cache.ensure_features(clf, spec, ds.frame, str(tmp_path / "plain"), QUIET)
    # Half the images are already cached: Ray must compute only the other half.
    ray_dir = str(tmp_path / "ray")
    cache.ensure_features(clf, spec, ds.frame.iloc[:10], ray_dir, QUIET)
    result = cache.ensure_features(clf, spec, ds.frame, ray_dir,
                                   cache.Extraction(4, engine=ray_cluster, progress=False))
    assert (result.reused, result.computed) == (10, 10)
    with h5py.File(result.path) as f:  # streamed in by the driver, checksummed
        assert int(f.attrs["rows_done"]) == 20
    a = cache.load_features(plain.path, spec, ds.frame, spec.layers)
    b = cache.load_features(result.path, spec, ds.frame, spec.layers)
    for layer in spec.layers:
        # Float rounding only: oneDNN may pick another kernel for another batch split.
        np.testing.assert_allclose(b[layer], a[layer], rtol=1e-4,
                                   atol=1e-5 * np.abs(a[layer]).max())


@pytest.mark.slow
def test_ray_predictions_equal_a_plain_run_in_order(images, ray_cluster, tmp_path):
    ds, _ = images
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    workdir = tmp_path / "run"
    inference.export_model(clf.model, str(workdir), {"image_size": SIZE})
    local = inference.predict_frame(clf.model, ds.frame, SIZE, 4, progress=False)
    remote = inference.predict_frame(None, ds.frame, SIZE, 4, remote=ray_engine.RemoteModel(
        ray_cluster, str(workdir)))
    np.testing.assert_allclose(remote, local, rtol=1e-5, atol=1e-6)  # same order too


@pytest.mark.slow
def test_mirrored_two_cpu_replicas_match_one_device_and_resume(kaggle_dir, tmp_path):
    def train(name, *extra):
        workdir = tmp_path / name
        result = _run("train.py", f"--data_dir={kaggle_dir}", f"--workdir={workdir}",
                      "--weights=none", "--noinclude_top", f"--image_size={SIZE}",
                      "--val_size=4", "--batch_size=4", f"--cache_dir={tmp_path / name}c",
                      "--scenarios=A", "--cv_folds=0", "--dropout=0", "--epochs=2",
                      "--finetune_epochs=1", "--finetune_views=2", "--augment=keras_blog",
                      "--notensorboard", "--noprobe_baseline", "--monitor=loss",
                      *extra)  # fine-tune A (the loss: a head at AUC 1 can still improve)
        assert result.returncode == 0, result.stderr[-3000:]
        return workdir

    one = train("one", "--strategy=one")
    two = train("two", "--strategy=mirrored", "--cpu_replicas=2")
    configs = [json.loads((w / "run_config.json").read_text()) for w in (one, two)]
    assert [c["replicas"] for c in configs] == [1, 2]
    # Without dropout the global batch gives the same gradients however it is split.
    h1, h2 = (pd.read_csv(w / "heads" / "A" / "history.csv") for w in (one, two))
    np.testing.assert_allclose(h2.val_loss, h1.val_loss, rtol=1e-4)
    s1, s2 = (pd.read_csv(w / "submission.csv") for w in (one, two))
    assert list(s1.name) == list(s2.name)
    np.testing.assert_allclose(s2.invasive, s1.invasive, atol=1e-4)
    # Resume under the mirrored strategy continues from the checkpointed epoch: a
    # fine-tuning killed after a checkpoint, then rerun with --resume.
    args = [os.path.join(ROOT, "train.py"), f"--data_dir={kaggle_dir}", f"--workdir={two}",
            "--weights=none", "--noinclude_top", f"--image_size={SIZE}", "--val_size=4",
            "--batch_size=4", f"--cache_dir={tmp_path / 'two'}c", "--stage=finetune",
            "--scenario=A", "--dropout=0", "--finetune_epochs=3", "--finetune_views=2",
            "--augment=keras_blog", "--notensorboard", "--patience=10", "--monitor=loss",
            "--strategy=mirrored", "--cpu_replicas=2"]
    log = open(tmp_path / "killed.txt", "w+")
    assert _kill_when(_popen(log, *args), lambda: checkpoint_epoch(two / "finetune") >= 1,
                      delay=0.0)
    killed_at = checkpoint_epoch(two / "finetune")
    result = _run(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    finetune = json.loads((two / "metrics.json").read_text())["finetune"]
    assert finetune["resumed_from_epoch"] == killed_at and finetune["epochs_run"] == 3
    model, _ = inference.load_exported(str(two))  # exported under mirrored: safe mode loads
    assert model.output.shape[-1] == 1


_UNEVEN = """
import sys, json
import numpy as np
sys.path.insert(0, {root!r})
from small_photo_classifier.features import distribute
distribute.split_cpu(3)
import tensorflow as tf
from small_photo_classifier.features import backbone
from small_photo_classifier.features.store import cache
from small_photo_classifier.features.serve import inference
from small_photo_classifier.pipeline import discovery

# Extraction in batches of 4, no progress bar: the tests' way of filling a cache.
QUIET = cache.Extraction(4, progress=False)
ds = discovery.discover({data!r}, positive_class="pos")
one = backbone.build_classifier("none", include_top=False, image_size={size}, seed=0,
                                backbone="vgg16")
frame = ds.frame.iloc[:5]          # 5 images, batch 4: the last batch has 1 row for 3 replicas
spec = cache.CacheSpec("none(seed=0)", False, {size}, data_dir=ds.data_dir, net=one.net)
ref_probs = inference.predict_frame(one.model, frame, {size}, 4, progress=False)
ref = cache.ensure_features(one, spec, frame, {cache_one!r}, QUIET)
ref_feats = cache.load_features(ref.path, spec, frame, spec.layers)
with distribute.scope(distribute.make_strategy("mirrored", 3)) as strategy:
    assert strategy.num_replicas_in_sync == 3
    clf = backbone.build_classifier("none", include_top=False, image_size={size}, seed=0,
                                    backbone="vgg16")
    out = {{}}
    for n in (1, 2, 5):             # fewer images than replicas, and a remainder of 2
        probs = inference.predict_frame(clf.model, frame.iloc[:n], {size}, 4, progress=False)
        out[f"predict_{{n}}"] = float(np.abs(probs - ref_probs[:n]).max())
    got = cache.ensure_features(clf, spec, frame, {cache_two!r}, QUIET)
    feats = cache.load_features(got.path, spec, frame, spec.layers)
    out["extract"] = max(float(np.abs(feats[l] - ref_feats[l]).max() /
                               (np.abs(ref_feats[l]).max() + 1e-12)) for l in spec.layers)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_extraction_and_prediction_with_fewer_images_than_replicas(images, tmp_path):
    ds, root = images
    code = _UNEVEN.format(root=ROOT, data=ds.data_dir, size=SIZE,
                          cache_one=str(tmp_path / "one"), cache_two=str(tmp_path / "two"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                                           "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    # Every row came back, in order, equal to one device's up to float rounding.
    assert set(errors) == {"predict_1", "predict_2", "predict_5", "extract"}
    assert max(v for k, v in errors.items() if k.startswith("predict")) < 1e-4
    assert errors["extract"] < 1e-4
