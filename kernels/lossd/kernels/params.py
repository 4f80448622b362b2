"""Typed, validated function parameters.

Parameters arrive as JSON values (from the CLI, the gateway or a protobuf
``Value``).  Each function declares its parameters as :class:`Param` objects;
:func:`resolve_params` checks every given value against its declaration, fills
in defaults and refuses unknown names, so no option is silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lossd.kernels.errors import FieldViolation, InvalidInput

__all__ = ["Param", "resolve_params", "REDUCTION", "IGNORE_INDEX"]

# Parameter kinds. "float_list" holds a JSON array of numbers (class weights,
# quantiles); "float_or_list" accepts a scalar or an array (focal alpha,
# pos_weight).
KINDS = ("float", "int", "bool", "str", "float_list", "float_or_list")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Client text quoted in error messages is cut to this many characters: an
# error must never be larger than what fits in a status (gRPC trailers).
QUOTE_LIMIT = 80


def _short(text: str) -> str:
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 1] + "…"


def _quote(value: Any) -> str:
    """``repr(value)`` cut to QUOTE_LIMIT (integers of thousands of digits have no repr)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    return _short(repr(value))


@dataclass(frozen=True)
class Param:
    """One declared parameter of a function."""

    name: str
    kind: str
    default: Any = None
    doc: str = ""
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    nullable: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TypeError(f"Param {self.name}: kind must be one of {KINDS}, got {self.kind!r}")

    def range_text(self) -> str:
        """The allowed range in words, for ListFunctions and error messages."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        lo = "" if self.minimum is None else ("(" if self.exclusive_minimum else "[") + f"{self.minimum:g}"
        hi = "" if self.maximum is None else f"{self.maximum:g}" + (")" if self.exclusive_maximum else "]")
        if lo and hi:
            return f"{lo}, {hi}"
        if lo:
            return f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        if hi:
            return f"{'<' if self.exclusive_maximum else '<='} {self.maximum:g}"
        return ""

    # -- validation -------------------------------------------------------
    def check(self, value: Any, path: str) -> Any:
        """Return ``value`` converted to this parameter's type, or raise."""
        if value is None:
            if self.nullable:
                return None
            raise InvalidInput.single(path, f"expected {self._type_text()}, got null")
        if self.kind == "float":
            return self._check_number(value, path, float)
        if self.kind == "int":
            return self._check_number(value, path, int)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InvalidInput.single(path, f"expected a boolean, got {_describe(value)}")
            return value
        if self.kind == "str":
            spelled = _number_choice(value, self.choices)
            if spelled is not None:
                return spelled
            if _is_number(value) and self.choices and any(_is_number_text(c) for c in self.choices):
                raise InvalidInput.single(path, f"expected {self.range_text()}, got {_quote(value)}")
            if not isinstance(value, str):
                raise InvalidInput.single(path, f"expected a string, got {_describe(value)}")
            if self.choices and value not in self.choices:
                raise InvalidInput.single(path, f"expected {self.range_text()}, got {_quote(value)}")
            return value
        if self.kind == "float_list" or (self.kind == "float_or_list" and _is_sequence(value)):
            if not _is_sequence(value) or len(value) == 0:
                raise InvalidInput.single(path, f"expected a non-empty list of numbers, got {_describe(value)}")
            return tuple(self._check_number(v, f"{path}[{i}]", float) for i, v in enumerate(value))
        return self._check_number(value, path, float)

    def _type_text(self) -> str:
        return {
            "float": "a number",
            "int": "an integer",
            "bool": "a boolean",
            "str": "a string",
            "float_list": "a list of numbers",
            "float_or_list": "a number or a list of numbers",
        }[self.kind]

    def _check_number(self, value: Any, path: str, kind: type) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput.single(path, f"expected {'an integer' if kind is int else 'a number'}, got {_describe(value)}")
        number: float | int
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise InvalidInput.single(path, f"expected an integer, got {_quote(value)}")
            number = int(value)
            if not INT64_MIN <= number <= INT64_MAX:  # kernels hand integers to torch as int64
                raise InvalidInput.single(path, f"expected an integer in [-2^63, 2^63 - 1], got {_quote(number)}")
        else:
            try:
                number = float(value)
            except OverflowError:  # an integer beyond the float range
                raise InvalidInput.single(path, f"expected a finite number, got {_quote(value)}") from None
            if not math.isfinite(number):
                raise InvalidInput.single(path, f"expected a finite number, got {number!r}")
        too_low = self.minimum is not None and (number <= self.minimum if self.exclusive_minimum else number < self.minimum)
        too_high = self.maximum is not None and (number >= self.maximum if self.exclusive_maximum else number > self.maximum)
        if too_low or too_high:
            raise InvalidInput.single(path, f"expected a value in {self.range_text()}, got {_quote(number)}")
        return number


def _number_choice(value: Any, choices: tuple[str, ...] | None) -> str | None:
    """The choice a number spells, for str params whose choices are numbers ("0", "1", "nan").

    sklearn-style options such as ``zero_division`` take 0, 1 or NaN; JSON and
    the CLI deliver them as numbers, so 0, 1.0 and NaN resolve to "0", "1" and
    "nan" (and states computed with either spelling merge)."""
    if not choices or not _is_number(value):
        return None
    text = f"{value:g}"
    return text if text in choices else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if _is_sequence(value):
        return f"a list of length {len(value)}"
    if isinstance(value, Mapping):
        return "an object"
    return f"{type(value).__name__} {_quote(value)}"


def resolve_params(declared: Sequence[Param], given: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Validate ``given`` against ``declared``; return every parameter with defaults filled.

    ``path`` prefixes field names in errors, e.g. ``functions[2].params``.
    """
    by_name = {p.name: p for p in declared}
    violations: list[FieldViolation] = []
    for name in given:
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            violations.append(FieldViolation(f"{path}.{_short(name)}", f"unknown parameter {_quote(name)}; expected one of: {known}"))
    if violations:
        raise InvalidInput(violations)
    resolved: dict[str, Any] = {}
    for p in declared:
        if p.name in given:
            try:
                resolved[p.name] = p.check(given[p.name], f"{path}.{p.name}")
            except InvalidInput as exc:
                violations.extend(exc.violations)
        else:
            resolved[p.name] = p.default
    if violations:
        raise InvalidInput(violations)
    return resolved


REDUCTION = Param(
    "reduction",
    "str",
    "mean",
    "mean: Σw·ℓ/Σw over valid elements; sum: Σw·ℓ; none: per-element values (not mergeable)",
    choices=("mean", "sum", "none"),
)
IGNORE_INDEX = Param("ignore_index", "int", -100, "label value excluded from numerator and denominator")
