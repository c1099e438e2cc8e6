"""Config fields that describe themselves: one declaration gives validation, CLI flags and UI controls.

A method's config is a dataclass whose tunable fields are declared with :func:`knob`::

    ridge: float = knob(1.0, kind="float", label="Leverage ridge λ", help="...", low=0, low_open=True)

:func:`check` (called from every config's ``__post_init__``) rejects wrong types, NaN/inf and values
out of range with one readable line; :func:`knobs` lists the metadata for the CLI (``__main__``) and
the app (``ui.forms``), so adding a knob to a method is one field.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

KINDS = ("float", "int", "str", "bool", "floats", "ints")


@dataclass(frozen=True)
class Knob:
    """What a user needs to set a field: its label, help, type (``KINDS``), range and choices.

    ``low``/``high`` bound numbers (and every element of a list); ``*_open`` makes a bound strict.
    ``optional``: None is allowed (it means "not given"). ``flag``: the CLI flag, default
    ``--field-name``. ``advanced``: folded away in the app.
    """

    name: str
    kind: str
    default: Any
    label: str
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    optional: bool = False
    flag: str | None = None
    advanced: bool = False

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        lo = "" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        hi = "" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        if lo and hi:
            return f"{lo}, {hi}"
        if lo:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        return f"{'<' if self.high_open else '≤'} {self.high:g}" if hi else ""


def knob(default, *, kind: str, label: str, help: str, **meta) -> Any:
    """A dataclass field carrying :class:`Knob` metadata (``name`` and ``default`` are filled in)."""
    if kind not in KINDS:
        raise ValueError(f"unknown knob kind {kind!r}")
    return field(default=default, metadata={"knob": dict(kind=kind, label=label, help=help, **meta)})


def knobs(config_cls) -> list[Knob]:
    """The knobs of a config class, in declaration order."""
    out = []
    for f in fields(config_cls):
        if "knob" in f.metadata:
            default = f.default if f.default is not MISSING else None
            out.append(Knob(name=f.name, default=default, **f.metadata["knob"]))
    return out


def _number(k: Knob, value, what: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if k.kind in ("int", "ints") and float(value) != int(value):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    too_low = k.low is not None and (value <= k.low if k.low_open else value < k.low)
    too_high = k.high is not None and (value >= k.high if k.high_open else value > k.high)
    if too_low or too_high:
        raise ValueError(f"{what} must be in {k.range_text()}, got {value!r}")
    return int(value) if k.kind in ("int", "ints") else float(value)


def coerce(k: Knob, value):
    """``value`` checked against ``k`` and converted to its canonical type; ValueError otherwise."""
    what = k.name
    if value is None:
        if k.optional:
            return None
        raise ValueError(f"{what} is required")
    if k.kind in ("float", "int"):
        return _number(k, value, what)
    if k.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{what} must be true or false, got {value!r}")
        return value
    if k.kind == "str":
        if not isinstance(value, str) or (k.choices and value not in k.choices):
            options = f"one of {', '.join(map(str, k.choices))}" if k.choices else "a string"
            raise ValueError(f"{what} must be {options}, got {value!r}")
        return value
    if isinstance(value, str):
        value = parse_list(value, float if k.kind == "floats" else int, what)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{what} must be a non-empty list of numbers, got {value!r}")
    return tuple(_number(k, v, f"every value of {what}") for v in value)


def parse_list(text: str, kind=float, what: str = "list") -> tuple:
    """"0.1, 0.2 0.3" -> (0.1, 0.2, 0.3); ValueError naming ``what`` on anything else."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        return tuple(kind(p) for p in parts)
    except ValueError:
        raise ValueError(f"cannot read {what} {text[:80]!r}: expected numbers separated by commas") \
            from None


def check(config) -> None:
    """Validate and normalise every knob of a config instance in place (call from __post_init__)."""
    for k in knobs(type(config)):
        object.__setattr__(config, k.name, coerce(k, getattr(config, k.name)))


def build(config_cls, values: dict[str, Any]):
    """``config_cls(**values)`` after dropping keys that are not its knobs and Nones (defaults apply)."""
    names = {k.name for k in knobs(config_cls)}
    return config_cls(**{k: v for k, v in values.items() if k in names and v is not None})


def values(config) -> dict[str, Any]:
    """The knob values of a config instance: what reproduces it with ``type(config)(**values)``."""
    return {k.name: getattr(config, k.name) for k in knobs(type(config))}
