"""Export a trained run's model (SavedModel, ONNX, TFLite).

A thin entry point: the command is `small_photo_classifier.scripts.export` (installed, also
``small-photo-classifier export``); ``python export.py --help`` lists its flags.
"""

from small_photo_classifier.scripts import export

if __name__ == "__main__":
    export.run()
