"""The one error helper: every check of a user-facing value reports through it.

A message always reads ``field=value is invalid: allowed ...``, names the field as the user
types it (``moe.threshold``, ``mesh_shape``) and fits on one line. ``ConfigError`` subclasses
ValueError, so callers that catch ValueError keep working.
"""

from __future__ import annotations

import enum
from typing import Any, NoReturn


class ConfigError(ValueError):
    """A config field, flag or input holds a value outside its allowed range."""


def message(field: str, value: Any, allowed: str) -> str:
    """The one-line text of the error for ``field=value``."""
    return f"{field}={value!r} is invalid: allowed {allowed}"


def invalid(
    field: str, value: Any, allowed: str, error: type[ConfigError] = ConfigError
) -> NoReturn:
    """Raises the one-line error for ``field=value`` (as ``error``, a ConfigError subclass)."""
    raise error(message(field, value, allowed))


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
    """``invalid(field, value, allowed)`` unless ``ok``."""
    if not ok:
        invalid(field, value, allowed)


def enum_value(enum_cls: type[enum.Enum], field: str, value: Any) -> Any:
    """``enum_cls(value)``, or the one-line error listing the allowed values."""
    try:
        return enum_cls(value)
    except ValueError:
        invalid(field, value, " | ".join(repr(m.value) for m in enum_cls))


def is_int(value: Any) -> bool:
    """An int that is not a bool (True would pass ``isinstance(v, int)``)."""
    return isinstance(value, int) and not isinstance(value, bool)
