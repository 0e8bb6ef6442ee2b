"""Value checks the configuration dataclasses share: each raises a one-line ``ValueError`` that names the setting
and says what would be valid."""

from __future__ import annotations

import math


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}.")


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    # not (value > 0): NaN compares false both ways and would pass `value <= 0`; infinity is no setting either.
    if not math.isfinite(value) or not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}.")


def check_fraction(name: str, value) -> None:
    """``value`` in [0, 1); NaN fails the comparison and is refused with the rest."""
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}.")
