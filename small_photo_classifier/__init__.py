"""small-photo-classifier: transfer-learning image classification for small photo sets.

Subpackages: ``pipeline`` (files to batches of tensors), ``features`` (backbones, feature
extraction and its HDF5 cache, fitting, choosing, trust), ``workflow`` (the stages of a
run, its files, its uses) and ``scripts`` (the command-line programs).
"""

__version__ = "0.1.0"
