"""Tensors to features and predictions: the backbones (their descriptions and builders),
feature extraction, the HDF5 cache, heads, the probe, calibration."""
