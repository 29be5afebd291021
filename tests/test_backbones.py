"""Backbones other than VGG16: a user's .keras file, keras.applications by name, the
description every module reads, caches kept apart, and ONNX-safe rewrites."""

import os

import keras
import numpy as np
import pandas as pd
import pytest

from small_photo_classifier.features import backbone, networks, scenarios
from small_photo_classifier.features.serve import inference
from small_photo_classifier.features.store import cache as cache_lib
from small_photo_classifier.pipeline.errors import ConfigError
from tests.inprocess import run
from small_photo_classifier.workflow.train import backbones
from small_photo_classifier.workflow.use import deploy

SIZE = 32


def _tiny_network(path):
    """A small image network in Keras' naming conventions: a Rescaling inside (so it
    wants RGB 0..255), two blocks with BatchNorm and a residual add, a top conv, and
    a classifier top the tool must cut off."""
    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="rescaling")(image)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="stem_conv")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="block1a_conv")(x)
    x = keras.layers.BatchNormalization(name="block1a_bn")(x)
    x = keras.layers.ReLU(name="block1a_relu")(x)
    y = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="block2a_conv")(x)
    y = keras.layers.BatchNormalization(name="block2a_bn")(y)
    z = keras.layers.Conv2D(16, 3, padding="same", name="block2b_conv")(y)
    y = keras.layers.Add(name="block2b_add")([y, z])
    y = keras.layers.Conv2D(24, 1, name="top_conv")(y)
    y = keras.layers.GlobalAveragePooling2D(name="avg_pool")(y)
    out = keras.layers.Dense(10, activation="softmax", name="predictions")(y)
    keras.Model(image, out, name="tiny_net").save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return _tiny_network(tmp_path_factory.mktemp("net") / "tiny_net.keras")


@pytest.fixture(scope="module")
def tiny(tiny_file):
    return backbone.build_classifier("imagenet", False, SIZE, 0, backbone=tiny_file)


def test_a_keras_file_is_described_from_its_layers(tiny, tiny_file):
    net = tiny.net
    assert net.name == tiny_file and net.source.startswith("file:tiny_net.keras:sha256=")
    assert net.stages == ("block1", "block2")
    assert (net.stem_layer, net.feature_layer) == ("block1a_relu", "top_conv")
    assert net.preprocessing == networks.RGB255 and net.pooling == "avg"
    # The classifier top of the file is gone; the head is ours.
    assert [l.name for l in tiny.head.layers[1:]] == ["avg_pool", "fc1", "dropout",
                                                      "predictions"]
    x = np.random.default_rng(0).normal(0, 50, (2, SIZE, SIZE, 3)).astype(np.float32)
    whole = np.asarray(tiny.model(x))
    parts = np.asarray(tiny.head(tiny.last(tiny.stem(x))))
    np.testing.assert_allclose(whole, parts, rtol=1e-5, atol=1e-6)
    # The file's Rescaling sees the RGB pixels the input graph mean-centred.
    rgb = np.asarray(tiny.stem.get_layer("caffe_to_rgb")(x))
    np.testing.assert_allclose(rgb, x[..., ::-1] + np.array([123.68, 116.779, 103.939]),
                               atol=1e-4)


def test_scenario_c_trains_the_last_stage_but_never_batchnorm(tiny):
    trainable = tiny.set_trainable(scenarios.get_scenario("C").blocks, log=False)
    assert trainable == ["block2a_conv", "block2b_conv", "top_conv", "fc1", "predictions"]
    assert tiny.start_layer(scenarios.get_scenario("C").blocks) == "block1a_relu"
    assert tiny.start_layer(scenarios.get_scenario("B").blocks) == "top_conv"
    # XLA-compiled convolutions were measured faster for VGG16 only (Lite0: 7x slower).
    trains = tiny.training_model("block1a_relu", compiled_convs=True)
    assert not any(isinstance(l, backbone.CompiledConvs) for l in backbone.leaves(trains))
    assert tiny.set_trainable(scenarios.parse_blocks("block1,fc", tiny.net), log=False) == \
        ["stem_conv", "block1a_conv", "fc1", "predictions"]  # the stem joins block1; BN frozen
    assert tiny.start_layer(["block1", "fc", "predictions"]) == networks.INPUT
    with pytest.raises(ConfigError, match="'block5' matches no block of tiny_net"):
        scenarios.parse_blocks("block5", tiny.net)


def test_the_new_head_follows_the_seed(tiny, tiny_file):
    again = backbone.build_classifier("imagenet", False, SIZE, 0, backbone=tiny_file)
    for a, b in zip(tiny.head.get_weights(), again.head.get_weights()):
        np.testing.assert_array_equal(a, b)
    other = backbone.build_classifier("imagenet", False, SIZE, 1, backbone=tiny_file)
    assert not np.array_equal(other.head.get_weights()[0], tiny.head.get_weights()[0])


def test_a_saved_classifier_describes_its_backbone_again(tiny, tmp_path):
    tiny.model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    again = backbone.from_model(loaded)
    assert (again.net.stem_layer, again.net.feature_layer) == ("block1a_relu", "top_conv")
    assert again.net.preprocessing == networks.RGB255 and not again.include_top
    assert again.start_layer(scenarios.get_scenario("C").blocks) == "block1a_relu"
    assert "block2b_conv" in again.set_trainable(["last", "predictions"], log=False)
    x = np.random.default_rng(1).normal(0, 50, (2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(tiny.model(x)), atol=1e-6)


def test_two_backbones_never_share_a_cache_file(tiny):
    vgg = cache_lib.CacheSpec("none(seed=0)", False, SIZE, data_dir="/data", net=networks.VGG16)
    other = cache_lib.CacheSpec("in-file", False, SIZE, data_dir="/data",
                                net=tiny.net)
    assert vgg.file_name().startswith("vgg16-data-32px-none-notop-float32-")
    assert other.file_name().startswith("tiny_net-data-32px-")
    assert vgg.layers == ("block4_pool", "block5_pool")
    assert other.layers == ("block1a_relu", "top_conv")
    assert other.provenance()["backbone"] == tiny.net.source
    assert "undone in the network's first layer" in other.provenance()["preprocessing"]


def test_stages_from_names_inputs_and_resolution():
    # A residual add named by no stage belongs to its inputs' stage; a downsampling
    # layer fed by it then starts the next stage's input.
    names = ["stem", "s_stage_0_conv", "add", "down", "s_stage_1_conv", "add_1", "norm"]
    inbound = {"s_stage_0_conv": {"stem"}, "add": {"s_stage_0_conv", "stem"},
               "down": {"add"}, "s_stage_1_conv": {"down"}, "add_1": {"s_stage_1_conv",
                                                                      "down"},
               "norm": {"add_1"}}
    stages = networks.stages_by_name(names, inbound)
    assert stages == {"stem": "stage0", "s_stage_0_conv": "stage0", "add": "stage0",
                      "down": "stage0", "s_stage_1_conv": "stage1", "add_1": "stage1",
                      "norm": "stage1"}
    # Squeeze-and-excitation pools to 1x1 and back: not a new stage.
    layers = [("a", 16), ("b", 8), ("se_pool", 1), ("se_mul", 8), ("c", 4), ("d", None)]
    assert networks.stages_by_resolution(layers) == {
        "a": "stage1", "b": "stage2", "se_pool": "stage2", "se_mul": "stage2",
        "c": "stage3", "d": "stage3"}
    assert networks.stages_by_ends(["a", "b", "c", "d"], ["b", "d"]) == {
        "a": "stage1", "b": "stage1", "c": "stage2", "d": "stage2"}


def test_backbone_flags_are_checked_before_tensorflow(tmp_path):
    with pytest.raises(ConfigError, match="expected vgg16, one of .*resnet50"):
        networks.check_choice("resnet51")
    with pytest.raises(ConfigError, match="no such file"):
        networks.check_choice(str(tmp_path / "missing.keras"))
    with pytest.raises(ConfigError, match="VGG16's are fixed"):
        networks.check_choice("vgg16", feature_layer="block5_conv3")
    assert networks.check_choice("ConvNeXt-Tiny").name == "convnext_tiny"


def test_a_named_keras_application_builds_with_random_weights():
    clf = backbone.build_classifier("none", True, SIZE, 0, backbone="mobilenetv3small")
    assert not clf.include_top  # --include_top means something for VGG16 only
    assert clf.net.source == "keras.applications.MobileNetV3Small"
    assert len(clf.net.stages) >= 4 and clf.net.preprocessing == networks.RGB255
    x = np.random.default_rng(2).uniform(-120, 130, (2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(clf.model(x)),
                               np.asarray(clf.head(clf.last(clf.stem(x)))), atol=1e-6)


def test_onnx_rewrites_compute_what_the_model_computes():
    image = keras.Input((8, 8, 3))
    norm = keras.layers.Normalization(mean=[1.0, 2.0, 3.0], variance=[4.0, 9.0, 16.0])
    x = norm(image)
    x = keras.layers.Conv2D(3, 3, groups=3, padding="same", name="grouped")(x)
    x = keras.layers.Activation("gelu", name="gelu")(x)
    model = keras.Model(image, x)
    ready = deploy.onnx_ready(model)
    types = {type(l).__name__ for l in ready.layers}
    assert {"Rescaling", "DepthwiseConv2D", "ErfGelu"} <= types
    assert not {"Normalization", "Conv2D"} & types
    data = np.random.default_rng(3).normal(0, 3, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ready(data)), np.asarray(model(data)), atol=1e-5)


@pytest.mark.slow
def test_the_demo_runs_on_a_keras_file_backbone(tiny_file, tmp_path):
    result = run("train.py", "--demo", f"--backbone={tiny_file}", f"--workdir={tmp_path}/run",
                 f"--cache_dir={tmp_path}/cache", "--scenarios=A,C", "--finetune_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    info = json.load(open(tmp_path / "run" / "model_info.json"))
    assert info["backbone"] == tiny_file and info["input"]["channel_order"] == "BGR"
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["heads"]["C"]["start_layer"] == "block1a_relu"
    cached = [p.name for p in (tmp_path / "cache").glob("*.h5")]
    assert cached and all(p.startswith("tiny_net-") for p in cached)
    # Near-duplicates: the threshold is calibrated on this run's photos (mirror images),
    # not VGG16's 0.95.
    log = (tmp_path / "run" / "train.log").read_text()
    assert "calibrated for tiny_net: the lowest similarity of 32 training photos" in log
    pairs = metrics["label_audit"]["duplicate_pairs"]
    assert pairs > 0 and len(pd.read_csv(tmp_path / "run" / "duplicates.csv")) == pairs


@pytest.mark.slow
def test_auto_compares_backbones_on_the_same_folds_and_goes_on_with_the_choice(
        tiny_file, tmp_path):
    result = run("train.py", "--demo", "--backbone=auto", f"--backbones=vgg16,{tiny_file}@48",
                 f"--workdir={tmp_path}/run", f"--cache_dir={tmp_path}/cache",
                 "--scenarios=A,B", "--finetune_epochs=0", "--nobag",
                 # No CV for the rest of the run (as with 100+ validation images): the
                 # comparison makes its own folds.
                 "--cv_folds=0")
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    import pandas as pd
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Backbones are compared by 5-fold CV on the training split" in log
    assert "chosen by 5-fold CV" not in log and "Scenario A: 5-fold" not in log
    table = pd.read_csv(tmp_path / "run" / "backbones.csv")
    assert list(table.backbone) == ["vgg16", tiny_file]
    assert list(table.image_size) == [64, 48]
    assert (table.extraction_ms_per_image > 0).all() and (table.parameters > 0).all()
    section = json.load(open(tmp_path / "run" / "metrics.json"))["backbones"]
    # The rule: the best CV among those within the cost bound of the cheapest; one
    # beyond the bound only if it won beyond noise.
    ordered = table.sort_values("extraction_ms_per_image", kind="stable")
    mean = next(c for c in table if c.startswith("cv_") and c.endswith("_mean"))
    within = ordered[ordered.extraction_ms_per_image
                     <= backbones.COST_BOUND * ordered.extraction_ms_per_image.iloc[0]]
    expected = within.backbone.iloc[int(np.argmax(within[mean].to_numpy()))]
    for c in section["comparisons"]:
        if not c["within_cost_bound"] and c["better"]:
            expected = table.backbone[table.name == c["candidate"]].iloc[0]
    assert section["chosen"] == expected
    info = json.load(open(tmp_path / "run" / "model_info.json"))
    assert info["backbone"] == section["chosen"]
    # Every record says the size the run went on with, not the first candidate's.
    size = int(table.image_size[table.backbone == section["chosen"]].iloc[0])
    config = json.load(open(tmp_path / "run" / "run_config.json"))
    assert info["image_size"] == config["image_size"] == size
    assert f"at {size} px" in log.split("Going on with", 1)[1].splitlines()[0]
    assert "backbones (out-of-fold predictions on the 120 training images" in result.stdout
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Backbones (--stage=backbones, --backbone=auto)" in report
    assert f"Input size {size} px" in report
    assert (tmp_path / "run" / "backbones.png").stat().st_size > 0


def test_auto_takes_the_best_cv_within_the_cost_bound_and_a_costlier_one_only_on_evidence():
    """Within COST_BOUND x the cheapest's cost the best CV score wins, ties to the cheaper;
    beyond it a candidate must beat that choice beyond noise on out-of-fold predictions."""
    import types
    from small_photo_classifier.features import task as task_lib
    from small_photo_classifier.features.choose import cv as cv_lib
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 60)
    folds = cv_lib.make_folds(y, 5, 0)
    job = types.SimpleNamespace(task=task_lib.binary(), y_train=y, folds=folds, seed=0,
                                train_groups=None)  # no groups: photos resampled one by one
    noisy = np.clip(0.5 + (y - 0.5) * 0.2 + rng.normal(0, 0.3, len(y)), 0, 1)
    clean = np.clip(0.5 + (y - 0.5) * 0.8 + rng.normal(0, 0.05, len(y)), 0, 1)

    def entry(name, ms, score, oof):
        return backbones.Entry(networks.check_choice("vgg16"), name, 224, score=score,
                               ms_per_image=ms, oof=oof)
    cheap, mid, tie = entry("cheap", 10, 0.90, noisy), entry("mid", 15, 0.95, noisy), \
        entry("tie", 30, 0.95, noisy)
    far_same = entry("far", 10 * backbones.COST_BOUND + 1, 0.99, noisy)
    chosen, said = backbones.choose([far_same, tie, mid, cheap], job)
    assert chosen is mid  # the best CV within the bound; of a tie, the cheaper
    assert [c["within_cost_bound"] for c in said] == [True, True, True, False]
    assert not said[-1]["better"]  # beyond the bound, and not better: not taken
    far_better = entry("far", 10 * backbones.COST_BOUND + 1, 0.99, clean)
    chosen, said = backbones.choose([cheap, mid, far_better], job)
    assert chosen is far_better and said[-1]["better"] and said[-1]["baseline"] == "mid"


def test_undoing_the_mean_centring_works_under_a_bfloat16_policy():
    """A file backbone under --precision=mixed_bfloat16 gets bfloat16 inputs in its
    CaffeToRGB layer; adding float32 means to them stopped the run (issue 29's bf16
    check)."""
    import tensorflow as tf
    from small_photo_classifier.features import zoo
    from small_photo_classifier.pipeline import ops
    layer = zoo.CaffeToRGB(dtype="mixed_bfloat16")
    centred = ops.vgg_mean_centre_image(tf.fill((1, 2, 2, 3), 128.0))
    out = layer(centred)
    assert out.dtype == tf.bfloat16
    np.testing.assert_allclose(np.asarray(tf.cast(out, tf.float32)), 128.0, atol=1.0)


def test_each_backbone_runs_at_its_trained_size_unless_told(tiny_file, tmp_path):
    """The size a network was trained at is its default input size: a named network's
    (efficientnetv2s: 384), a file's fixed input shape; a file that accepts any size is
    named with @SIZE or gets 224 with a reason that says so; --image_size overrides."""
    from small_photo_classifier.workflow.base import config
    assert networks.check_choice("vgg16").trained_size()[0] == 224
    assert networks.check_choice("EfficientNetV2S").trained_size() == (
        384, "efficientnetv2s was trained at 384 px")
    guessed = networks.check_choice(tiny_file).trained_size()
    assert guessed[0] == 224 and "@SIZE" in guessed[1] and "any size" in guessed[1]
    named = networks.check_choice(tiny_file + "@260")
    assert (named.name, named.size, named.label) == (tiny_file, 260, tiny_file + "@260")
    assert named.trained_size() == (260, "named as tiny_net.keras@260")
    image = keras.Input((48, 48, 3))
    keras.Model(image, keras.layers.Conv2D(4, 3, name="block1_conv")(image)).save(
        tmp_path / "fixed.keras")
    assert networks.check_choice(str(tmp_path / "fixed.keras") + ":rgb255").trained_size()[0] == 48
    with pytest.raises(ConfigError, match="below the smallest"):
        networks.check_choice("vgg16@16")
    model = config.ModelConfig("imagenet", False, 224, 0.5, networks.check_choice("vgg16"),
                               image_size_asked=128)
    assert model.size_for(networks.check_choice("efficientnetv2s")) == (128, "--image_size")
    assert model.size_for(named)[0] == 260  # @SIZE wins over --image_size


@pytest.mark.slow
def test_a_candidate_that_cannot_be_tried_gets_a_row_and_auto_goes_on(tiny_file, tmp_path):
    dense = tmp_path / "dense.keras"
    inputs = keras.Input((8,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(dense)
    result = run("train.py", "--demo", "--backbone=auto",
                 f"--backbones={tmp_path / 'missing.keras'},{dense},{tiny_file}@40,vgg16",
                 f"--workdir={tmp_path}/run", f"--cache_dir={tmp_path}/cache",
                 "--stage=backbones")
    assert result.returncode == 0, result.stderr[-3000:]
    import pandas as pd
    table = pd.read_csv(tmp_path / "run" / "backbones.csv")
    assert list(table.image_size[table.status == "compared"]) == [40, 64]
    why = dict(zip(table.name, table.status))
    assert why["missing.keras"].startswith("not tried: ") and "no such file" in why["missing.keras"]
    assert why["dense.keras"].startswith("not tried: ") and "image input" in why["dense.keras"]
    log = (tmp_path / "run" / "train.log").read_text()
    import re
    assert len(re.findall(r"^W.*not tried: ", log, re.M)) == 2  # one line each in the log
    assert "Traceback" not in result.stderr
    assert "chosen:" in result.stdout and "not tried: " in result.stdout


@pytest.mark.slow
def test_model_keras_loads_in_safe_mode_in_a_fresh_process_after_importing_the_layers(
        tiny, tmp_path):
    """The README's promise for model.keras: a plain Python process loads it with
    safe_mode=True once `small_photo_classifier.keras_layers` is imported (without it,
    Keras cannot know the tool's own layer, and says so), and gets the same outputs."""
    import subprocess
    import sys
    inference.export_model(tiny.model, str(tmp_path), {"image_size": SIZE, "task": "binary",
                                                       "class_names": ["0", "1"]})
    x = np.random.default_rng(1).uniform(-120, 120, (2, SIZE, SIZE, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, keras\n"
            "if sys.argv[1] == 'with': import small_photo_classifier.keras_layers\n"
            f"m = keras.saving.load_model({str(tmp_path / 'model.keras')!r}, safe_mode=True)\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(m(np.load("
            f"{str(tmp_path / 'x.npy')!r}))))\n")
    # This checkout's package (not whichever one is installed), from another folder.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    without = subprocess.run([sys.executable, "-c", code, "without"], capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=300)
    assert without.returncode != 0 and "CaffeToRGB" in without.stderr
    loaded = subprocess.run([sys.executable, "-c", code, "with"], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(tiny.model(x)),
                               atol=1e-5)


def _without_rescaling(source: str, path) -> str:
    """``source``'s network without its first Rescaling layer, same weights: a file that
    wants RGB in [-1, 1] and does not say so."""
    original = keras.saving.load_model(source, safe_mode=True)
    image = keras.Input((None, None, 3), name="image")
    x, outputs = image, {}
    for layer in original.layers[2:]:  # past the input and the Rescaling
        inbound = [t for node in [layer._inbound_nodes[0]] for t in node.input_tensors]
        args = [outputs.get(id(t), x) for t in inbound]
        x = layer(args if len(args) > 1 else args[0])
        outputs[id(layer.output)] = x
    keras.Model(image, x, name="stripped_net").save(path)
    return str(path)


def test_a_file_names_its_input_contract_or_is_refused(tiny_file, tmp_path):
    """A file whose first layer scales its input says so itself (RGB 0..255); one that
    does not is refused with one paragraph listing the contracts, and given the right one
    (:minus_one_to_one) gives the same features as the original with its Rescaling. The
    contract survives the export: a loaded model.keras reads it back."""
    from small_photo_classifier.features import backbone
    assert networks.check_choice(tiny_file).contract == networks.RGB255
    stripped = _without_rescaling(tiny_file, tmp_path / "stripped.keras")
    with pytest.raises(ConfigError, match="does not say what input it expects") as err:
        networks.check_choice(stripped)
    assert all(c in str(err.value) for c in networks.CONTRACTS)
    choice = networks.check_choice(stripped + "@40:minus_one_to_one")
    assert (choice.size, choice.contract, choice.contract_named) == (40, "minus_one_to_one",
                                                                     True)
    assert choice.label.endswith("stripped.keras@40:minus_one_to_one")
    with pytest.raises(ConfigError, match="brings its own input"):
        networks.check_choice("efficientnetv2b0:zero_to_one")
    x = np.random.default_rng(0).normal(0, 50, (2, SIZE, SIZE, 3)).astype(np.float32)
    feats = {}
    for name, entry in (("original", tiny_file), ("named", stripped + ":minus_one_to_one"),
                        ("wrong", stripped + ":zero_to_one")):
        clf = backbone.build_classifier("imagenet", False, SIZE, 0,
                                        backbone=networks.check_choice(entry))
        feats[name] = np.asarray(clf.last(clf.stem(x)))
        if name == "named":
            clf.model.save(tmp_path / "model.keras")
            loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
            assert backbone.from_model(loaded).net.preprocessing == "minus_one_to_one"
    np.testing.assert_allclose(feats["named"], feats["original"], rtol=1e-4, atol=1e-4)
    assert not np.allclose(feats["wrong"], feats["original"], rtol=1e-2, atol=1e-2)
