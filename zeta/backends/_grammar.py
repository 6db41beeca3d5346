"""JSON schema to llama.cpp grammar (GBNF), for structured output.

llama-cpp-python's converter (``llama_cpp.llama_grammar``) does the work; zeta adds integer
bounds (``minimum``, ``maximum`` and their exclusive forms), which that converter ignores and
which schemas made from pydantic models use all the time (``Field(ge=0, le=150)``). A bounded
integer becomes a grammar of digit ranges, so the model can only write a number in range.
Other keywords the converter does not enforce (``multipleOf``, number bounds, most ``format``
values) are not enforced.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["integer_range_rule", "json_schema_grammar"]

#: The longest integer the converter's own integer rule allows, in digits.
_MAX_DIGITS = 16

_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def json_schema_grammar(schema: Any) -> str:
    """The GBNF grammar (root rule ``root``) of the JSON texts valid for ``schema``.

    Raises:
        Exception: whatever llama-cpp-python's converter raises for a schema it cannot convert.
    """
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    # The converter is untyped; it is driven through Any.
    class Converter(SchemaConverter):
        def visit(self, node: Any, name: str) -> Any:
            if isinstance(node, dict) and node.get("type") == "integer" and _has_bounds(node):
                rule = name + "-" if name in RESERVED_NAMES else name or "root"
                low, high = _bounds(node)
                add: Any = self._add_rule
                return add(rule, integer_range_rule(low, high) + " space")
            base: Any = super().visit
            return base(node, name)

    make: Any = Converter
    converter = make(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "stdin")
    converter.visit(resolved, "")
    return str(converter.format_grammar())


def _has_bounds(node: dict[str, Any]) -> bool:
    return any(isinstance(node.get(k), (int, float)) for k in _BOUNDS)


def _bounds(node: dict[str, Any]) -> tuple[int | None, int | None]:
    """The inclusive integer bounds a node allows (``None``: unbounded)."""
    low: int | None = None
    high: int | None = None
    for key in ("minimum", "exclusiveMinimum"):
        value = node.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            bound = math.floor(value) + 1 if key.startswith("exclusive") else math.ceil(value)
            low = bound if low is None else max(low, bound)
    for key in ("maximum", "exclusiveMaximum"):
        value = node.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            bound = math.ceil(value) - 1 if key.startswith("exclusive") else math.floor(value)
            high = bound if high is None else min(high, bound)
    limit = 10**_MAX_DIGITS - 1
    if low is not None:
        low = max(low, -limit)
    if high is not None:
        high = min(high, limit)
    return low, high


def integer_range_rule(low: int | None, high: int | None) -> str:
    """A GBNF expression matching exactly the decimal integers in ``[low, high]`` (JSON form:
    no leading zeros, ``-`` for negatives); ``None`` leaves a side open (up to 16 digits)."""
    if low is not None and high is not None and low > high:
        # No integer fits: nothing the model writes can be valid; refuse like the converter.
        raise ValueError(f"integer range [{low}, {high}] is empty")
    alternatives: list[str] = []
    if low is None or low < 0:
        # Negative values: -n for n in [max(1, -high), -low].
        top = None if low is None else -low
        bottom = 1 if high is None or high >= 0 else -high
        if top is None or bottom <= top:
            alternatives += [f'"-" {a}' for a in _natural(bottom, top)]
    if high is None or high >= 0:
        alternatives += _natural(max(0, low if low is not None else 0), high)
    return "(" + " | ".join(alternatives) + ")"


def _natural(low: int, high: int | None) -> list[str]:
    """Alternatives matching the integers in ``[low, high]``, ``0 <= low``."""
    out: list[str] = []
    digits_low = len(str(low))
    digits_high = _MAX_DIGITS if high is None else len(str(high))
    for d in range(digits_low, digits_high + 1):
        a = low if d == digits_low else 10 ** (d - 1)
        b = high if high is not None and d == digits_high else 10**d - 1
        if a <= b:
            out += _same_length(str(a), str(b))
    return out


def _same_length(low: str, high: str) -> list[str]:
    """Alternatives matching the digit strings in ``[low, high]`` (both of one length)."""
    if not low:
        return [""]
    n = len(low) - 1
    rest = " [0-9]" * n
    if low[1:] == "0" * n and high[1:] == "9" * n:
        head = f'"{low[0]}"' if low[0] == high[0] else f"[{low[0]}-{high[0]}]"
        return [head + rest]
    if low[0] == high[0]:
        return [f'"{low[0]}" {r}'.rstrip() for r in _same_length(low[1:], high[1:])]
    out = [f'"{low[0]}" {r}'.rstrip() for r in _same_length(low[1:], "9" * n)]
    if int(high[0]) - int(low[0]) > 1:
        out.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}]" + rest)
    out += [f'"{high[0]}" {r}'.rstrip() for r in _same_length("0" * n, high[1:])]
    return out
