"""Bounded numbers from option strings, for the twistd plugins and the tcplab command alike.

Each raises a one-line ``UsageError`` that names the option and what it takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.python import usage


def intOption(name: str, value: object, low: int, high: int) -> int:
    """Parse a bounded integer option, or raise a one-line UsageError."""
    return _bounded(name, value, low, high, int, "a whole number")


def floatOption(name: str, value: object, low: float, high: float) -> float:
    """Parse a bounded number option, or raise a one-line UsageError."""
    return _bounded(name, value, low, high, float, "a number")


def _bounded(name: str, value: object, low: Any, high: Any, convert: Callable[[str], Any], kind: str) -> Any:
    try:
        number = convert(str(value))
    except ValueError:
        raise usage.UsageError(f"{name} must be {kind}, not {value!r}") from None
    if not low <= number <= high:
        raise usage.UsageError(f"{name} must be between {low} and {high}, not {number}")
    return number
