"""Field specs for `vgg_jax.configs.validation`: what one config field may hold, and its words for errors.

Each builder (`integer`, `number`, `boolean`, `one_of`, `text`, `sequence`,
`custom`) returns a `Spec` whose `problem(value)` is None for an allowed value
and otherwise the "expected …" part of the message; the specs of single fields
(`warm_start_step`, `layer_names`, …) follow. `vgg_jax.configs.fields` uses them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one field may hold.

    Attributes:
      accepts: True for an allowed value (the value's type included).
      allowed: what is allowed, in words, for the error message ("an integer >= 1").
      refused: value -> why, for values refused on purpose (the message then says why).
    """

    accepts: Callable[[Any], bool]
    allowed: str
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
    return Spec(accepts, words)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Spec:
    """A finite int or float within the bounds (open or closed at each end)."""
    words = " ".join(filter(None, ["a finite number", _bound_text(low, high, low_open, high_open)]))
    return Spec(lambda v: is_number(v) and _in_bounds(v, low, high, low_open, high_open), words)


def boolean() -> Spec:
    return Spec(lambda v: isinstance(v, bool) or type(v).__name__ == "bool_", "True or False")


def one_of(*values: Any, refused: Mapping[Any, str] | None = None) -> Spec:
    """Exactly one of `values` (strings compared exactly, so 'Float32' is refused)."""
    words = "one of " + ", ".join(repr(v) for v in values)
    return Spec(lambda v: isinstance(v, str) and v in values, words, dict(refused or {}))


def text(*, nonempty: bool = False, what: str = "") -> Spec:
    words = ("a non-empty string" if nonempty else "a string") + (f" ({what})" if what else "")
    return Spec(lambda v: isinstance(v, str) and (bool(v.strip()) or not nonempty), words)


def sequence(
    item: Callable[[Any], bool],
    items: str,
    *,
    length: int | None = None,
    increasing: bool = False,
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
    return Spec(accepts, f"a tuple/list of {size}{order}{items}")


def custom(accepts: Callable[[Any], bool], allowed: str) -> Spec:
    return Spec(accepts, allowed)


# --------------------------------------------------------------------------- specs of single fields

FLOAT16_REFUSED = (
    "float16 is refused: training it needs loss scaling, which vgg_jax does not do (gradients underflow); "
    "bfloat16 has float32's range and needs none"
)
# Layer names of the released Caffe models (conv{block}_{i}, fc6–fc8), for warm_start.layers.
LAYER_NAME = re.compile(r"conv[1-5]_[1-4]|fc[678]")
_HOST_PORT = re.compile(r"\S+:\d{1,5}")


def warm_start_layers(value: Any) -> str | tuple[str, ...]:
    """config.warm_start.layers as 'all' or a tuple of layer names; ValueError for anything else.

    Accepts what a config or the command line produces: 'all'; a tuple/list of names; a comma-separated
    string; ('all',) and ('conv1_1,fc8',), as config_flags parses an override by the field's current type
    (a tuple). '' and () mean no layers.
    """
    if isinstance(value, str):
        parts = [value]
    elif isinstance(value, (tuple, list)) and all(isinstance(part, str) for part in value):
        parts = list(value)
    else:
        raise ValueError(f"warm_start.layers={value!r} is neither a string nor a sequence of strings")
    names = tuple(name.strip() for part in parts for name in part.split(",") if name.strip())
    if names == ("all",):
        return "all"
    unknown = [name for name in names if not LAYER_NAME.fullmatch(name)]
    if unknown:
        raise ValueError(f"warm_start.layers: {unknown} are not layer names")
    return names


def _layers(value: Any) -> bool:
    warm_start_layers(value)  # raises ValueError, which Spec.problem reports
    return True


def _step(value: Any) -> bool:
    # The command line gives a str field '5' for --config.warm_start.step=5; checkpoints accepts it.
    if isinstance(value, str):
        return value in ("best", "latest") or value.isdigit()
    return is_int(value) and value >= 0


def _names(value: Any) -> bool:
    return value is None or (isinstance(value, (tuple, list)) and all(isinstance(name, str) for name in value))


def _string_mapping(value: Any) -> bool:
    keys = getattr(value, "keys", None)
    return keys is not None and all(isinstance(k, str) and isinstance(value[k], str) for k in keys())


layer_names = custom(
    _layers,
    "'all', or layer names (conv1_1 … conv5_4, fc6, fc7, fc8) as a tuple/list or a comma-separated string "
    "('' or () for none)",
)
warm_start_step = custom(_step, "'best', 'latest' or a step number >= 0")
class_names = custom(_names, "None or a list of strings")
string_mapping = custom(_string_mapping, "a mapping of strings to strings")
spike_factor = custom(lambda v: is_number(v) and (v == 0 or v > 1), "0 (off) or a finite number > 1")
coordinator_address = custom(
    lambda v: isinstance(v, str) and (v == "" or bool(_HOST_PORT.fullmatch(v))), "'' or 'host:port'"
)
