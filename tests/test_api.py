"""The Python API (issue 49): `small_photo_classifier.train`, `load`, `Run.predict`, run
in this very process as a notebook would, on the built-in demo (random weights, 64 px)."""

import logging
import os
import random
import sys

import numpy as np
import pandas as pd
import pytest

import small_photo_classifier as spc


def _users_state():
    """What a user's own Keras work in the same kernel depends on."""
    import keras
    import matplotlib
    from keras.src.backend.common import global_state as keras_state
    return {"policy": keras.mixed_precision.global_policy().name,
            "matplotlib_backend": matplotlib.get_backend(),
            "python_random": random.getstate(), "numpy_random": np.random.get_state()[1].copy(),
            "keras_seed": keras_state.get_global_attribute("global_random_seed"),
            "handlers": list(logging.getLogger().handlers), "streams": (sys.stdout, sys.stderr)}


@pytest.mark.slow
def test_train_twice_then_predict_in_one_process_leaves_the_users_state(tmp_path):
    import keras
    from small_photo_classifier.workflow.use import predicting
    # The user's own session: another dtype policy, their seed, their log handler, their
    # plotting backend (a notebook's is its inline one; svg stands in for it here).
    import matplotlib
    import matplotlib.pyplot  # noqa: F401  (a user who plots has pyplot imported)
    backend = matplotlib.get_backend()
    matplotlib.use("svg")
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(1234)
    mine = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(mine)
    from small_photo_classifier.workflow.base import console
    script_log = console._transcript()  # as a train.py run in this process leaves it
    try:
        before = _users_state()
        cache = str(tmp_path / "cache")
        run = spc.train(demo="binary", workdir=str(tmp_path / "run"), cache_dir=cache)
        after = _users_state()
        assert after["policy"] == "mixed_float16"
        assert after["python_random"] == before["python_random"]
        assert np.array_equal(after["numpy_random"], before["numpy_random"])
        assert after["keras_seed"] == before["keras_seed"] == 1234
        assert after["handlers"] == before["handlers"] and after["streams"] == before["streams"]
        # A second job in the same process (features from the cache the first one made).
        again = spc.train(demo="binary", workdir=str(tmp_path / "again"), cache_dir=cache,
                          scenarios=["B"])
        assert os.path.isfile(os.path.join(again.workdir, "model.keras"))
        assert _users_state()["policy"] == "mixed_float16"
        # The API's runs had log files of their own; the one before is untouched.
        assert console._STATE["transcript"] is script_log and not script_log.ended
        assert "Done in" in open(os.path.join(run.workdir, "train.log")).read()
        assert matplotlib.get_backend() == "svg"
    finally:
        logging.getLogger().removeHandler(mine)
        matplotlib.use(backend)

    assert run.metrics["final"] and run.report_path.endswith("report.html")
    assert "<iframe" in run._repr_html_()
    test = os.path.join(cache, "demo_data", "test")
    table = run.predict(test)
    # predict.py's numbers: its CSV from the same folder, and the run's own submission.csv.
    csv = str(tmp_path / "predicted.csv")
    predicting.run(predicting.PredictRun(32, "auto", "auto", 1, None, 2, workdir=run.workdir,
                                         data_dir=test, output=csv))
    written = pd.read_csv(csv, dtype={"name": str})
    assert table.name.tolist() == written.name.tolist()
    assert np.abs(table.invasive.to_numpy() - written.invasive.to_numpy()).max() <= 1e-5
    assert np.abs(table.unfamiliar_score.to_numpy()
                  - written.unfamiliar_score.to_numpy()).max() <= 1e-4
    submission = pd.read_csv(os.path.join(run.workdir, "submission.csv"), dtype={"name": str})
    assert np.abs(table.set_index("name").invasive[submission.name].to_numpy()
                  - submission.invasive.to_numpy()).max() <= 1e-5
    # A list of paths, and images as an array, through the same loader.
    paths = sorted(table.path)[:3]
    by_path = spc.load(run.workdir).predict(paths)
    assert np.allclose(by_path.invasive, table.set_index("path").invasive[paths], atol=1e-6)
    from PIL import Image
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    by_array = run.predict(pixels)
    assert by_array.shape[0] == 3 and np.allclose(by_array.invasive, by_path.invasive,
                                                  atol=0.05)
    assert set(by_array.predicted) <= set(run.classes)


def test_flags_as_keyword_arguments_are_checked_like_train_py(tmp_path):
    with pytest.raises(spc.UserError, match="unknown flag 'cv_fold'"):
        spc.train(str(tmp_path), cv_fold=3)
    with pytest.raises(spc.UserError, match="cv_folds"):
        spc.train(str(tmp_path), cv_folds="many")
    with pytest.raises(spc.UserError, match="does not exist"):
        spc.train(str(tmp_path / "missing"))
    with pytest.raises(spc.UserError, match="model_info.json"):
        spc.load(str(tmp_path))


def test_one_loader_of_a_run_folder_for_prediction():
    """predict.py, serve.py, the training stages' test-set prediction, the exports and the
    API load a run folder through `workflow.use.loaded.load`; it and Ray's workers (in
    features/, which cannot import the workflow) are the only callers of the predictor's
    loader, `features.serve.inference.load_predictor`."""
    import ast
    root = os.path.dirname(spc.__file__)
    callers, users = set(), set()
    for folder, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Attribute) and node.attr == "load_predictor":
                    callers.add(rel)
                if isinstance(node, ast.Attribute) and node.attr == "load" and \
                        isinstance(node.value, ast.Name) and node.value.id == "loaded":
                    users.add(rel)
    assert callers == {os.path.join("workflow", "use", "loaded.py"),
                       os.path.join("features", "serve", "ray_engine.py")}
    assert users >= {os.path.join("workflow", "use", "predicting.py"),
                     os.path.join("workflow", "use", "serving.py"),
                     os.path.join("workflow", "train", "stages.py"), "api.py",
                     os.path.join("workflow", "use", "deploy.py")}
