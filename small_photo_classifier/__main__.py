"""``python -m small_photo_classifier <command> [--flags]``: the same as the installed
``small-photo-classifier`` command."""

from small_photo_classifier import cli

cli.main()
