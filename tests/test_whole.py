"""Whole-network fine-tuning as a candidate, epochs by evidence, honest estimates and the
refit on every label (issue 46)."""

import json

import keras
import numpy as np
import pandas as pd
import pytest

from small_photo_classifier.features import task as task_lib
from small_photo_classifier.features.choose import honest
from tests.conftest import write_image
from tests.inprocess import run

SIZE = 32


def _blind_network(path):
    """A light "pretrained" network whose first layer is (nearly) a 4x4 box blur: it
    averages any pattern of period 4 (stripes, a checkerboard) into its mean colour, so
    its frozen features can hardly tell such textures apart; a trace of other filters
    (1 % of the blur's weight) gives training that layer a direction to grow."""
    image = keras.Input((None, None, 3), name="image")
    kernel = 1 / 48 + np.random.default_rng(3).normal(0, 2e-4, (4, 4, 3, 8))
    blur = keras.layers.Conv2D(8, 4, padding="valid", name="block1a_conv",
                               kernel_initializer=keras.initializers.Constant(kernel),
                               bias_initializer="zeros")
    x = keras.layers.ReLU(name="block1a_relu")(blur(
        keras.layers.Rescaling(1 / 255, name="rescaling")(image)))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="block2a_conv",
                            kernel_initializer=keras.initializers.HeNormal(seed=1))(x)
    x = keras.layers.ReLU(name="block2a_relu")(x)
    x = keras.layers.Conv2D(16, 1, name="top_conv",
                            kernel_initializer=keras.initializers.HeNormal(seed=2))(x)
    keras.Model(image, keras.layers.ReLU(name="top_activation")(x), name="blind_net").save(path)
    return str(path)


def _texture_folders(root, n=160):
    """Two classes that differ only by a texture of period 4 (stripes two pixels wide, or
    a checkerboard of 2x2 squares) on a random plain colour; PNG, so nothing blurs it."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE] // 2
    for i in range(n):
        label = i % 2
        pattern = ((xx + yy) % 2) if label else (xx % 2)
        colour = rng.uniform(70, 180, 3)
        noise = rng.normal(0, 10, (SIZE, SIZE, 3))
        image = np.clip(colour + (pattern[..., None] - 0.5) * 70 + noise, 0, 255).astype(
            np.uint8)
        write_image(str(root / ("checker" if label else "stripes") / f"t{i}.png"), image)
    return str(root)


@pytest.mark.slow
def test_the_default_run_exports_the_whole_network_when_frozen_features_are_blind(tmp_path):
    """The probe and every scenario stay near chance (the blur is below every cached
    layer); the whole network learns the texture, beats them beyond noise on honest
    validation predictions, and is what model.keras is."""
    net = _blind_network(tmp_path / "blind_net.keras")
    data = _texture_folders(tmp_path / "data")
    result = run("train.py", f"--data_dir={data}", f"--backbone={net}@{SIZE}",
                 f"--workdir={tmp_path}/run", f"--cache_dir={tmp_path}/cache",
                 # Tiny images and a tiny network: a larger step than real photos want.
                 "--whole_learning_rate=3e-3", "--whole_epochs=25", "--whole_patience=25",
                 "--augment=none")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["probe"]["cv_auc_mean"] < 0.75  # frozen features: near chance
    whole = metrics["whole_network"]
    assert whole["tried"] and whole["decision"]["whole_network_kept"]
    assert metrics["finetune"]["scenario"] == "whole"
    assert metrics["final"]["model"].startswith("the whole network, fine-tuned")
    estimate = metrics["export"]["estimate"]
    assert estimate["value"] > 0.9 and "chosen on the other validation images" in estimate["how"]
    info = json.load(open(tmp_path / "run" / "model_info.json"))
    assert info["scenario"] == "whole" or info.get("trainable_blocks")
    assert "whole-network fine-tuning beats" in result.stdout
    # The frozen scenario's bag waited for the verdict, and was never made.
    assert not (tmp_path / "run" / "bag.keras").exists() and "bag" not in metrics
    assert not any(k.startswith("bag members") for k in metrics["timings"])
    # The exported model was refit on every label, the whole network too.
    refit = metrics["finetune"]["refit"]
    assert refit["rows"] == 160 and refit["finetune_epochs"] == whole["kept_epoch"] > 0


@pytest.mark.slow
def test_the_bag_waits_for_the_whole_networks_verdict_and_is_made_when_it_loses(tmp_path):
    """Whole-network fine-tuning is tried (frozen features near chance) but cannot learn
    (a step too small to move it): the frozen scenario is exported, and the bag that
    waited for the verdict is made then and exported beside it."""
    net = _blind_network(tmp_path / "blind_net.keras")
    data = _texture_folders(tmp_path / "data", n=80)
    result = run("train.py", f"--data_dir={data}", f"--backbone={net}@{SIZE}",
                 f"--workdir={tmp_path}/run", f"--cache_dir={tmp_path}/cache",
                 "--whole_learning_rate=1e-9", "--whole_epochs=1", "--augment=none",
                 "--scenarios=B", "--epochs=3", "--noprobe_baseline")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["whole_network"]["tried"] and metrics["finetune"]["scenario"] == "B"
    assert metrics["bag"] and (tmp_path / "run" / "bag.keras").is_file()
    assert "its bag is made now" in open(tmp_path / "run" / "train.log").read()


def test_cross_fitting_takes_each_part_from_an_epoch_the_others_chose():
    """Each validation image's prediction comes from the epoch that scores best on the
    other images, so an epoch that is best only by luck on one image does not decide
    that image's own prediction."""
    task = task_lib.Task("multiclass", ("a", "b", "c"))
    y = np.arange(30) % 3
    right = np.eye(3)[y]
    wrong = np.eye(3)[(y + 1) % 3]
    epochs = [wrong, right, 0.5 * right + 0.5 * wrong]
    probs, chosen = honest.cross_fit(task, y, epochs)
    assert chosen == [1] * len(chosen)
    np.testing.assert_array_equal(probs, right)
    # Epoch 0 is best on every image but one part's: that part gets it anyway, chosen by
    # the others; the score of the cross-fitted predictions is what a new image would see.
    lucky = wrong.copy()
    lucky[:6] = right[:6]
    probs, chosen = honest.cross_fit(task, y, [lucky, right * 0.6 + wrong * 0.4])
    assert task.headline_score(y, probs) <= task.headline_score(y, right)


def test_the_frozen_model_is_kept_when_nothing_could_beat_it_beyond_noise():
    from types import SimpleNamespace
    from small_photo_classifier.workflow.train import whole
    task = task_lib.binary()
    y = np.tile([0, 1], 20)
    net = SimpleNamespace(stem=SimpleNamespace(weights=[]), last=SimpleNamespace(weights=[]),
                          net=SimpleNamespace(slug="tiny"))
    # (The validation photos without groups: each is its own piece of evidence.)
    job = SimpleNamespace(classifier=net, task=task, y_val=y, seed=0,
                          val=pd.DataFrame({"name": [f"p{i}" for i in range(len(y))]}))
    perfect = y * 0.8 + 0.1
    plan = whole.plan(job, "auto", perfect, "the linear probe")
    assert not plan.tried and "could not beat it beyond noise" in plan.why
    # Two errors in 40 (the flowers' case): fixing half of them shows nothing.
    two_wrong = perfect.copy()
    two_wrong[:2] = 1 - two_wrong[:2]
    assert not whole.plan(job, "auto", two_wrong, "the linear probe").tried
    plan = whole.plan(job, "auto", np.full(len(y), 0.5), "the linear probe")
    assert plan.tried and "fixed about half of its errors" in plan.why
    # Multi-class: 13 errors in 73 (the seedlings' case) is worth trying, 4 in 115 not.
    task12 = task_lib.Task("multiclass", tuple("abcdefghijkl"))
    for n, errors, tried in ((73, 13, True), (115, 4, False)):
        y12 = np.arange(n) % 12
        probs = np.eye(12)[y12] * 0.9 + 0.1 / 12
        probs[:errors] = np.eye(12)[(y12[:errors] + 1) % 12] * 0.9 + 0.1 / 12
        job12 = SimpleNamespace(**{**vars(job), "task": task12, "y_val": y12})
        assert whole.plan(job12, "auto", probs, "scenario C").tried == tried, (n, errors)
    assert not whole.plan(job, "no", np.full(len(y), 0.5), "x").tried
    heavy = SimpleNamespace(stem=SimpleNamespace(weights=[np.zeros((4000, 4000))]),
                            last=SimpleNamespace(weights=[]), net=SimpleNamespace(slug="big"))
    plan = whole.plan(SimpleNamespace(**{**vars(job), "classifier": heavy}), "auto",
                      np.full(len(y), 0.5), "x")
    assert not plan.tried and "16.0 M parameters" in plan.why


def _confident(y, right, sure, k=12):
    """Probabilities of ``k`` classes: the true class (``right``) or the next one with
    probability ``sure``, the rest spread evenly."""
    probs = np.full((len(y), k), (1 - sure) / (k - 1))
    probs[np.arange(len(y)), np.where(right, y, (y + 1) % k)] = sure
    return probs


def test_the_whole_network_is_kept_by_the_log_loss_only_when_it_is_not_less_accurate():
    """Seedlings' case: 73 validation photos, 4 more right of 73 (+0.055) is not beyond
    the accuracy's noise, but a model far surer of the true classes is beyond the log
    loss's; the same sureness with fewer right photos keeps the frozen model."""
    from types import SimpleNamespace
    from small_photo_classifier.workflow.train import whole
    y = np.arange(73) % 12
    job = SimpleNamespace(task=task_lib.Task("multiclass", tuple("abcdefghijkl")), y_val=y,
                          seed=0, val=pd.DataFrame({"name": [f"p{i}" for i in range(73)]}))
    frozen_right = np.arange(73) >= 13                      # 60 of 73
    whole_right = frozen_right.copy()
    whole_right[:6], whole_right[13:15] = True, False        # 6 fixed, 2 broken: 64
    frozen = _confident(y, frozen_right, 0.45)
    decision = whole.choose(job, frozen, _confident(y, whole_right, 0.9), "scenario C")
    assert not decision["candidate_better_beyond_noise"]    # accuracy alone: noise
    assert decision["loss"]["candidate_better_beyond_noise"]
    assert decision["whole_network_kept"] and "log loss" in decision["why"]
    fewer = frozen_right.copy()
    fewer[:2], fewer[13:17] = True, False                     # 2 fixed, 4 broken: 58
    surer = np.where(fewer[:, None], _confident(y, fewer, 0.9), _confident(y, fewer, 0.45))
    decision = whole.choose(job, frozen, surer, "scenario C")
    assert decision["loss"]["candidate_better_beyond_noise"]
    assert not decision["whole_network_kept"] and decision["kept"] == "scenario C"
    # Neither: the same model against itself.
    assert not whole.choose(job, frozen, frozen, "scenario C")["whole_network_kept"]


@pytest.mark.slow
def test_a_scenario_chosen_at_its_last_allowed_epoch_says_raise_epochs(kaggle_dir, tmp_path):
    result = run("train.py", f"--data_dir={kaggle_dir}", f"--workdir={tmp_path}/run",
                 f"--cache_dir={tmp_path}/cache", "--weights=none", "--noinclude_top",
                 f"--image_size={SIZE}", "--val_size=4", "--batch_size=4", "--epochs=1",
                 "--scenarios=B", "--cv_folds=2", "--finetune_epochs=0", "--tta=1",
                 "--notensorboard", "--noprobe_baseline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "still improving at the last epoch (1): raise --epochs" in result.stdout
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["heads"]["B"]["still_improving_at_limit"]
    assert metrics["cross_validation"]["B"]["still_improving_at_limit"]
    assert "still improving at the last epoch (1): raise --epochs" in (
        tmp_path / "run" / "report.html").read_text()
