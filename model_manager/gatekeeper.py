"""Who may complete a ZeroMQ handshake with the manager: the ZAP handler (RFC 27), run in the manager's loop.

The workers socket sits beside the requests socket, so any local process could reach it. Each worker the manager
starts gets a secret of its own (in its environment) and presents it as PLAIN credentials; a peer without one never
completes the handshake, so it can send nothing at all. Remote clients on CURVE endpoints are admitted by their
public key, as before. Every handshake that fails on the workers socket is counted (a wrong secret, no secret, or
bytes that are not ZeroMQ at all), and so is every CURVE client refused.
"""

from __future__ import annotations

import hmac
import secrets
from collections import Counter
from pathlib import Path

import structlog
import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
WORKERS_DOMAIN = b"mm-workers"
SECRET_ENV = "MM_WORKER_SECRET"
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

log = structlog.get_logger("model_manager.gatekeeper")


def new_secret() -> str:
    return secrets.token_urlsafe(24)


class Gatekeeper:
    """Answer ZAP requests: register ``sock`` for POLLIN and call ``on_readable``; likewise ``monitor`` (once
    ``watch_workers`` made it) with ``on_monitor_readable``."""

    def __init__(self, ctx: zmq.Context, curve_authorized_dir: Path | None = None) -> None:
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.workers: dict[bytes, bytes] = {}  # worker id -> its secret
        self.curve_keys: set[bytes] = set()  # z85, as the key files hold them
        if curve_authorized_dir is not None:
            self.curve_keys = set(zmq.auth.load_certificates(str(curve_authorized_dir)))
        self.refused: Counter[str] = Counter()
        self.monitor: zmq.Socket | None = None

    def watch_workers(self, workers: zmq.Socket) -> zmq.Socket:
        """Count the handshakes that fail on the workers socket; returns the monitor socket to poll."""
        self.monitor = workers.get_monitor_socket(HANDSHAKE_FAILED)
        return self.monitor

    def on_monitor_readable(self) -> None:
        assert self.monitor is not None
        while self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
            event = parse_monitor_message(self.monitor.recv_multipart())
            self.refused["workers"] += 1
            log.warning("worker_handshake_failed", failure=zmq.Event(event["event"]).name, detail=event["value"])

    def admit_worker(self, worker_id: str, secret: str) -> None:
        self.workers[worker_id.encode()] = secret.encode()

    def forget_worker(self, worker_id: str) -> None:
        self.workers.pop(worker_id.encode(), None)

    def on_readable(self) -> None:
        while self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            request = self.sock.recv_multipart()
            if len(request) < 6:  # only libzmq itself talks on this inproc endpoint; still, never crash on it
                self.sock.send_multipart([b"1.0", b"", b"500", b"malformed ZAP request", b"", b""])
                continue
            version, request_id, domain, _address, _identity, mechanism, *credentials = request
            allowed = self._allowed(domain, mechanism, credentials)
            if not allowed and domain != WORKERS_DOMAIN:  # the monitor counts the workers socket's failures
                self.refused["curve"] += 1
                log.warning("client_handshake_refused", mechanism=mechanism.decode("ascii", "replace"))
            code, text = (b"200", b"OK") if allowed else (b"400", b"not allowed")
            self.sock.send_multipart([version, request_id, code, text, self._user_id(mechanism, credentials), b""])

    def _allowed(self, domain: bytes, mechanism: bytes, credentials: list[bytes]) -> bool:
        if mechanism == b"PLAIN" and domain == WORKERS_DOMAIN and len(credentials) == 2:
            username, password = credentials
            expected = self.workers.get(username)
            return expected is not None and hmac.compare_digest(expected, password)
        if mechanism == b"CURVE" and domain != WORKERS_DOMAIN and len(credentials) == 1:
            return z85.encode(credentials[0]) in self.curve_keys
        return False

    @staticmethod
    def _user_id(mechanism: bytes, credentials: list[bytes]) -> bytes:
        """Every message of the peer carries this as its ``User-Id`` property: a CURVE client's public key (z85),
        a worker's id."""
        if mechanism == b"CURVE" and len(credentials) == 1:
            return z85.encode(credentials[0])
        return credentials[0] if mechanism == b"PLAIN" and credentials else b""

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close(linger=0)
        self.sock.close(linger=0)
