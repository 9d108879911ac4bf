"""The one error helper, and the declaration of a config field.

A message always reads ``field=value is invalid: allowed ...``, names the field as the user
types it (``moe.threshold``, ``mesh_shape``) and fits on one line. ``ConfigError`` subclasses
ValueError, so callers that catch ValueError keep working.

``declared`` makes a frozen-config field that carries its doc, its allowed range and its
check; ``check_declared`` runs the checks (``dynmoe_jax.config`` derives the rest).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
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


def counted(count: int, one: str, many: str) -> str:
    """``count`` and the noun in the number it takes: "1 batch", "3 batches"."""
    return f"{count} {one if count == 1 else many}"


def is_int(value: Any) -> bool:
    """An int that is not a bool (True would pass ``isinstance(v, int)``)."""
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- declarations

Allowed = str | Callable[[Any], str]  # the allowed range, or a function of the whole config
Check = Callable[[Any, Any], bool]  # (value, the whole config) -> ok


def declared(
    default: Any,
    doc: str,
    allowed: Allowed = "",
    ok: Check | None = None,
    *,
    cli: bool = True,
    override: bool = False,
) -> Any:
    """A frozen-config field together with its one-line doc, its allowed range and its check:
    the field's only declaration. The configuration file's defaults, the command line's
    parsing, the checks, the list of routing fields that override an imported checkpoint's
    (``override``) and the docs' table all read it. ``cli=False``: a field the training config
    does not expose (set from another field, or from an imported checkpoint)."""
    meta = {"doc": doc, "allowed": allowed, "ok": ok, "cli": cli, "override": override}
    return dataclasses.field(default=default, metadata=meta)


def allowed_text(field: dataclasses.Field, config: Any) -> str:
    allowed = field.metadata.get("allowed", "")
    return allowed(config) if callable(allowed) else allowed


def check_declared(config: Any, prefix: str = "") -> None:
    """Runs every declared check of a frozen config, in field order; the first failure is the
    one-line error naming ``prefix + field``."""
    for field in dataclasses.fields(config):
        ok = field.metadata.get("ok")
        value = getattr(config, field.name)
        if ok is not None and not ok(value, config):
            invalid(f"{prefix}{field.name}", value, allowed_text(field, config))


def number(value: Any) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_at_least(low: int) -> Check:
    return lambda v, _: is_int(v) and v >= low


def optional(test: Check) -> Check:
    """``test``, or None."""
    return lambda v, c: v is None or test(v, c)
