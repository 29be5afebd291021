"""Deployment exports: SavedModel, ONNX, TFLite (float and int8), each loaded by its own
runtime in a fresh process and compared with model.keras."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from small_photo_classifier.features import backbone
from small_photo_classifier.features.serve import inference
from small_photo_classifier.pipeline.errors import ConfigError, DataError
from small_photo_classifier.workflow.base import config, values
from small_photo_classifier.workflow.use import deploy, runtimes

SIZE = 32


def test_formats_are_checked_before_any_work(monkeypatch):
    assert config.parse_formats("none") == [] and config.parse_formats("") == []
    assert config.parse_formats("TFLite, savedmodel,tflite") == ["tflite", "savedmodel"]
    with pytest.raises(ConfigError, match="unknown format.*coreml"):
        config.parse_formats("onnx,coreml")
    real = values.importlib.util.find_spec
    monkeypatch.setattr(values.importlib.util, "find_spec",
                        lambda name: None if name == "tf2onnx" else real(name))
    with pytest.raises(ConfigError, match=r"needs tf2onnx.*pip install -e \"\.\[export\]\""):
        config.parse_formats("savedmodel,onnx")


def test_a_file_its_runtime_cannot_load_is_a_clear_error(tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx graph")
    with pytest.raises(DataError, match="does not load with its runtime \\(onnx\\)"):
        runtimes.verify_in_fresh_process("onnx", str(broken), np.zeros((1, 4, 4, 3), np.float32))


@pytest.fixture
def run_folder(kaggle_dir, tmp_path):
    """A run folder as train.py leaves it: model.keras, model_info.json, split.csv."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    clf = backbone.build_classifier("none", include_top=False, image_size=SIZE, seed=0,
                                    backbone="vgg16")
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
    # Progress before the silent conversion, and the report's exports section.
    assert "export 1/1: onnx: converting to model.onnx" in result.stdout
    page = (run_folder / "report.html").read_text()
    assert "Deployment formats" in page and "model.onnx" in page
    assert "python export.py --workdir=" in page  # the command to export again


def _convnext_like(path):
    """A tiny network with the layers that need ONNX rewrites (ConvNeXt's grouped
    depthwise convolution and exact GELU, EfficientNetV2's Normalization), in Keras'
    naming conventions, wanting RGB 0..255."""
    import keras
    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Normalization(mean=[127.0] * 3, variance=[4000.0] * 3,
                                   name="normalization")(image)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="stem_conv")(x)
    x = keras.layers.Conv2D(8, 3, groups=8, padding="same", name="block1a_dwconv")(x)
    x = keras.layers.LayerNormalization(name="block1a_ln")(x)
    x = keras.layers.Activation("gelu", name="block1a_gelu")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="block2a_conv")(x)
    x = keras.layers.Conv2D(16, 3, groups=16, padding="same", name="block2b_dwconv")(x)
    x = keras.layers.Conv2D(24, 1, name="top_conv")(x)
    keras.Model(image, x, name="convnext_like").save(path)
    return str(path)


def test_a_model_trained_in_bfloat16_exports_float32_files(kaggle_dir, tmp_path):
    """On AVX512-BF16 CPUs runs train in mixed_bfloat16 and the global policy stays so
    when the exports are built; ONNX got bfloat16 depthwise kernels that onnxruntime
    refused (issue 38). Forced here, so this runs on every CPU."""
    import keras
    import onnx
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # put back after the test
    net = _convnext_like(tmp_path / "convnext_like.keras")
    clf = backbone.build_classifier("imagenet", False, SIZE, 0, backbone=net)
    assert "bfloat16" in {l.compute_dtype for l in clf.stem.layers}
    workdir = tmp_path / "run"
    workdir.mkdir()
    inference.export_model(clf.model, str(workdir), {
        "image_size": SIZE, "task": "binary", "class_names": ["0", "1"], "backbone": net})
    paths = sorted((kaggle_dir / "train").glob("*.jpg"), key=lambda p: int(p.stem))
    pd.DataFrame({"name": [p.stem for p in paths],
                  "label": [int(p.stem) % 2 for p in paths],
                  "subset": ["val" if int(p.stem) > 4 else "train" for p in paths],
                  "path": [str(p) for p in paths]}).to_csv(workdir / "split.csv", index=False)
    results = deploy.deploy_run(str(workdir), ["onnx", "tflite"], batch_size=4)
    for key in ("onnx", "tflite"):
        assert results[key]["max_abs_dp"] <= 1e-4, key
    graph = onnx.load(str(workdir / "model.onnx")).graph
    types = {t.type.tensor_type.elem_type for t in [*graph.input, *graph.output]}
    types |= {i.data_type for i in graph.initializer}
    assert onnx.TensorProto.BFLOAT16 not in types and onnx.TensorProto.FLOAT in types
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"  # left as it was


def test_a_format_that_fails_is_one_line_and_the_others_go_on(run_folder, monkeypatch,
                                                            capsys):
    calls = []

    def convert(model, fmt, workdir, quantize="none", representative=None):
        calls.append(fmt)
        if fmt == "onnx":
            (run_folder / "model.onnx").write_bytes(b"half a file")
            raise ValueError("Traceback (most recent call last):\n  File 'x', line 1\n"
                             "ValueError: the converter gave up\non this graph")
        raise RuntimeError("tflite too")

    monkeypatch.setattr(deploy, "convert", convert)
    with pytest.raises(DataError, match="export onnx, tflite failed"):
        deploy.deploy_run(str(run_folder), ["onnx", "tflite"], batch_size=4)
    assert calls == ["onnx", "tflite"]
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith("export onnx:")]
    assert line == ["export onnx: failed, no file kept: ValueError: the converter gave up "
                    "on this graph (details in the log file)"]
    assert "Traceback" not in out and not (run_folder / "model.onnx").exists()
    recorded = json.loads((run_folder / "metrics.json").read_text())["exports"]
    assert "gave up" in recorded["onnx"]["error"] and "tflite too" in recorded["tflite"]["error"]
