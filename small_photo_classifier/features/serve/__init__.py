"""Inference: export, safe loading, TTA and batch prediction, here or on a Ray cluster."""
