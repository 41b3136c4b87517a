"""Wyoming's framing, read with limits: a JSON header line, then ``data_length`` bytes of JSON data and
``payload_length`` bytes of payload. The ``wyoming`` package's own reader trusts the declared lengths (a peer
declaring 4 GB gets 4 GB buffered); this one refuses anything over ``max_bytes`` before reading it, and checks the
types, so whatever a peer sends ends in an event or a ``FramingError``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from wyoming.event import Event

from daemonkit.json_limits import field_path, first_violation

MAX_DEPTH = 32  # Wyoming's events nest two or three levels


class FramingError(ValueError):
    """The stream is not Wyoming (or breaks a limit); the connection cannot be read further."""


def _length(header: dict[str, Any], key: str, max_bytes: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FramingError(f"{key} must be a non-negative integer, not {value!r}")
    if value > max_bytes:
        raise FramingError(f"{key} {value} is over this service's limit of {max_bytes} bytes")
    return value


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except RecursionError:
        raise FramingError(f"the {what} is nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise FramingError(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise FramingError(f"the {what} must be a JSON object, not {type(value).__name__}")
    found = first_violation(value, MAX_DEPTH)
    if found is not None:
        kind, path = found
        problem = f"nested deeper than {MAX_DEPTH} levels" if kind == "too_deep" else "an integer out of range"
        raise FramingError(f"the {what} is {problem} (at {field_path(path[:MAX_DEPTH])})")
    return value


async def read_event(reader: asyncio.StreamReader, max_bytes: int) -> Event | None:
    """The next event, or None at the end of the stream. The reader's own limit bounds the header line."""
    try:
        line = await reader.readline()
    except ValueError:  # asyncio's LimitOverrunError, re-raised by readline as ValueError
        raise FramingError(f"an event header is longer than {reader._limit} bytes") from None  # noqa: SLF001
    if not line:
        return None
    if not line.endswith(b"\n"):
        return None  # the peer closed mid-header
    header = _json_object(line, "event header")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise FramingError("the event header has no type")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise FramingError("the event's data must be a JSON object")
    data_length = _length(header, "data_length", max_bytes)
    payload_length = _length(header, "payload_length", max_bytes)
    try:
        if data_length:
            data = {**data, **_json_object(await reader.readexactly(data_length), "event data")}
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None  # the peer closed mid-event
    return Event(type=kind, data=data, payload=payload)
