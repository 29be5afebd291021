"""Heatmaps (issue 49): on synthetic photos whose only class evidence is a checkerboard in
a known quarter, the heatmap of the class it makes peaks in that quarter, photo by photo
(a constant, transposed or misplaced map fails: the quarter changes from photo to photo).

The background is the networks' own mean colour (ImageNet's mean: VGG16 subtracts it,
EfficientNetV2 normalises by it), so with random, bias-free weights it gives (nearly) zero
activations everywhere: whatever the head learned, only the board can carry evidence.
With a textured background a random network's head may learn the board as a *drop* in
activations, and the positive evidence is then everywhere else; that tests the random
weights, not the heatmap."""

import numpy as np
import pytest

SIZE = 128
MEAN_RGB = (123.68, 116.78, 103.94)


def _photos(n: int, seed: int):
    """(photos, labels, the evidence's quarter per photo or -1): the plain mean colour, and
    for class 1 a high-contrast checkerboard in quarter ``(i // 2) % 4`` (0 top-left, 1
    top-right, 2 bottom-left, 3 bottom-right), near its middle (the last feature map of a
    128 px photo has 4 x 4 cells: a board on a quarter's edge is half in the next one)."""
    rng = np.random.default_rng(seed)
    photos, labels, quarters = [], [], []
    for i in range(n):
        image = np.empty((SIZE, SIZE, 3), np.float32)
        image[:] = MEAN_RGB
        quarter = (i // 2) % 4 if i % 2 else -1
        if quarter >= 0:
            half = SIZE // 2
            r, c = rng.integers(14, 23, 2) + [half * (quarter // 2), half * (quarter % 2)]
            yy, xx = np.mgrid[0:28, 0:28]
            board = ((yy // 4 + xx // 4) % 2 == 0)[..., None]
            image[r:r + 28, c:c + 28] = np.where(board, [240, 40, 40], [20, 20, 200])
        photos.append(image)
        labels.append(i % 2)
        quarters.append(quarter)
    return np.stack(photos), np.array(labels), np.array(quarters)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "efficientnetv2b0"])
def test_the_heatmap_peaks_where_the_evidence_is(name):
    import keras
    from small_photo_classifier.features import backbone
    from small_photo_classifier.features.serve import explain
    from small_photo_classifier.pipeline import ops
    keras.utils.set_random_seed(0)
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone=name)
    x, y, _ = _photos(32, seed=0)
    eval_x = ops.vgg_mean_centre_image(x).numpy()
    features = clf.last.predict(clf.stem.predict(eval_x, verbose=0), verbose=0)
    # The cached-feature way; a larger step than real features want: random weights give
    # EfficientNet activations near 1e-3.
    clf.head.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    clf.head.fit(features, y, epochs=60, batch_size=16, verbose=0)
    test_x, test_y, quarters = _photos(16, seed=1)
    shown = ops.vgg_mean_centre_image(test_x[test_y == 1]).numpy()
    cams = explain.grad_cam(clf, shown, "binary", 1)
    assert cams.min() >= 0 and np.allclose(cams.max(axis=(1, 2)), 1)
    peaks = [np.unravel_index(np.argmax(explain.upsampled(c, SIZE, SIZE)), (SIZE, SIZE))
             for c in cams]
    found = [int(r >= SIZE // 2) * 2 + int(c >= SIZE // 2) for r, c in peaks]
    # Every photo: a constant map names one quarter for all 8 (2 right), a transposed one
    # swaps quarters 1 and 2.
    assert found == quarters[test_y == 1].tolist()


def test_predict_explain_writes_overlays_of_the_least_sure_or_named_photos(tmp_path):
    """--explain=4: four PNGs named after the four photos whose CSV probabilities are
    nearest a coin toss; --explain=NAMES: those photos'; a name not among the photos is
    one clear error before anything is written."""
    import pandas as pd
    from small_photo_classifier.pipeline.errors import ConfigError
    from tests.conftest import predict_in_process, trusted_run
    run, photos = trusted_run(tmp_path)
    out = tmp_path / "out" / "pred.csv"
    out.parent.mkdir()
    predict_in_process(run, photos, out, explain="4")
    table = pd.read_csv(out)
    sure = np.maximum(table.bees, 1 - table.bees)
    least = table.name[np.argsort(sure.to_numpy(), kind="stable")[:4]]
    folder = tmp_path / "out" / "pred_explain"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        n.rsplit(".", 1)[0] + ".png" for n in least)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in folder.iterdir())
    out2 = tmp_path / "named.csv"
    predict_in_process(run, photos, out2, explain="p3.jpg, p10")
    assert sorted(p.name for p in (tmp_path / "named_explain").iterdir()) == ["p10.png",
                                                                            "p3.png"]
    with pytest.raises(ConfigError, match="nope.jpg is not among the 24 photos"):
        predict_in_process(run, photos, tmp_path / "bad.csv", explain="p3.jpg,nope.jpg")
    assert not (tmp_path / "bad.csv").exists()


def test_run_explain_returns_a_map_at_the_photo_size(tmp_path):
    """The API: a [H, W] map in [0, 1] for a path or an array, the class named or the
    predicted one; an unknown class is one clear error."""
    import small_photo_classifier as spc
    from small_photo_classifier.pipeline.errors import UserError
    from tests.conftest import trusted_run
    run, photos = trusted_run(tmp_path)
    loaded = spc.load(str(run))
    heat = loaded.explain(str(photos / "p1.jpg"))
    assert heat.shape == (32, 32) and 0 <= heat.min() and heat.max() <= 1
    pixels = np.random.default_rng(0).uniform(0, 255, (40, 50, 3))
    assert loaded.explain(pixels, class_="ants").shape == (40, 50)
    with pytest.raises(UserError, match="the run's classes are ants, bees"):
        loaded.explain(pixels, class_="wasps")
    figure = loaded.explain_figure(pixels)
    assert "where the model saw" in figure.axes[0].get_title()


def test_top_losses_get_heatmaps_of_the_class_wrongly_given(tmp_path):
    """interpret.write_all with an explainer: the gallery of the wrongly predicted photos
    is drawn again with their heatmaps, each asked for the class the model gave."""
    from small_photo_classifier.features import task as task_lib
    from small_photo_classifier.workflow.views import interpret
    from tests.conftest import write_image
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"p{i}.png"))
        write_image(paths[-1], np.full((20, 20, 3), 40 * i, np.uint8))
    task = task_lib.Task("multiclass", ("a", "b", "c"))
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[[0, 1, 2, 2, 0, 2]] * 0.8 + 0.2 / 3  # photos 3 and 4 wrong
    asked = []

    def explain(shown, given):
        asked.append((sorted(shown), sorted(int(g) for g in given)))
        return [np.ones((4, 4)) for _ in shown]
    interpret.write_all(str(tmp_path / "out"), paths, y, probs, task, "test", explain=explain)
    assert asked == [([paths[3], paths[4]], [0, 2])]
    assert (tmp_path / "out" / interpret.HEATMAPS).is_file()
    interpret.write_all(str(tmp_path / "none"), paths, y, np.eye(3)[y], task, "test",
                        explain=explain)
    assert len(asked) == 1 and not (tmp_path / "none" / interpret.HEATMAPS).exists()
