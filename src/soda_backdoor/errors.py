"""Errors that reach the user, and the checks that the configs share.

:class:`UserInputError` marks a problem with what the user gave us (a file, a name, a
shape). The CLI turns it into a one-line message and exit status 2; everything else is a bug.
:class:`InvalidSetting` is the one raised by a config's ``__post_init__``: it names the field,
so a front end can say which of its own flags was wrong.
"""

from __future__ import annotations

import math


class UserInputError(ValueError):
    """Bad user input: the message says what was wrong and what is valid."""


class InvalidSetting(UserInputError):
    """A config field with a value outside its valid range.

    Attributes:
        field: the config field (``top``, ``steps``...).
        rule: what is valid, with the value given (``must be in (0, 1], got 2.0``).
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field} {rule}")
        self.field = field
        self.rule = rule


def check_at_least(field: str, value: int | float, minimum: int | float) -> None:
    """``value >= minimum`` (and finite)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
        raise InvalidSetting(field, f"must be at least {minimum}, got {value}")


def check_interval(field: str, value: float, low: float, high: float, low_open: bool = False,
                   high_open: bool = False) -> None:
    """``value`` in the interval (finite; NaN is never valid)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise InvalidSetting(field, f"must be in {interval}, got {value}")


def check_finite(field: str, value: float, positive: bool = False) -> None:
    """A finite number (and ``> 0`` with ``positive``)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 or not positive)):
        raise InvalidSetting(field, f"must be a finite {'positive ' if positive else ''}number, got {value}")


def check_choice(field: str, value: str, valid: tuple[str, ...]) -> None:
    """One of ``valid``."""
    if value not in valid:
        raise InvalidSetting(field, f"must be one of {', '.join(valid)}, got {value!r}")


def build_config(cls, flags: dict[str, str], **kwargs):
    """``cls(**kwargs)``; a setting the config refuses is reported under the front end's flag name."""
    try:
        return cls(**kwargs)
    except InvalidSetting as exc:
        raise UserInputError(f"{flags.get(exc.field, exc.field)} {exc.rule}") from None
