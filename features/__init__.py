"""Tensors to features and predictions: the VGG16 backbone, feature extraction, HDF5 cache, heads."""
