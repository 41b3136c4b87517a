"""A daemon's request socket (ROUTER): the manager's envelope with the daemon's own op table, typed errors back.

The services and the agents serve requests the same way: split the return route from the body, decode the
envelope against the op table, validate the arguments, hand them to the daemon, and answer any typed error (or a
crash, as ``internal``) without the daemon going down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
import zmq

from model_client import protocol
from model_client.errors import InternalError, ModelManagerError

Handler = Callable[[list[bytes], protocol.Request, Any], None]
# What one message to a daemon may hold: text ops (the agents, the TTS service) and audio clips (the STT service).
# Set as the socket's ZMQ_MAXMSGSIZE before it binds (a larger frame disconnects its sender), and checked for the
# whole message here.
MAX_TEXT_MESSAGE_BYTES = protocol.MIB
MAX_CLIP_BYTES = 16 * protocol.MIB
log = structlog.get_logger("daemonkit.request_socket")


class RequestSocket:
    def __init__(self, sock: zmq.Socket, ops: dict[str, type[protocol.OpArgs]], max_message_bytes: int) -> None:
        self.sock = sock
        self.ops = ops
        self.max_message_bytes = max_message_bytes

    def drain(self, handle: Handler) -> None:
        """Serve every request waiting; ``handle(route, request, args)`` answers with ``reply`` (now or later)."""
        while self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            self.serve(self.sock.recv_multipart(), handle)

    def serve(self, frames: list[bytes], handle: Handler) -> None:
        try:
            delimiter = frames.index(b"", 1)
        except ValueError:
            return  # no envelope to answer
        route, body = frames[: delimiter + 1], frames[delimiter + 1 :]
        request_id = None
        too_large = protocol.oversized(frames, self.max_message_bytes)
        if too_large is not None:
            self.reply_error(route, None, too_large)
            return
        try:
            request = protocol.decode_request(body, self.ops)
            request_id = request.id
            handle(route, request, protocol.parse_args(request.op, request.args, self.ops))
        except ModelManagerError as exc:
            self.reply_error(route, exc.request_id or request_id, exc)
        except Exception as exc:  # a bug must not end the daemon
            log.exception("request_crashed", id=request_id)
            self.reply_error(route, request_id, InternalError(f"{type(exc).__name__}: {exc}"))

    def reply(self, route: list[bytes], request_id: str | None, result: Any, payloads: tuple[bytes, ...] = ()) -> None:
        self.sock.send_multipart(route + protocol.encode_result(request_id, result, payloads))

    def reply_error(self, route: list[bytes], request_id: str | None, error: ModelManagerError) -> None:
        self.sock.send_multipart(route + protocol.encode_error(request_id, error))
