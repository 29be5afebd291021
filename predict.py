"""Predict class probabilities for a folder of images with a model exported by train.py.

A thin entry point: the command is `small_photo_classifier.scripts.predict` (installed, also
``small-photo-classifier predict``); ``python predict.py --help`` lists its flags.
"""

from small_photo_classifier.scripts import predict

if __name__ == "__main__":
    predict.run()
