"""Manager requests from a daemon's own event loop: send now, get the reply later through a callback.

The services poll many sockets in one thread; a blocking ``ModelClient`` call would stall them while Whisper
works. A ``Dispatcher`` owns one DEALER socket, which the daemon adds to its poller: ``submit`` sends and returns,
``on_readable`` routes chunks and final replies to their callbacks, ``check`` times requests out. It speaks through
the client's ``Connection``, the same Lazy Pirate rules as ``ModelClient``: idempotent ops are sent again on a fresh
socket after a timeout (the manager may be restarting), the others fail with ``timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from model_client import protocol
from model_client.connection import Connection
from model_client.errors import ModelManagerError, Timeout, error_from_wire
from model_client.security import CurveClient

OnChunk = Callable[[dict[str, Any], tuple[bytes, ...]], None]
OnResult = Callable[[dict[str, Any], tuple[bytes, ...]], None]
OnError = Callable[[ModelManagerError], None]


@dataclass
class Pending:
    request: protocol.Request
    on_result: OnResult
    on_error: OnError
    on_chunk: OnChunk | None
    deadline: float
    attempts: int = 1
    sent_at: float = field(default_factory=time.monotonic)


class Dispatcher:
    def __init__(
        self,
        endpoint: str,
        poller: zmq.Poller,
        timeout: float = 60.0,
        retries: int = 3,
        context: zmq.Context | None = None,
        priority: int | None = protocol.PRIORITY_INTERACTIVE,
    ) -> None:
        self.endpoint = endpoint
        self.priority = priority
        self.poller = poller
        self.timeout = timeout
        self.connection = Connection(endpoint, CurveClient.from_env(), context or zmq.Context.instance(), retries)
        self.pending: dict[str, Pending] = {}
        self.sock = self.connection.sock
        self.poller.register(self.sock, zmq.POLLIN)

    def _reopen(self) -> None:
        """A fresh socket, so that replies to requests given up on can never arrive."""
        self.poller.unregister(self.sock)
        self.connection.reset()
        self.sock = self.connection.sock
        self.poller.register(self.sock, zmq.POLLIN)

    def submit(
        self,
        op: str,
        args: dict[str, Any],
        on_result: OnResult,
        on_error: OnError,
        payloads: tuple[bytes, ...] = (),
        on_chunk: OnChunk | None = None,
    ) -> str:
        request = protocol.Request(op=op, args=args, payloads=payloads, priority=self.priority)
        self.pending[request.id] = Pending(request, on_result, on_error, on_chunk, time.monotonic() + self.timeout)
        self.connection.send(request)
        return request.id

    def on_readable(self) -> None:
        while self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                reply = self.connection.recv(zmq.NOBLOCK)
            except ModelManagerError:
                continue
            pending = self.pending.get(reply.id or "")
            if pending is None:
                continue
            pending.deadline = time.monotonic() + self.timeout  # a chunk shows the request is alive
            if not reply.is_final:
                if pending.on_chunk is not None:
                    pending.on_chunk(reply.body, reply.payloads)
                continue
            del self.pending[reply.id]
            if reply.type == protocol.REPLY_ERROR:
                pending.on_error(error_from_wire(reply.body))
            else:
                pending.on_result(reply.body, reply.payloads)

    def check(self, now: float | None = None) -> None:
        """Resend or fail the requests whose reply is overdue."""
        now = time.monotonic() if now is None else now
        late = {rid for rid, p in self.pending.items() if now > p.deadline}
        if not late:
            return
        self._reopen()  # every request still pending is resent on the new socket, or failed
        for pending in list(self.pending.values()):
            request = pending.request
            retry = self.connection.may_resend(request.op, pending.attempts)
            if request.id in late and not retry:
                del self.pending[request.id]
                message = f"no reply from {self.endpoint} within {self.timeout} s"
                pending.on_error(Timeout(message, endpoint=self.endpoint))
                continue
            if request.id in late:
                pending.attempts += 1
            elif request.op not in protocol.IDEMPOTENT_OPS:
                # Its reply would come to the old socket: it is lost with it.
                del self.pending[request.id]
                pending.on_error(Timeout("the connection to the manager was reset", endpoint=self.endpoint))
                continue
            pending.deadline = now + self.timeout
            self.connection.send(request)

    def close(self) -> None:
        self.poller.unregister(self.sock)
        self.connection.close()
