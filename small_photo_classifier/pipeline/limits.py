"""Limits on what the tool accepts, TensorFlow-free so that flags can name them.

``MAX_PIXELS`` (``--max_pixels``): the most pixels an image may have. More than any
camera's photo (a 200-megapixel phone sensor saves 50-megapixel JPEGs by default), far
less than a decompression bomb's (a 0.4 MB PNG of 20000 x 20000 decodes to 1.2 GB,
4.8 GB as float32). Read from the file's header before anything is decoded
(`pipeline.scan`), in every entry point: train.py's and predict.py's pre-flight check
(which also stands before the Ray path: only images that passed reach a worker) and
serve.py's uploads.
"""

MAX_PIXELS = 100_000_000
