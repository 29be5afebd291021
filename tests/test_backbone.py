"""The VGG16 backbone, weights loading, scenarios and trainable blocks."""

import h5py
import keras
import numpy as np
import pytest

from small_photo_classifier.features import backbone, networks, scenarios, weights
from small_photo_classifier.pipeline.errors import ConfigError

SIZE = 32


@pytest.fixture(scope="module")
def classifier():
    return backbone.build_classifier(weights="none", include_top=False, image_size=SIZE, seed=0,
                                     backbone="vgg16")


def _trainable_layer_names(model):
    # Trainable variables carry their layer in the path: "block5_conv1/kernel".
    return sorted({v.path.split("/")[0] for v in model.trainable_weights})


@pytest.mark.parametrize("scenario, expected", [
    ("A", ["predictions"]),
    ("B", ["fc1", "predictions"]),
    ("C", ["block5_conv1", "block5_conv2", "block5_conv3", "fc1", "predictions"]),
])
def test_scenarios_train_exactly_their_layers(classifier, scenario, expected):
    classifier.set_trainable(scenarios.get_scenario(scenario).blocks)
    assert _trainable_layer_names(classifier.model) == expected
    n_weights = {"A": 2, "B": 4, "C": 10}[scenario]
    assert len(classifier.model.trainable_weights) == n_weights
    frozen = len(classifier.model.non_trainable_weights)
    assert frozen + n_weights == len(classifier.model.weights)


def test_trainable_blocks_general_and_unknown_names(classifier):
    classifier.set_trainable(scenarios.parse_blocks("block4, block5,fc", networks.VGG16))
    names = _trainable_layer_names(classifier.model)
    assert names == sorted([f"block4_conv{i}" for i in (1, 2, 3)]
                           + [f"block5_conv{i}" for i in (1, 2, 3)] + ["fc1", "predictions"])
    with pytest.raises(ConfigError, match="'block9'.*matches no block"):
        scenarios.parse_blocks("block5,block9", networks.VGG16)
    with pytest.raises(ConfigError, match="Unknown scenario 'D'"):
        scenarios.get_scenario("D")


def test_stable_layer_names_and_submodels(classifier):
    names = [l.name for l in classifier.layers()]
    assert names[:2] == ["block1_conv1", "block1_conv2"]
    assert names[-2:] == ["fc1", "predictions"]
    assert classifier.model.output.shape[1:] == (1,)
    x = np.random.default_rng(0).normal(0, 50, (2, SIZE, SIZE, 3)).astype(np.float32)
    full = classifier.model.predict(x, verbose=0)
    parts = classifier.head.predict(classifier.last.predict(
        classifier.stem.predict(x, verbose=0), verbose=0), verbose=0)
    np.testing.assert_allclose(full, parts, rtol=1e-5, atol=1e-6)
    assert np.all((full > 0) & (full < 1))


def test_include_top_needs_224():
    with pytest.raises(ConfigError, match="--noinclude_top"):
        weights.load_vgg16("none", include_top=True, image_size=64)


def _write_legacy_h5(path, model):
    """Writes weights in the Keras 2 layout that the ImageNet download uses."""
    with h5py.File(path, "w") as f:
        layers = [l for l in model.layers if l.weights]
        f.attrs["layer_names"] = [l.name.encode() for l in layers]
        for layer in layers:
            g = f.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0".encode() for w in layer.weights]
            g.attrs["weight_names"] = names
            for n, w in zip(names, layer.get_weights()):
                g.create_dataset(n.decode(), data=w)


@pytest.mark.parametrize("fmt", ["legacy.h5", "keras3.weights.h5"])
def test_saved_weights_file_loads_and_gives_identical_outputs(tmp_path, fmt):
    source = weights.load_vgg16("none", include_top=False, image_size=SIZE, seed=7)
    path = str(tmp_path / f"vgg16_{fmt}")
    if fmt.endswith(".weights.h5"):
        source.save_weights(path)
    else:
        _write_legacy_h5(path, source)
    loaded = weights.load_vgg16(path, include_top=False, image_size=SIZE, seed=123)
    x = np.random.default_rng(1).normal(0, 50, (2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_array_equal(source.predict(x, verbose=0), loaded.predict(x, verbose=0))
    other_seed = weights.load_vgg16("none", include_top=False, image_size=SIZE, seed=123)
    assert not np.allclose(other_seed.predict(x, verbose=0), loaded.predict(x, verbose=0))
    # A no-top file cannot provide fc1/fc2.
    with pytest.raises(weights.WeightsError, match="fc1"):
        weights.load_vgg16(path, include_top=True, image_size=224)


def test_missing_or_bogus_weights_file(tmp_path):
    with pytest.raises(weights.WeightsError, match="no such file"):
        weights.load_vgg16(str(tmp_path / "nope.h5"), include_top=False, image_size=SIZE)
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"not hdf5")
    with pytest.raises(weights.WeightsError, match="not a readable HDF5"):
        weights.load_vgg16(str(bogus), include_top=False, image_size=SIZE)


def test_offline_imagenet_is_a_clear_error_not_random_weights(monkeypatch):
    real = keras.applications.VGG16

    def offline(*args, weights=None, **kwargs):
        if weights == "imagenet":
            raise Exception("URL fetch failure on https://example.invalid: None -- "
                            "[Errno -3] Temporary failure in name resolution")
        return real(*args, weights=weights, **kwargs)

    monkeypatch.setattr(keras.applications, "VGG16", offline)
    with pytest.raises(weights.WeightsError) as err:
        weights.load_vgg16("imagenet", include_top=False, image_size=SIZE)
    message = str(err.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "--weights=none" in message and "--weights=/path/to/" in message


def test_output_layer_follows_the_task_and_parts_compose(classifier):
    three = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                      units=3, activation="softmax", backbone="vgg16")
    x = np.random.default_rng(0).normal(0, 50, (2, SIZE, SIZE, 3)).astype(np.float32)
    probs = three.model.predict(x, verbose=0)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    # A part that starts at any head layer continues exactly where the trunk stops.
    for layer in ("block4_pool", "block5_pool", "flatten", "fc1", "dropout"):
        trunk, part = classifier.trunk(layer), classifier.model_from(layer)
        np.testing.assert_allclose(part.predict(trunk.predict(x, verbose=0), verbose=0),
                                   classifier.model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
