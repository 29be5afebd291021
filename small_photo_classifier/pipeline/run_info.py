"""What an exported run folder holds, read without TensorFlow.

predict.py and export.py check the run folder (a folder, with ``model.keras`` and a
readable ``model_info.json``) before TensorFlow's start-up, so that a wrong
``--workdir`` is a one-line error in a fraction of a second, never a traceback.
"""

import json
import os

from small_photo_classifier.pipeline.errors import ConfigError

MODEL_FILE = "model.keras"
BAG_FILE = "bag.keras"
INFO_FILE = "model_info.json"
# The input contract every exported model and every cache shares, whatever the backbone:
# ImageNet channel means in BGR order, as the original VGG16 was trained with ("caffe"
# preprocessing in keras.applications.imagenet_utils), subtracted with no scaling.
MEANS_BGR = (103.939, 116.779, 123.68)
INPUT_VALUES = ("channels BGR minus the ImageNet means ("
                + ", ".join(f"{c} {m:g}" for c, m in zip("BGR", MEANS_BGR)) + "), no scaling")
# Test-time augmentation views: 1 (the image), 2 (and its mirror), up to 8 (crops too).
MAX_TTA = 8


def check_tta(n_views: int) -> None:
    """A ConfigError unless ``n_views`` is a number of TTA views from 1 to `MAX_TTA`."""
    if not 1 <= n_views <= MAX_TTA:
        raise ConfigError(f"--tta must be between 1 and {MAX_TTA}; got {n_views}.")


def read_info(workdir: str, need_model: bool = True) -> dict:
    """``model_info.json`` of the run exported in ``workdir``; a ConfigError saying what
    was expected and what was found when ``workdir`` is not such a run folder."""
    if not workdir or not os.path.exists(workdir):
        raise ConfigError(f"--workdir={workdir!r} does not exist: expected the run folder "
                          "train.py wrote (with model.keras and model_info.json).")
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir!r} is a file, not a run folder: expected the "
                          "folder train.py wrote (with model.keras and model_info.json).")
    needed = [INFO_FILE] + ([MODEL_FILE] if need_model else [])
    missing = [n for n in needed if not os.path.isfile(os.path.join(workdir, n))]
    if missing:
        raise ConfigError(f"No exported model in {workdir}: expected {MODEL_FILE} and "
                          f"{INFO_FILE} (written by train.py at the end of fine-tuning); "
                          f"missing {' and '.join(missing)}.")
    path = os.path.join(workdir, INFO_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"Cannot read {path}: {err}. Re-export the run (python train.py "
                          "... --stage=finetune) to write it again.") from err
    if not isinstance(info, dict) or "image_size" not in info:
        raise ConfigError(f"{path} is not a model description written by train.py (no "
                          "image_size). Re-export the run (--stage=finetune).")
    return info
