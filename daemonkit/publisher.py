"""A daemon's bound event socket, kept small whatever its subscribers send.

A PUB socket keeps every subscription it is sent in a trie, one node per byte, and walks that trie each time a
subscriber leaves: one subscriber with a 1 MiB topic, or with a million distinct ones, would grow the daemon by
hundreds of MiB and stall its loop. So the socket is an XPUB that caps the size of what a peer may send (a
subscription is a short topic; a larger message disconnects the peer) and reads every subscribe and unsubscribe
(XPUB_VERBOSER) to count the subscriptions it holds. ZeroMQ cannot tell which peer sent a subscription, nor drop
one peer of a bound socket, so past ``max_subscriptions`` the socket is closed and bound again: every subscriber
is dropped, and ZeroMQ's SUB sockets reconnect and subscribe again by themselves within seconds.

A daemon's heartbeat goes out here too: every ``every_s`` seconds, and at once whenever a subscription that covers
its topic arrives, so a new subscriber learns without guessing that its subscription is in place (ZeroMQ's "slow
joiner": what is published before that is not delivered to it).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from model_client import protocol

# ZMTP 3.1 sends a subscription as a SUBSCRIBE command: 10 bytes of command name around the topic.
MAX_SUBSCRIPTION_BYTES = 128
MAX_SUBSCRIPTIONS = 1024
REBIND_WAIT_MS = 1000
HEARTBEAT_S = 5.0

log = structlog.get_logger("daemonkit.publisher")


@dataclass
class Heartbeat:
    topic: str
    body: Callable[[], dict[str, Any]]  # the event's fields, asked for each beat
    every_s: float


def _give_back_freed_memory() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise), so dropped tries leave no RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class EventPublisher:
    """Publish with ``send_multipart``; register ``sock`` for POLLIN in the daemon's poller and call ``on_readable``."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        bind: Callable[[zmq.Socket, str], None],
        poller: zmq.Poller,
        max_subscriptions: int = MAX_SUBSCRIPTIONS,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self._bind = bind
        self.poller = poller
        self.max_subscriptions = max_subscriptions
        self.subscriptions = 0
        self.resets = 0
        self.heartbeat = heartbeat
        self._next_beat = 0.0
        self.sock = self._open()

    def _open(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe is read, so the count is exact
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        self._bind(sock, self.endpoint)
        self.poller.register(sock, zmq.POLLIN)
        return sock

    def send_multipart(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def on_readable(self) -> None:
        """Count what subscribers sent; rebind when they hold too many subscriptions; greet a new subscriber of
        the heartbeat with one."""
        greet = False
        for _ in range(4 * self.max_subscriptions):
            try:
                message = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if message[:1] == b"\x01":
                self.subscriptions += 1
                greet = greet or (self.heartbeat is not None and self.heartbeat.topic.encode().startswith(message[1:]))
            elif message[:1] == b"\x00":
                self.subscriptions = max(0, self.subscriptions - 1)
        if self.subscriptions > self.max_subscriptions:
            self.reset()
        elif greet:
            self.beat()

    def tick(self, now: float) -> None:
        """Call from the daemon's loop: the heartbeat goes out when it is due."""
        if self.heartbeat is not None and now >= self._next_beat:
            self.beat()

    def beat(self) -> None:
        assert self.heartbeat is not None
        self._next_beat = time.monotonic() + self.heartbeat.every_s
        body = self.heartbeat.body()
        self.send_multipart(protocol.encode_event(self.heartbeat.topic, body, time.time()))

    def reset(self) -> None:
        """Drop every subscriber: close the socket once its listener is gone (an ipc listener unlinks its file
        when it closes, so binding again before that would lose the new file), then bind a fresh one."""
        log.warning("subscribers_dropped", endpoint=self.endpoint, subscriptions=self.subscriptions)
        self.poller.unregister(self.sock)
        monitor = self.sock.get_monitor_socket(zmq.EVENT_CLOSED)
        try:
            self.sock.unbind(self.endpoint)
            if monitor.poll(REBIND_WAIT_MS):
                recv_monitor_message(monitor)
        finally:
            self.sock.disable_monitor()
            monitor.close(linger=0)
            self.sock.close(linger=0)
        self.subscriptions = 0
        self.resets += 1
        _give_back_freed_memory()
        self.sock = self._open()

    def close(self) -> None:
        self.poller.unregister(self.sock)
        self.sock.close(linger=0)
