"""Value checks the configuration dataclasses share: each raises a one-line ``ValueError`` that names the setting
and says what would be valid."""

from __future__ import annotations


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}.")


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}.")
