"""A request body read once, checked, then typed: JSON nested no deeper than ``MAX_DEPTH`` and integers that fit
in 64 bits (what msgpack carries to the manager), each refused with a 400 naming the field, before msgspec types
the body (a wrong type is a 400 naming the field too)."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from starlette.requests import Request

from daemonkit.json_limits import INT_MAX, INT_MIN, field_path, first_violation
from gateway.errors import HttpError

T = TypeVar("T")
MAX_DEPTH = 64  # JSON schemas and tool arguments nest a handful of levels; msgpack's own limit is 512


def check_shape(value: Any) -> None:
    """A 400 naming the first field nested deeper than ``MAX_DEPTH`` (the top-level field it is under) or holding an
    integer msgpack cannot carry."""
    found = first_violation(value, MAX_DEPTH)
    if found is None:
        return
    kind, path = found
    if kind == "too_deep":
        field = field_path(path[:1])
        raise HttpError(400, f"{field} is nested deeper than {MAX_DEPTH} levels", field[2:] or None, "too_deep")
    field = field_path(path)
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
