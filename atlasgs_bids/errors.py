"""The app's own exceptions. This module imports nothing, so any layer may raise them."""


class InputError(ValueError):
    """A problem with the user's input that the user can fix (exit code 2).

    The message names the offending file or option and says what to do about it.
    """


class ProcessingError(RuntimeError):
    """A processing step failed on valid input (exit code 1)."""
