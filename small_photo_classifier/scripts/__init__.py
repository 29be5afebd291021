"""The command-line programs: train, predict, export and serve. Each module defines its
absl flags when imported and runs with ``run()``; the checkout's ``train.py`` (and the
others) and the installed ``small-photo-classifier <command>`` both call it."""
