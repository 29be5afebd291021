"""small-photo-classifier: transfer-learning image classification for small photo sets.

Subpackages: ``pipeline`` (files to batches of tensors), ``features`` (backbones, feature
extraction and its HDF5 cache, fitting, choosing, trust), ``workflow`` (the stages of a
run, its files, its uses) and ``scripts`` (the command-line programs). The Python API
(`train`, `load`, `Run`) is in `small_photo_classifier.api`; importing the package starts
no TensorFlow.
"""

from small_photo_classifier.api import Run, UserError, load, train

__all__ = ["Run", "UserError", "load", "train"]
__version__ = "0.1.0"
