"""An asyncio link to the manager (the HTTP gateway and the Wyoming service use it): one DEALER per request.

A socket of its own per request makes cancelling free: when a caller goes away (an HTTP client, a Wyoming peer),
its request's generator is closed, the socket with it, and the manager's next chunk for it finds no peer, so the
manager cancels the generation (as it does for any client gone). Requests speak the manager's own envelope
(``model_client.protocol``) and fail with its typed errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import zmq
import zmq.asyncio

from model_client import protocol
from model_client.errors import BadRequest, Timeout, error_from_wire
from model_client.results import Completion, TextChunk, chunk_from, completion_from
from model_client.security import CurveClient, connect_securely


class ManagerLink:
    def __init__(
        self,
        endpoint: str,
        timeout_s: float,
        curve: CurveClient | None = None,
        connect_timeout_s: float = 2.0,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
        priority: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.priority = priority  # every request's (None: the manager's default); 80 and up: a voice request
        # The manager's limit: ZeroMQ drops a larger message unanswered, so it is refused here, at once.
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.curve = curve or CurveClient.from_env()
        self.ctx = zmq.asyncio.Context()

    async def replies(
        self, op: str, args: dict[str, Any], timeout_s: float | None = None, payloads: tuple[bytes, ...] = ()
    ) -> AsyncIterator[protocol.Reply]:
        """The request's chunks, then its final result; a typed error is raised. Closing the iterator early (the
        caller left) closes the socket, which cancels the request in the manager. A manager that cannot be reached
        fails the request within ``connect_timeout_s`` (the socket queues only to a connected peer), not after
        ``timeout_s``."""
        timeout_s = timeout_s or self.timeout_s
        deadline_ms = round(timeout_s * 1000, 1)
        request = protocol.Request(op=op, args=args, payloads=payloads, deadline_ms=deadline_ms, priority=self.priority)
        frames = protocol.encode_request(request)
        if (too_large := protocol.oversized([b"", *frames], self.max_message_bytes)) is not None:
            raise too_large
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        try:
            connect_securely(sock, self.endpoint, self.curve)
            if not await sock.poll(self.connect_timeout_s * 1000, zmq.POLLOUT):
                raise Timeout(
                    f"the model manager at {self.endpoint} is not reachable (no connection within "
                    f"{self.connect_timeout_s} s): is it running?",
                    endpoint=self.endpoint,
                    reason="unreachable",
                )
            await sock.send_multipart([b"", *frames])
            while True:
                try:
                    async with asyncio.timeout(timeout_s):
                        frames = await sock.recv_multipart()
                except TimeoutError:
                    raise Timeout(
                        f"no reply from the model manager within {timeout_s} s", endpoint=self.endpoint
                    ) from None
                try:
                    reply = protocol.decode_reply(frames[1:] if frames and frames[0] == b"" else frames)
                except BadRequest:
                    continue
                if reply.id not in (request.id, None):
                    continue
                if reply.type == protocol.REPLY_ERROR:
                    raise error_from_wire(reply.body)
                yield reply
                if reply.is_final:
                    return
        finally:
            sock.close(linger=0)

    async def request(
        self, op: str, args: dict[str, Any], timeout_s: float | None = None, payloads: tuple[bytes, ...] = ()
    ) -> Any:
        """One request's final result."""
        return (await self.final(op, args, timeout_s, payloads)).body

    async def final(
        self, op: str, args: dict[str, Any], timeout_s: float | None = None, payloads: tuple[bytes, ...] = ()
    ) -> protocol.Reply:
        """One request's final reply, binary payloads included (audio)."""
        async for reply in self.replies(op, args, timeout_s, payloads):
            if reply.is_final:
                return reply
        raise Timeout("the model manager ended the reply without a result", endpoint=self.endpoint)

    async def generation(
        self, op: str, args: dict[str, Any], timeout_s: float | None = None
    ) -> AsyncIterator[TextChunk | Completion]:
        """A streamed chat or completion (``args`` with ``stream: true``): its pieces, then its ``Completion``, each
        decoded once, here. Closing it early cancels the generation, as with ``replies``."""
        async with aclosing(self.replies(op, args, timeout_s)) as replies:
            async for reply in replies:
                yield completion_from(reply.body) if reply.is_final else chunk_from(reply.body)

    async def completion(self, op: str, args: dict[str, Any], timeout_s: float | None = None) -> Completion:
        """A generation's ``Completion`` (streamed from the manager all the same when ``args`` say so)."""
        async with aclosing(self.generation(op, args, timeout_s)) as items:
            async for item in items:
                if isinstance(item, Completion):
                    return item
        raise Timeout("the model manager ended the reply without a result", endpoint=self.endpoint)

    async def events(self, endpoint: str, topics: tuple[str, ...]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The manager's events of ``topics`` (prefixes) from its PUB socket at ``endpoint`` (``status`` names it),
        through one SUB socket that lives as long as the iterator: a watcher that leaves closes it."""
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            connect_securely(sock, endpoint, self.curve)
            for topic in topics:
                sock.subscribe(topic)
            while True:
                frames = await sock.recv_multipart()
                try:
                    yield protocol.decode_event(frames)
                except (ValueError, IndexError, UnicodeDecodeError, BadRequest):
                    continue  # not an event of this protocol: skipped
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self.ctx.destroy(linger=0)
