"""Mixed precision (features.precision) and fine-tuning from cached augmented views."""

import os

import h5py
import keras
import numpy as np
import pytest

from small_photo_classifier.features import backbone, networks, precision
from small_photo_classifier.features.store import cache
from small_photo_classifier.features.fit import checkpoint, finetune, heads
from small_photo_classifier.features.serve import inference
from small_photo_classifier.features.fit.settings import FinetuneSettings, FitSettings
from small_photo_classifier.features import task as task_lib
from small_photo_classifier.pipeline import discovery, split
from small_photo_classifier.pipeline.errors import ConfigError
from tests.conftest import class_folders

# Extraction in batches of 4, no progress bar: the tests' way of filling a cache.
QUIET = cache.Extraction(4, progress=False)

SIZE = 32
BINARY = task_lib.binary()


@pytest.fixture
def policy():
    """Sets a global Keras policy for one test and always puts float32 back."""
    def use(name):
        precision.apply(precision.Precision(name, "test"))
    yield use
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = class_folders(tmp_path_factory.mktemp("precision") / "data", 12)
    return discovery.discover(root, positive_class="pos")


@pytest.mark.parametrize("flags, gpus, expected", [
    ({"avx2", "avx512f"}, (), "float32"),
    ({"avx2", "avx512f", "avx512_bf16"}, (), "mixed_bfloat16"),
    ({"avx2", "amx_bf16", "amx_tile"}, (), "mixed_bfloat16"),
    (set(), ((9, 0),), "mixed_bfloat16"),            # H100
    (set(), ((8, 0), (8, 6)), "mixed_bfloat16"),
    ({"avx512_bf16"}, ((7, 5),), "mixed_float16"),    # T4: the GPU decides, not the CPU
    (set(), ((8, 0), (7, 0)), "mixed_float16"),      # the weakest GPU decides
    (set(), ((6, 1),), "float32"),
])
def test_auto_follows_the_hardware_and_says_why(flags, gpus, expected):
    chosen = precision.choose("auto", flags=flags, gpus=gpus)
    assert chosen.policy == expected
    assert chosen.reason.startswith("auto: ")


def test_an_explicit_choice_wins_and_a_wrong_one_is_a_clear_error():
    assert precision.choose("float32", flags={"amx_bf16"}, gpus=()).policy == "float32"
    assert precision.choose("mixed_float16", flags=(), gpus=()).policy == "mixed_float16"
    with pytest.raises(ConfigError, match="--precision='bf16'"):
        precision.choose("bf16")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_mixed_model_computes_in_16_bits_but_outputs_float32(policy):
    policy("mixed_bfloat16")
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    dtypes = precision.policies_of(clf.model)
    assert dtypes["block1_conv1"] == dtypes["block5_conv3"] == "bfloat16"
    assert dtypes["fc1"] == dtypes["dropout"] == dtypes["predictions"] == "float32"
    x = np.random.default_rng(0).uniform(-120, 150, (4, SIZE, SIZE, 3)).astype(np.float32)
    mixed = clf.model.predict(x, verbose=0)
    assert mixed.dtype == np.float32
    # The same weights computed in float32: bfloat16 keeps ~3 significant digits.
    full = precision.with_policy(clf.model, "float32")
    assert set(precision.policies_of(full).values()) == {"float32"}
    np.testing.assert_allclose(full.predict(x, verbose=0), mixed, atol=0.02)


def test_exported_mixed_model_predicts_in_the_precision_asked_for(policy, tmp_path, data):
    policy("mixed_bfloat16")
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    inference.export_model(clf.model, str(tmp_path), {"image_size": SIZE})
    policy("float32")
    model, _ = inference.load_exported(str(tmp_path), policy="float32")
    assert set(precision.policies_of(model).values()) == {"float32"}
    again, _ = inference.load_exported(str(tmp_path), policy="mixed_bfloat16")
    dtypes = precision.policies_of(again)
    assert dtypes["block3_conv1"] == "bfloat16"
    assert dtypes["fc1"] == dtypes["predictions"] == "float32"
    paths, names = data.frame.path.tolist(), data.frame.name.tolist()
    np.testing.assert_allclose(inference.predict_paths(model, paths, names, SIZE, 4,
                                                       progress=False),
                               inference.predict_paths(again, paths, names, SIZE, 4,
                                                       progress=False), atol=0.02)


def _spec(data, **kw):
    return cache.CacheSpec("none(seed=0)", False, SIZE, data_dir=data.data_dir,
                           **{"net": networks.VGG16, **kw})


def test_precision_is_part_of_the_cache_provenance(policy, data, tmp_path):
    policy("mixed_bfloat16")
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    spec = _spec(data, precision="mixed_bfloat16")
    result = cache.ensure_features(clf, spec, data.frame, str(tmp_path), QUIET)
    with h5py.File(result.path) as f:
        assert f.attrs["precision"] == "mixed_bfloat16"
        assert f["block5_pool"].dtype == np.float32  # stored as --cache_dtype says
    assert "mixed_bfloat16" in os.path.basename(result.path)
    assert _spec(data).file_name() != spec.file_name()
    # The provenance must be true: a float32 cache cannot be filled by a bf16 model.
    with pytest.raises(ConfigError, match="computes in mixed_bfloat16"):
        cache.ensure_features(clf, _spec(data), data.frame, str(tmp_path), QUIET)


def test_float32_cache_from_before_precision_was_recorded_is_reused(data, tmp_path):
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    spec = _spec(data)
    first = cache.ensure_features(clf, spec, data.frame, str(tmp_path), QUIET)
    with h5py.File(first.path, "r+") as f:
        del f.attrs["precision"]  # what an older version wrote
    again = cache.ensure_features(clf, spec, data.frame, str(tmp_path), QUIET)
    assert again.path == first.path and again.computed == 0 and again.reused == len(data.frame)


@pytest.mark.slow
def test_mixed_float16_training_scales_the_loss_and_learns(policy):
    """Under mixed_float16 the trained conv block computes in float16, so Keras' compile
    adds dynamic loss scaling, and the scenario still learns."""
    policy("mixed_float16")
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = rng.normal(0, 1, (40, 2, 2, 512)).astype(np.float32) + y[:, None, None, None] * 0.8
    with heads.HeadConfig.for_scenario("C", 1e-3).trainer(clf, BINARY) as trainer:
        assert isinstance(trainer.model.optimizer, keras.optimizers.LossScaleOptimizer)
        fit = trainer.fit(x, y, FitSettings(8, 8), val=(x, y))
    aucs = [s["auc"] for s in fit.val_scores]
    assert np.all(np.isfinite(aucs)) and aucs[-1] > 0.9


def _views(clf, data, k):
    train, val = split.split_train_val(data.frame, 4, seed=0)
    rng = np.random.default_rng(1)
    shape = clf.head.input.shape[1:]
    y = train.label.to_numpy()
    x = rng.normal(0, 1, (k * len(y), *shape)).astype(np.float32)
    x += np.tile(y, k)[:, None, None, None]
    val_x = rng.normal(0, 1, (len(val), *shape)).astype(np.float32)
    val_x += val.label.to_numpy()[:, None, None, None]
    return train, val, finetune.CachedViews("block5_pool", x, np.tile(y, k), val_x,
                                            val.label.to_numpy(), k)


def test_finetuning_from_cached_views_trains_only_the_head_and_resumes(data, tmp_path):
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    train, val, views = _views(clf, data, 3)
    conv = clf.stem.get_layer("block1_conv1").kernel.numpy().copy()
    fc1 = clf.head.get_layer("fc1").kernel.numpy().copy()
    settings = FinetuneSettings(epochs=2, image_size=SIZE, batch_size=4, learning_rate=1e-3,
                                augment="keras_blog", patience=10, monitor="loss")
    out = finetune.finetune(clf, ["fc", "predictions"], BINARY, train, val, settings,
                            workdir=str(tmp_path), cached=views)
    assert out["epochs_run"] == 2 and list(out["history"].epoch) == [0, 1, 2]
    assert not np.allclose(clf.head.get_layer("fc1").kernel.numpy(), fc1)
    np.testing.assert_array_equal(clf.stem.get_layer("block1_conv1").kernel.numpy(), conv)
    assert "ckpt-2" in open(tmp_path / "finetune" / checkpoint.CHECKPOINT_FILE).read()
    again = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                      backbone="vgg16")
    resumed = finetune.finetune(again, ["fc", "predictions"], BINARY, train, val,
                                settings.replace(epochs=3, resume=True), workdir=str(tmp_path),
                                cached=_views(again, data, 3)[2])
    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_run"] == 3
    # Resumed optimizer state (2 epochs x 2 steps) plus one more epoch of 2 steps.
    assert int(again.head.optimizer.iterations.numpy()) == 3 * 2


def test_cached_views_must_match_where_the_blocks_start(data, tmp_path):
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    train, val, views = _views(clf, data, 2)
    with pytest.raises(ConfigError, match="train from block4_pool"):
        finetune.finetune(clf, ["block5", "fc", "predictions"], BINARY, train, val,
                          FinetuneSettings(epochs=1, image_size=SIZE, batch_size=4,
                                           learning_rate=1e-3, patience=2),
                          workdir=str(tmp_path), cached=views)


def test_heads_train_identically_whatever_the_conv_base_computes_in(policy):
    """The head computes in float32 under every policy, so the heads stage on given
    features does not depend on --precision (a bfloat16 head drew other dropout masks)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 1, 1, 512)).astype(np.float32) * 50
    y = np.arange(24) % 2
    probs = {}
    for name in ("float32", "mixed_bfloat16"):
        policy(name)
        clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                        backbone="vgg16")
        with heads.HeadConfig.for_scenario("A").trainer(clf, BINARY) as trainer:
            trainer.fit(x, y, FitSettings(2, 8))
            probs[name] = trainer.predict(x)
    np.testing.assert_allclose(probs["mixed_bfloat16"], probs["float32"], rtol=1e-5, atol=1e-6)


def test_run_config_records_the_precision_each_part_really_computes_in(policy):
    # What run_config.json says (precision.parts) against the classifier itself, built
    # under mixed_bfloat16 as a run on an AVX512-BF16 machine builds it.
    policy("mixed_bfloat16")
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
    recorded = precision.parts("mixed_bfloat16")
    compute = {"mixed_bfloat16": "bfloat16", "float32": "float32"}
    conv = {l.compute_dtype for part in (clf.stem, clf.last) for l in part.layers
            if l.name.startswith("block") and "conv" in l.name}
    assert conv == {compute[recorded["conv_base"]]}
    head = {l.compute_dtype for l in clf.head.layers if l.weights}
    assert head == {compute[recorded["head"]]}
    assert {v.dtype for v in clf.model.weights} == {recorded["variables"]}




@pytest.mark.slow
def test_a_model_trained_in_bfloat16_is_saved_to_compute_in_float32(policy, tmp_path):
    """keras.saving.load_model in a fresh process (a user's script, a server) finds only
    float32 layers, and computes what the same weights compute in float32."""
    import json
    import subprocess
    import sys
    policy("mixed_bfloat16")
    trained = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                        backbone="vgg16")
    assert trained.stem.get_layer("block1_conv1").compute_dtype == "bfloat16"
    inference.export_model(trained.model, str(tmp_path), {"image_size": SIZE})
    keras.mixed_precision.set_global_policy("float32")
    reference = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=1,
                                          backbone="vgg16")
    reference.model.set_weights(trained.model.get_weights())
    x = np.random.default_rng(0).normal(0, 60, (4, SIZE, SIZE, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import json, sys, numpy as np, keras\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "def walk(model):\n"
        "    for l in model.layers:\n"
        "        yield l\n"
        "        if isinstance(l, keras.Model):\n"
        "            yield from walk(l)\n"
        "names = sorted({l.dtype_policy.name for l in walk(m)})\n"
        "p = m.predict(np.load(sys.argv[2]), verbose=0)\n"
        "print(json.dumps({'policies': names, 'p': p.ravel().tolist()}))\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.keras"),
                          str(tmp_path / "x.npy")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["policies"] == ["float32"]
    np.testing.assert_allclose(loaded["p"], reference.model.predict(x, verbose=0).ravel(),
                               atol=1e-5)


def test_only_float32_conv_blocks_on_a_cpu_are_compiled():
    assert precision.compile_convs("float32", gpus=False)
    assert not precision.compile_convs("mixed_bfloat16", gpus=False)  # oneDNN bf16 wins
    assert not precision.compile_convs("float32", gpus=True)           # never measured


def test_compiled_conv_blocks_train_scenario_c_as_the_stock_kernels_do(monkeypatch):
    """Scenario C (block5 + head, with dropout) with block5 XLA-compiled reaches the same
    weights as without, up to float rounding: only the convolutions are compiled, so the
    head's dropout draws the same masks (under a whole-step XLA compile it does not)."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(24, 2, 2, 512)), 0).astype(np.float32) * 5
    y = np.arange(24) % 2
    probs = {}
    for compiled in (False, True):
        monkeypatch.setattr(precision, "compile_convs", lambda: compiled)
        clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                        backbone="vgg16")
        with heads.HeadConfig.for_scenario("C").trainer(clf, BINARY) as trainer:
            wrapped = [l for l in trainer.model.layers if isinstance(l, backbone.CompiledConvs)]
            assert len(wrapped) == int(compiled)
            trainer.fit(x, y, FitSettings(3, 8))
            probs[compiled] = trainer.predict(x)
        # The classifier itself (what is saved) never holds the XLA wrapper.
        assert not any(isinstance(l, backbone.CompiledConvs) for l in clf.model.layers)
    assert np.ptp(probs[False]) > 1e-3  # it learned something the two runs can disagree on
    np.testing.assert_allclose(probs[True], probs[False], rtol=1e-4, atol=1e-5)
