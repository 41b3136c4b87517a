"""Limits on JSON a peer sends, checked on the decoded value without recursion (a hostile depth never reaches
Python's recursion limit): how deep it nests, and integers that msgpack (the manager's wire) can carry."""

from __future__ import annotations

from typing import Any

INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # msgpack's integers: int64 and uint64


def field_path(parts: list[str | int]) -> str:
    """``$.a.b[2]``, as msgspec names a field in its errors."""
    text = "$"
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def first_violation(value: Any, max_depth: int) -> tuple[str, list[str | int]] | None:
    """("too_deep" or "out_of_range", the path to it) for the first value that breaks a limit; None if none does."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > max_depth:
            return "too_deep", path
        if isinstance(item, dict):
            stack.extend((v, [*path, str(k)]) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, [*path, i]) for i, v in enumerate(item))
        elif isinstance(item, int) and not isinstance(item, bool) and not INT_MIN <= item <= INT_MAX:
            return "out_of_range", path
    return None
