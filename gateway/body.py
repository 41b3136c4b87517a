"""A request body read once, checked, then typed: JSON nested no deeper than ``MAX_DEPTH`` and integers that fit
in 64 bits (what msgpack carries to the manager), each refused with a 400 naming the field, before msgspec types
the body (a wrong type is a 400 naming the field too)."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from starlette.requests import Request

from gateway.errors import HttpError

T = TypeVar("T")
MAX_DEPTH = 64  # JSON schemas and tool arguments nest a handful of levels; msgpack's own limit is 512
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # msgpack's integers: int64 and uint64


def _path(parts: list[str | int]) -> str:
    text = "$"
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def check_shape(value: Any) -> None:
    """Raise a 400 naming the first field nested deeper than ``MAX_DEPTH`` or holding an integer msgpack cannot
    carry. Iterative: a hostile depth does not reach Python's recursion limit."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            field = _path(path[:1]) if path else "$"
            raise HttpError(400, f"{field} is nested deeper than {MAX_DEPTH} levels", field[2:] or None, "too_deep")
        if isinstance(item, dict):
            stack.extend((v, [*path, str(k)]) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, [*path, i]) for i, v in enumerate(item))
        elif isinstance(item, int) and not isinstance(item, bool) and not INT_MIN <= item <= INT_MAX:
            field = _path(path)
            raise HttpError(400, f"{field} is out of range ({INT_MIN} to {INT_MAX})", field[2:] or None, "out_of_range")


def parse(raw: bytes, kind: type[T]) -> T:
    try:
        value = msgspec.json.decode(raw)
    except RecursionError:
        raise HttpError(400, f"the body is nested deeper than {MAX_DEPTH} levels", None, "too_deep") from None
    except msgspec.DecodeError as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}", None, "invalid_json") from None
    check_shape(value)
    try:
        return msgspec.convert(value, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        param = message.rsplit("`$.", 1)[1].rstrip("`") if "`$." in message else None
        raise HttpError(400, message, param, "invalid_value") from None


async def decode(request: Request, kind: type[T]) -> T:
    """The request's JSON body as ``kind``."""
    return parse(await request.body(), kind)


def refuse_unserved(body: Any, *names: str) -> None:
    """A 400 naming the first of ``names`` the client set to something other than its off value (null, false, "",
    0, or 1 for ``best_of``): parameters this gateway does not honour and will not silently ignore."""
    for name in names:
        value = getattr(body, name, None)
        if value is None or value is False or (isinstance(value, str | list | dict) and not value):
            continue
        if not isinstance(value, bool) and isinstance(value, int) and value <= (1 if name == "best_of" else 0):
            continue
        raise HttpError(400, f"{name} is not served by this gateway", name, "unsupported_parameter")
