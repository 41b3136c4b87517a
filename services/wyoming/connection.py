"""One peer's connection, whatever the port: events in (bounded), events out (with a write timeout), typed
errors as Wyoming ``error`` events. The port's handler decides what each event means."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import structlog
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import Describe

from model_client.errors import ModelManagerError
from services.wyoming.events import EventRefused, check_event
from services.wyoming.framing import FramingError, read_event

WRITE_TIMEOUT_S = 30.0  # a peer that stops reading this long is dropped (its buffers are bounded by drain)

log = structlog.get_logger("wyoming")


class Peer:
    """Writing to the peer. Each event is written whole before the next (no await between its parts)."""

    def __init__(self, writer: asyncio.StreamWriter, port: str) -> None:
        self.writer = writer
        self.port = port

    async def send(self, event: Event) -> None:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await async_write_event(event, self.writer)

    async def error(self, text: str, code: str) -> None:
        log.warning("wyoming_error_sent", port=self.port, code=code, text=text)
        await self.send(Error(text=text, code=code).event())

    async def failed(self, exc: ModelManagerError) -> None:
        await self.error(exc.message, exc.code)


class Handler(Protocol):
    async def on_event(self, event: Event) -> bool:
        """Handle one event; False ends the connection."""

    async def close(self) -> None:
        """The connection is ending: stop what still runs for it."""


async def serve_connection(
    reader: asyncio.StreamReader,
    peer: Peer,
    handler: Handler,
    describe: Callable[[], Event],
    max_event_bytes: int,
    idle_timeout_s: float,
) -> None:
    try:
        while True:
            try:
                async with asyncio.timeout(idle_timeout_s):
                    event = await read_event(reader, max_event_bytes)
            except FramingError as exc:
                await peer.error(str(exc), "bad_event")
                return
            if event is None:
                return
            if Describe.is_type(event.type):
                await peer.send(describe())
                continue
            try:
                check_event(event)
            except EventRefused as exc:
                await peer.error(str(exc), "bad_event")
                continue
            try:
                if not await handler.on_event(event):
                    return
            except (KeyError, TypeError, ValueError, AttributeError):  # a value no schema foresaw: said in words
                log.warning("wyoming_event_unreadable", port=peer.port, type=event.type)
                await peer.error(f"{event.type}: a field is missing or of the wrong kind", "bad_event")
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        await handler.close()
