"""The use layer: a trained run put to use (predict.py, exports, serve.py, the calibration
and unfamiliar score applied); imports the base and views layers."""
