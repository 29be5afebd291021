"""Errors that mean "the user's input is wrong", as opposed to bugs.

Scripts catch `UserError` and print its message as one paragraph with a non-zero
exit status instead of a traceback. Messages say what was expected, what was
found, and where (file path, CSV line).
"""


class UserError(Exception):
    """Base class for problems the user can fix (bad data, bad flags, missing files)."""


class DataError(UserError):
    """The data folder, an image, or a labels CSV is not what the tool expects."""


class ConfigError(UserError):
    """A flag or argument value is invalid or inconsistent with the others."""
