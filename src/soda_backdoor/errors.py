"""Errors that reach the user.

:class:`UserInputError` marks a problem with what the user gave us (a file, a name, a
shape). The CLI turns it into a one-line message and exit status 2; everything else is a bug.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad user input: the message says what was wrong and what is valid."""
