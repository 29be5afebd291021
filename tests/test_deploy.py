"""Deployment exports: SavedModel, ONNX, TFLite (float and int8), each loaded by its own
runtime in a fresh process and compared with model.keras."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from features import backbone
from features.serve import inference
from pipeline.errors import ConfigError, DataError
from workflow import deploy

SIZE = 32


def test_formats_are_checked_before_any_work(monkeypatch):
    assert deploy.parse_formats("none") == [] and deploy.parse_formats("") == []
    assert deploy.parse_formats("TFLite, savedmodel,tflite") == ["tflite", "savedmodel"]
    with pytest.raises(ConfigError, match="unknown format.*coreml"):
        deploy.parse_formats("onnx,coreml")
    real = deploy.importlib.util.find_spec
    monkeypatch.setattr(deploy.importlib.util, "find_spec",
                        lambda name: None if name == "tf2onnx" else real(name))
    with pytest.raises(ConfigError, match=r"needs tf2onnx.*pip install -e \"\.\[export\]\""):
        deploy.parse_formats("savedmodel,onnx")


def test_a_file_its_runtime_cannot_load_is_a_clear_error(tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx graph")
    with pytest.raises(DataError, match="does not load with its runtime \\(onnx\\)"):
        deploy.verify_in_fresh_process("onnx", str(broken), np.zeros((1, 4, 4, 3), np.float32))


@pytest.fixture
def run_folder(kaggle_dir, tmp_path):
    """A run folder as train.py leaves it: model.keras, model_info.json, split.csv."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0)
    inference.export_model(clf.model, str(workdir), {
        "image_size": SIZE, "task": "binary", "class_names": ["0", "1"]})
    paths = sorted((kaggle_dir / "train").glob("*.jpg"), key=lambda p: int(p.stem))
    pd.DataFrame({"name": [p.stem for p in paths],
                  "label": [int(p.stem) % 2 for p in paths],
                  "subset": ["val" if int(p.stem) > 4 else "train" for p in paths],
                  "path": [str(p) for p in paths]}).to_csv(workdir / "split.csv", index=False)
    return workdir


@pytest.mark.slow
def test_every_format_predicts_like_model_keras_in_a_fresh_process(run_folder):
    results = deploy.deploy_run(str(run_folder), ["savedmodel", "onnx", "tflite"], "int8",
                                batch_size=4)
    assert set(results) == {"savedmodel", "onnx", "tflite", "tflite_int8"}
    assert (run_folder / "savedmodel" / "saved_model.pb").is_file()
    for name in ("model.onnx", "model.tflite", "model_int8.tflite"):
        assert (run_folder / name).stat().st_size > 0, name
    for key in ("savedmodel", "onnx", "tflite"):  # float formats: the same model
        assert results[key]["max_abs_dp"] < 1e-4, key
        assert abs(results[key]["auc_change"]) <= 0.002, key
        assert results[key]["images"] == 8 and results[key]["ms_per_image"] > 0
    # Every weight stored once in the SavedModel, as in the flat float32 TFLite file
    # (Keras' own model.export writes each twice).
    assert results["savedmodel"]["bytes"] < 1.1 * results["tflite"]["bytes"]
    # int8 really is quantized (its outputs differ from the float model's by far more than
    # float rounding, ~1e-7 for the float formats, and the file is about a quarter of the
    # float one), yet still the same model (max |dP| 0.006 here and on the real ants/bees
    # run, docs/benchmarks.md).
    int8 = results["tflite_int8"]
    assert int8["quantize"] == "int8" and 1e-4 < int8["max_abs_dp"] < 0.05
    assert int8["bytes"] < results["tflite"]["bytes"] / 2
    recorded = json.loads((run_folder / "metrics.json").read_text())["exports"]
    assert recorded["onnx"]["max_abs_dp"] == results["onnx"]["max_abs_dp"]
    assert "BGR" in recorded["input"]
    assert not [p for p in os.listdir(run_folder) if p.endswith(".tmp")]


@pytest.mark.slow
def test_export_script_writes_and_checks_a_format_quietly(run_folder):
    from tests.test_finetune_predict import _run, check_console
    result = _run("export.py", f"--workdir={run_folder}", "--export=onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "export onnx:" in result.stdout and (run_folder / "model.onnx").is_file()
    check_console(result, (run_folder / "export.log").read_text())
    recorded = json.loads((run_folder / "metrics.json").read_text())["exports"]
    assert recorded["onnx"]["max_abs_dp"] < 1e-4
