"""Field specs for `vgg_jax.configs.validation`: what one config field may hold, and its words for errors.

Each builder (`integer`, `number`, `boolean`, `one_of`, `text`, `sequence`,
`custom`) returns a `Spec` whose `problem(value)` is None for an allowed value
and otherwise the "expected …" part of the message. Imports neither JAX nor
TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one field may hold.

    Attributes:
      accepts: True for an allowed value (the value's type included).
      allowed: what is allowed, in words, for the error message ("an integer >= 1").
      optional: the field may be absent (code reads it with ``config.get``).
      refused: value -> why, for values refused on purpose (the message then says why).
    """

    accepts: Callable[[Any], bool]
    allowed: str
    optional: bool = False
    refused: Mapping[Any, str] = dataclasses.field(default_factory=dict)

    def problem(self, value: Any) -> str | None:
        """None if `value` is allowed, else the 'expected …' part of the message."""
        try:
            ok = self.accepts(value)
        except (TypeError, ValueError):  # e.g. comparing a string with a number
            ok = False
        if ok:
            return None
        reason = self.refused.get(value) if _hashable(value) else None
        return f"expected {self.allowed}" + (f"; {reason}" if reason else "")


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def is_int(value: Any) -> bool:
    # bool is an int subclass, but True is no batch size.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _bound_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_fmt(high)}"
    return ""


def _in_bounds(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def integer(
    low: int | None = None,
    high: int | None = None,
    *,
    special: Mapping[int, str] | None = None,
    multiple_of: int | None = None,
    optional: bool = False,
) -> Spec:
    """An int (not a bool) within [low, high]; `special` values (e.g. -1: 'once per epoch') are allowed too."""
    special = dict(special or {})

    def accepts(value: Any) -> bool:
        if not is_int(value):
            return False
        if value in special:
            return True
        return _in_bounds(value, low, high, False, False) and (not multiple_of or value % multiple_of == 0)

    words = " ".join(filter(None, ["an integer", _bound_text(low, high, False, False)]))
    if multiple_of:
        words += f", a multiple of {multiple_of}"
    words += "".join(f", or {key} ({meaning})" for key, meaning in special.items())
    return Spec(accepts, words, optional)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> Spec:
    """A finite int or float within the bounds (open or closed at each end)."""
    words = " ".join(filter(None, ["a finite number", _bound_text(low, high, low_open, high_open)]))
    return Spec(lambda v: is_number(v) and _in_bounds(v, low, high, low_open, high_open), words, optional)


def boolean(*, optional: bool = False) -> Spec:
    return Spec(lambda v: isinstance(v, bool) or type(v).__name__ == "bool_", "True or False", optional)


def one_of(*values: Any, refused: Mapping[Any, str] | None = None, optional: bool = False) -> Spec:
    """Exactly one of `values` (strings compared exactly, so 'Float32' is refused)."""
    words = "one of " + ", ".join(repr(v) for v in values)
    return Spec(lambda v: isinstance(v, str) and v in values, words, optional, dict(refused or {}))


def text(*, nonempty: bool = False, what: str = "", optional: bool = False) -> Spec:
    words = ("a non-empty string" if nonempty else "a string") + (f" ({what})" if what else "")
    return Spec(lambda v: isinstance(v, str) and (bool(v.strip()) or not nonempty), words, optional)


def sequence(
    item: Callable[[Any], bool],
    items: str,
    *,
    length: int | None = None,
    increasing: bool = False,
    optional: bool = False,
) -> Spec:
    """A tuple or list (JSON turns tuples into lists) of items `item` accepts."""

    def accepts(value: Any) -> bool:
        if not isinstance(value, (tuple, list)) or (length is not None and len(value) != length):
            return False
        if not all(item(v) for v in value):
            return False
        return not increasing or all(a < b for a, b in zip(value[:-1], value[1:], strict=True))

    size = f"{length} " if length is not None else ""
    order = "strictly increasing " if increasing else ""
    return Spec(accepts, f"a tuple/list of {size}{order}{items}", optional)


def custom(accepts: Callable[[Any], bool], allowed: str, *, optional: bool = False) -> Spec:
    return Spec(accepts, allowed, optional)
