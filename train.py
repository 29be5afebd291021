"""Train a transfer-learning image classifier on a folder of labelled photos.

A thin entry point: the command is `small_photo_classifier.scripts.train` (installed, also
``small-photo-classifier train``); ``python train.py --help`` lists its flags.
"""

from small_photo_classifier.scripts import train

if __name__ == "__main__":
    train.run()
