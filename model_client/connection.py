"""One DEALER connection to a daemon, kept the zguide's Lazy Pirate way; the blocking ``ModelClient`` and the
daemons' non-blocking ``Dispatcher`` both speak through it.

A request whose reply is late is given up on by closing the socket (so a late reply can never be taken for the
answer to another request) and sent again on a fresh one: a bounded number of times, and only for the ops that
are safe to repeat (``protocol.IDEMPOTENT_OPS``); any other late request fails with ``timeout``.
"""

from __future__ import annotations

import zmq

from model_client import protocol
from model_client.security import CurveClient, connect_securely


class Connection:
    def __init__(self, endpoint: str, curve: CurveClient | None, context: zmq.Context, retries: int) -> None:
        self.endpoint = endpoint
        self.curve = curve  # used only for a non-local endpoint
        self.ctx = context
        self.retries = retries
        self._sock: zmq.Socket | None = None

    @property
    def sock(self) -> zmq.Socket:
        """The current socket, opened on first use and again after each ``reset``."""
        if self._sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            connect_securely(sock, self.endpoint, self.curve)
            self._sock = sock
        return self._sock

    def reset(self) -> None:
        """Drop the socket and whatever replies were still to come on it."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    close = reset

    def send(self, request: protocol.Request) -> None:
        self.sock.send_multipart([b"", *protocol.encode_request(request)])

    def recv(self, flags: int = 0) -> protocol.Reply:
        """The next reply; raises ``zmq.Again`` (none yet, or past ``rcvtimeo``) or ``BadRequest`` (malformed)."""
        frames = self.sock.recv_multipart(flags)
        return protocol.decode_reply(frames[1:] if frames and frames[0] == b"" else frames)

    def may_resend(self, op: str, attempts: int) -> bool:
        """Whether a request of ``op`` sent ``attempts`` times so far may go once more."""
        return op in protocol.IDEMPOTENT_OPS and attempts <= self.retries
