"""The one error helper, and the declaration of a config field.

A message always reads ``field=value is invalid: allowed ...``, names the field as the user
types it (``moe.threshold``, ``mesh_shape``) and fits on one line. ``ConfigError`` subclasses
ValueError, so callers that catch ValueError keep working.

``declared`` makes a frozen-config field that carries its doc and its constraint, one object
(``Range``, ``OrNone``, ``PerLayer``, ``Choice``, ...) that gives both the check and the allowed
range's text;
``check_declared`` converts and checks every field (``dynmoe_jax.config`` derives the rest).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing
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


def counted(count: int, one: str, many: str) -> str:
    """``count`` and the noun in the number it takes: "1 batch", "3 batches"."""
    return f"{count} {one if count == 1 else many}"


def is_int(value: Any) -> bool:
    """An int that is not a bool (True would pass ``isinstance(v, int)``)."""
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- declarations


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a constraint is stated: the field ``name`` of the config class ``owner``, and the
    config itself (None in the docs, where a bound naming another field shows no value)."""

    owner: type
    name: str
    config: Any = None

    def show(self, name: str) -> str:
        """Another field of the same config as a message names it: ``moe.num_experts=8``."""
        path = field_path(self.owner, name)
        return path if self.config is None else f"{path}={_shown(getattr(self.config, name))}"


def _shown(value: Any) -> str:
    return repr(value.value) if isinstance(value, enum.Enum) else str(value)


class Constraint:
    """What a declared field allows, as one object: ``ok`` checks a value against the whole
    config, ``text`` states the allowed range (the messages' and the docs' words), and
    ``convert`` gives the value in the form the field holds (an enum member, a dtype's name)."""

    def ok(self, value: Any, config: Any) -> bool:
        raise NotImplementedError

    def text(self, site: Site) -> str:
        raise NotImplementedError

    def convert(self, value: Any) -> Any:
        return value


Bound = float | str | None  # a number, another field's name, or no bound


@dataclasses.dataclass(frozen=True)
class Range(Constraint):
    """An integer (or, ``integer=False``, any number but a bool) within the bounds; a bound may
    name another field. ``divides``: a field whose value it divides; ``note``: what a value
    means, said after the range."""

    low: Bound = None
    high: Bound = None
    integer: bool = True
    open_low: bool = False
    open_high: bool = False
    divides: str | None = None
    even: bool = False
    note: str = ""

    def ok(self, value: Any, config: Any) -> bool:
        if not (is_int(value) if self.integer else number(value)):
            return False
        low, high = (getattr(config, b) if isinstance(b, str) else b
                     for b in (self.low, self.high))  # fmt: skip
        return (
            (low is None or (value > low if self.open_low else value >= low))
            and (high is None or (value < high if self.open_high else value <= high))
            and (not self.divides or getattr(config, self.divides) % value == 0)
            and (not self.even or value % 2 == 0)
        )

    def text(self, site: Site) -> str:
        low, high = (site.show(b) if isinstance(b, str) else b for b in (self.low, self.high))
        kind = ("an even integer" if self.even else "an integer") if self.integer else "a number"
        if low is not None and high is not None and self.integer:
            out = f"{low}..{high}"
        elif low is not None and high is not None:
            out = (f"{low} {'<' if self.open_low else '<='} {site.name} "
                   f"{'<' if self.open_high else '<='} {high}")  # fmt: skip
        elif low is not None:
            out = f"{kind} {'>' if self.open_low else '>='} {low}"
        else:
            out = kind
        if self.divides:
            out += f" dividing {site.show(self.divides)}"
        return f"{out} ({self.note})" if self.note else out


@dataclasses.dataclass(frozen=True)
class OrNone(Constraint):
    """None, or what ``inner`` allows. ``meaning``: what None stands for; ``unless``: a
    (field, value) of the config with which None is refused."""

    inner: Constraint
    meaning: str = ""
    unless: tuple[str, Any] | None = None

    def ok(self, value: Any, config: Any) -> bool:
        if value is None:
            return self.unless is None or getattr(config, self.unless[0]) != self.unless[1]
        return self.inner.ok(value, config)

    def text(self, site: Site) -> str:
        notes = [self.meaning] if self.meaning else []
        if self.unless is not None:
            field, value = self.unless
            notes.append(f"not with {field_path(site.owner, field)}={_shown(value)}")
        said = f" ({'; '.join(notes)})" if notes else ""
        return f"None{said} or {self.inner.text(site)}"

    def convert(self, value: Any) -> Any:
        return None if value is None else self.inner.convert(value)


@dataclasses.dataclass(frozen=True)
class PerLayer(Constraint):
    """One value that ``inner`` allows, for every layer, or a tuple of them, one per layer
    (typed as a comma-separated list); the config that holds the layers checks the count."""

    inner: Constraint

    def ok(self, value: Any, config: Any) -> bool:
        if isinstance(value, tuple):
            return bool(value) and all(self.inner.ok(v, config) for v in value)
        return self.inner.ok(value, config)

    def text(self, site: Site) -> str:
        return f"{self.inner.text(site)}, or one such value per layer (comma-separated)"

    def convert(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):  # a list: the form a JSON run record gives
            return tuple(self.inner.convert(v) for v in value)
        return self.inner.convert(value)


@dataclasses.dataclass(frozen=True)
class Choice(Constraint):
    """One of ``values`` (of their own type: 1 is not True), or a member of an enum, which a
    value of the enum converts to. ``canonical``: the form a value is held in, where it has
    several (a dtype's name for ``jnp.bfloat16``)."""

    values: tuple | type[enum.Enum]
    canonical: Callable[[Any], Any] | None = None

    def ok(self, value: Any, config: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    def text(self, site: Site) -> str:
        return " | ".join(_shown(v) if isinstance(v, enum.Enum) else repr(v) for v in self.values)

    def convert(self, value: Any) -> Any:
        convert = self.values if isinstance(self.values, type) else self.canonical
        try:
            return value if convert is None else convert(value)
        except (ValueError, TypeError):
            return value  # ``ok`` refuses it, naming the value as given


@dataclasses.dataclass(frozen=True)
class Text(Constraint):
    """A string (``nonempty``: not ''), whose meaning the text states."""

    allowed: str
    nonempty: bool = False

    def ok(self, value: Any, config: Any) -> bool:
        return isinstance(value, str) and (bool(value) or not self.nonempty)

    def text(self, site: Site) -> str:
        return self.allowed


@dataclasses.dataclass(frozen=True)
class Given(Constraint):
    """What ``inner`` allows, only while the config's ``field`` holds ``value``."""

    inner: Constraint
    field: str
    value: Any

    def ok(self, value: Any, config: Any) -> bool:
        return self.inner.ok(value, config) and getattr(config, self.field) == self.value

    def text(self, site: Site) -> str:
        return f"{self.inner.text(site)}, with {field_path(site.owner, self.field)}=" + _shown(
            self.value
        )


BOOL = Choice((True, False))


def declared(
    default: Any,
    doc: str,
    allows: Constraint | None = None,
    *,
    cli: bool = True,
    override: bool = False,
) -> Any:
    """A frozen-config field together with its one-line doc and its constraint (an enum field
    takes its from the annotation): the field's only declaration. The configuration file's
    defaults, the command line's parsing, the checks, the fields that override an imported
    checkpoint's (``override``) and the docs' table all read it. ``cli=False``: a field the
    training config does not expose (set from another field, or from an imported checkpoint)."""
    meta = {"doc": doc, "allows": allows, "cli": cli, "override": override}
    return dataclasses.field(default=default, metadata=meta)


def field_path(owner: Any, name: str) -> str:
    """A field as the user types it: the section of its config class (``SECTION``, '' at the
    top level) and its name, e.g. ``moe.threshold``."""
    section = getattr(owner, "SECTION", "")
    return f"{section}.{name}" if section else name


@functools.cache
def constraints(owner: type) -> tuple[tuple[str, Constraint], ...]:
    """(name, constraint) of each constrained field of a config class, in field order: the
    declared one, else a Choice of the enum its annotation names (None allowed by ``| None``)."""
    hints = typing.get_type_hints(owner)
    out = []
    for field in dataclasses.fields(owner):
        allows = field.metadata.get("allows")
        members = [t for t in typing.get_args(hints[field.name]) if t is not type(None)]
        kind = members[0] if len(members) == 1 else hints[field.name]
        if allows is None and isinstance(kind, type) and issubclass(kind, enum.Enum):
            allows = Choice(kind) if kind is hints[field.name] else OrNone(Choice(kind))
        if allows is not None:
            out.append((field.name, allows))
    return tuple(out)


def check_declared(config: Any) -> None:
    """Puts each field of a frozen config in the form it holds (``Constraint.convert``), then
    runs every constraint in field order; the first failure is the one-line error naming the
    field as the user types it."""
    rules = constraints(type(config))
    for name, rule in rules:
        object.__setattr__(config, name, rule.convert(getattr(config, name)))
    for name, rule in rules:
        value = getattr(config, name)
        if not rule.ok(value, config):
            invalid(field_path(config, name), value, rule.text(Site(type(config), name, config)))


def check_field(config: Any, name: str, ok: bool, allowed: str) -> None:
    """A rule between fields, checked by the config itself: the error names the field as the
    user types it."""
    check(ok, field_path(config, name), getattr(config, name), allowed)


def number(value: Any) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
