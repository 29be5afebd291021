"""Serve a trained run over HTTP: a predict page, a JSON API and a label page.

A thin entry point: the command is `small_photo_classifier.scripts.serve` (installed, also
``small-photo-classifier serve``); ``python serve.py --help`` lists its flags.
"""

from small_photo_classifier.scripts import serve

if __name__ == "__main__":
    serve.run()
