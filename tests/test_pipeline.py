"""Pipeline ops (eagerly and inside Dataset.map), augmentation and the two input paths."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from small_photo_classifier.pipeline import augment, input as input_lib, ops, scan
from tests.conftest import colour_image, write_image


def _in_dataset_map(fn, *args):
    """Runs ``fn`` inside a tf.data graph and returns its single output as numpy."""
    ds = tf.data.Dataset.from_tensors(args).map(fn)
    return next(iter(ds)).numpy()


def test_vgg_mean_centre_matches_keras_preprocess_input():
    rgb = np.random.default_rng(0).uniform(0, 255, (2, 9, 7, 3)).astype(np.float32)
    expected = keras.applications.vgg16.preprocess_input(rgb.copy())
    np.testing.assert_allclose(ops.vgg_mean_centre_image(rgb).numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(_in_dataset_map(ops.vgg_mean_centre_image, rgb), expected,
                               atol=1e-4)
    # BGR order: the first output channel is blue minus its mean.
    np.testing.assert_allclose(ops.vgg_mean_centre_image(rgb).numpy()[..., 0],
                               rgb[..., 2] - 103.939, atol=1e-4)
    np.testing.assert_allclose(ops.vgg_mean_uncentre_image(expected).numpy(), rgb, atol=1e-3)


@pytest.mark.parametrize("kind, array", [
    ("rgb.png", np.random.default_rng(1).integers(0, 255, (10, 12, 3), dtype=np.uint8)),
    ("gray.png", np.random.default_rng(2).integers(0, 255, (10, 12, 1), dtype=np.uint8)),
    ("rgba.png", np.random.default_rng(3).integers(0, 255, (10, 12, 4), dtype=np.uint8)),
])
def test_decode_always_gives_three_channels(kind, array):
    data = tf.io.encode_png(array).numpy()
    eager = ops.decode_image_bytes(data, 32).numpy()
    mapped = _in_dataset_map(lambda b: ops.decode_image_bytes(b, 32), data)
    assert eager.shape == mapped.shape == (10, 12, 3)
    np.testing.assert_array_equal(eager, mapped)
    if array.shape[-1] == 1:
        np.testing.assert_array_equal(eager, np.repeat(array, 3, axis=-1))
    else:
        np.testing.assert_array_equal(eager, array[..., :3])


def test_large_jpeg_decodes_downscaled_but_never_below_target():
    big = np.tile(np.linspace(0, 255, 400, dtype=np.uint8)[None, :, None], (300, 1, 3))
    data = tf.io.encode_jpeg(big).numpy()
    image = ops.decode_image_bytes(data, 64).numpy()
    assert image.shape == (75, 100, 3)  # 300/4 = 75 >= 64, 300/8 = 37 < 64
    assert ops.decode_image_bytes(data, 224).shape == (300, 400, 3)
    assert _in_dataset_map(lambda b: ops.decode_image_bytes(b, 64), data).shape == (75, 100, 3)


def test_resize_eager_and_mapped_agree():
    image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    eager = ops.resize_image(image, 16).numpy()
    mapped = _in_dataset_map(lambda x: ops.resize_image(x, 16), image)
    assert eager.shape == (16, 16, 3) and eager.dtype == np.float32
    assert eager.min() >= 0 and eager.max() <= 255
    np.testing.assert_allclose(eager, mapped, atol=1e-4)
    flat = np.full((30, 50, 3), 77, np.uint8)
    np.testing.assert_allclose(ops.resize_image(flat, 16).numpy(), 77, atol=1e-3)


@pytest.mark.parametrize("preset", sorted(augment.PRESETS))
def test_augment_keeps_shape_dtype_and_range(preset):
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 24, 24, 3)), tf.float32)
    seed = tf.constant([1, 2], tf.int64)
    out = augment.augment_batch(images, augment.get_preset(preset), seed)
    mapped = _in_dataset_map(
        lambda x: augment.augment_batch(x, augment.get_preset(preset), seed), images)
    assert out.shape == images.shape and out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), mapped, atol=1e-2)  # graph vs eager rounding
    assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 255
    if preset == "none":
        np.testing.assert_array_equal(out.numpy(), images.numpy())
    else:
        assert not np.allclose(out.numpy(), images.numpy())


def test_flip_only_gives_the_image_or_its_mirror():
    preset = augment.Preset(horizontal_flip=True)
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 3)), tf.float32)
    out = augment.augment_batch(images, preset, tf.constant([5, 6], tf.int64)).numpy()
    mirrored = images.numpy()[:, :, ::-1]
    flipped = 0
    for o, i, m in zip(out, images.numpy(), mirrored):
        same, mirror = np.allclose(o, i, atol=1e-3), np.allclose(o, m, atol=1e-3)
        assert same or mirror
        flipped += mirror
    assert 0 < flipped < 16


def test_augment_is_seeded():
    preset = augment.get_preset("aggressive")
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)), tf.float32)
    a = augment.augment_batch(images, preset, tf.constant([1, 1], tf.int64)).numpy()
    b = augment.augment_batch(images, preset, tf.constant([1, 1], tf.int64)).numpy()
    c = augment.augment_batch(images, preset, tf.constant([2, 1], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_augment_layer_is_identity_at_inference():
    layer = augment.Augment("aggressive", seed=0)
    x = ops.vgg_mean_centre_image(
        np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32))
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    assert not np.allclose(layer(x, training=True).numpy(), x.numpy())


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(Exception, match="keras_blog"):
        augment.get_preset("wild")


@pytest.fixture
def image_files(tmp_path):
    paths = [write_image(str(tmp_path / f"{i}.jpg"), colour_image(i % 2, size=30, seed=i))
             for i in range(5)]
    return paths, [i % 2 for i in range(5)], [str(i) for i in range(5)]


def test_eval_path_is_ordered_complete_and_centred(image_files):
    paths, labels, names = image_files
    batches = list(input_lib.eval_dataset(paths, labels, names, image_size=32, batch_size=2))
    assert [len(b["name"]) for b in batches] == [2, 2, 1]  # last partial batch kept
    assert [n.decode() for b in batches for n in b["name"].numpy()] == names
    image = np.concatenate([b["image"].numpy() for b in batches])
    assert image.shape == (5, 32, 32, 3) and image.dtype == np.float32
    raw = ops.resize_image(tf.io.decode_jpeg(tf.io.read_file(paths[0]), channels=3), 32)
    np.testing.assert_allclose(image[0], keras.applications.vgg16.preprocess_input(
        raw.numpy().copy()), atol=1e-3)
    again = np.concatenate([b["image"].numpy() for b in input_lib.eval_dataset(
        paths, labels, names, image_size=32, batch_size=2)])
    np.testing.assert_array_equal(image, again)


def test_train_path_augments_and_eval_path_does_not(image_files):
    paths, labels, names = image_files
    plain = {n.decode(): im for b in input_lib.eval_dataset(paths, labels, names, 32, 5)
             for n, im in zip(b["name"].numpy(), b["image"].numpy())}
    train = input_lib.train_dataset(paths, labels, names, 32, 5, augment="keras_blog", seed=1)
    batch = next(iter(train))
    assert batch["image"].shape == (5, 32, 32, 3) and batch["image"].dtype == tf.float32
    changed = [not np.allclose(im, plain[n.decode()], atol=1e-2)
               for n, im in zip(batch["name"].numpy(), batch["image"].numpy())]
    assert all(changed)
    # The train path repeats forever and carries the labels along with names.
    for b in train.take(3):
        for n, l in zip(b["name"].numpy(), b["label"].numpy()):
            assert l == labels[names.index(n.decode())]
    no_aug = next(iter(input_lib.train_dataset(paths, labels, names, 32, 5, augment="none")))
    for n, im in zip(no_aug["name"].numpy(), no_aug["image"].numpy()):
        np.testing.assert_allclose(im, plain[n.decode()], atol=1e-4)


def test_scan_names_undecodable_files(tmp_path, image_files):
    paths, _, _ = image_files
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    result = dict(scan.scan_images(paths + [str(bad), str(empty)], 32))
    assert set(result) == {str(bad), str(empty)}
    assert "decoded" in result[str(bad)] and "empty" in result[str(empty)]
    import pandas as pd
    frame = pd.DataFrame({"path": paths + [str(bad)]})
    with pytest.raises(Exception, match="bad.jpg"):
        scan.filter_bad_images(frame, 32, "fail", str(tmp_path / "report.csv"))


def test_scan_memo_skips_unchanged_good_images_only(tmp_path, image_files, monkeypatch):
    paths, _, _ = image_files
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    memo = str(tmp_path / "cache" / "preflight.json")
    checked = []
    real = scan.check_image
    monkeypatch.setattr(scan, "check_image", lambda p, s=224, m=scan.MAX_PIXELS:
                        checked.append(p) or real(p, s, m))
    everything = paths + [str(bad)]
    assert [p for p, _ in scan.scan_with_memo(everything, 32, memo)] == [str(bad)]
    assert sorted(checked) == sorted(everything)
    checked.clear()
    # Unchanged good images are not decoded again; the bad one always is.
    assert [p for p, _ in scan.scan_with_memo(everything, 32, memo)] == [str(bad)]
    assert checked == [str(bad)]
    # A changed file (new size and mtime) is checked again, and found bad now.
    checked.clear()
    with open(paths[0], "r+b") as f:
        f.truncate(10)
    assert {p for p, _ in scan.scan_with_memo(everything, 32, memo)} == {paths[0], str(bad)}
    assert sorted(checked) == sorted([paths[0], str(bad)])
