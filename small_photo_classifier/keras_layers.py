"""The tool's own Keras layers, registered: ``import small_photo_classifier.keras_layers``
before ``keras.saving.load_model(RUN/model.keras, safe_mode=True)`` in any process.

Such a raw load gives the network's own outputs: probabilities *before* the run's
calibration (and without the field's prior or the unfamiliar score), so up to a few
hundredths from predict.py's. ``small_photo_classifier.load(RUN).predict(...)`` gives
predict.py's numbers; the SavedModel, ONNX and TFLite exports carry the calibration in
their graphs. (Importing the package itself starts no TensorFlow, so it registers
nothing; this module does.)"""

from small_photo_classifier.features.zoo import CaffeToRGB
from small_photo_classifier.pipeline.augment import Augment

__all__ = ["Augment", "CaffeToRGB", "load_model"]


def load_model(path: str):
    """``keras.saving.load_model(path, safe_mode=True)`` with the tool's layers known."""
    import keras
    return keras.saving.load_model(path, safe_mode=True)
