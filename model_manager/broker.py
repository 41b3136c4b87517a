"""The ModelManagerAgent's broker: its sockets, its one loop, message framing, replies, events and shutdown.

Clients talk to a ROUTER socket (REQ and DEALER clients both work); workers talk to a second ROUTER socket,
one DEALER each (the zguide's load-balancing broker shape). The loop never waits on a model: a client's request
goes through ``ops`` (argument checks) to ``lifecycle`` (queues, loads, worker events), whose timers ``policy``
decides; the broker only moves frames and keeps the clock.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
import zmq

from daemonkit.binding import check_endpoint, load_server, prepare_ipc_dir, remove_ipc_file, serve_securely
from daemonkit.publisher import EventPublisher, Heartbeat
from model_client import protocol
from model_client.errors import BadRequest, Busy, InternalError, ModelManagerError
from model_manager import status
from model_manager import worker_protocol as wire
from model_manager.config import Config, ModelSpec
from model_manager.footprint import GgufFacts
from model_manager.gatekeeper import WORKERS_DOMAIN, Gatekeeper
from model_manager.lifecycle import Lifecycle
from model_manager.live_catalogue import LiveCatalogue
from model_manager.memory import MemoryAccounting
from model_manager.metrics import ManagerMetrics
from model_manager.ops import Ops
from model_manager.pool import WorkerPool
from model_manager.pulls.tracker import Pulls
from model_manager.ratelimit import RateLimiter

VERSION = "0.1.0"
TICK_S = 0.05
SHUTDOWN_GRACE_S = 5.0
SHUTDOWN_SLACK_S = 3.0  # beyond the requests' grace and the workers' exit time: sockets, files, the log
SHEDDABLE_OPS = frozenset({"chat", "complete", "embed", "transcribe", "synthesize", "conversation.drop"})

log = structlog.get_logger("model_manager")


def _peer_property(frame: zmq.Frame, name: str) -> str | None:
    """What the peer's ZeroMQ handshake said of it: ``Socket-Type`` (REQ, DEALER, ...), ``User-Id`` (a CURVE
    client's public key, set by the gatekeeper)."""
    try:
        return frame.get(name) or None
    except (zmq.ZMQError, KeyError):
        return None


@dataclass
class _Handling:
    """The client message being handled: where an answer would go, and whether one went."""

    route: list[bytes]
    request_id: str | None = None
    answered: bool = False


class ModelManagerAgent:
    def __init__(self, config: Config, config_path: str = "") -> None:
        self.config = config
        self.config_path = config_path
        self.started_at = time.time()
        self.stopping = False
        self.ctx = zmq.Context()
        endpoints = config.endpoints
        self.curve = load_server(config.security.curve_server_secret_key, config.security.curve_authorized_keys)
        check_endpoint(endpoints.requests, self.curve, "endpoints.requests")
        check_endpoint(endpoints.events, self.curve, "endpoints.events")
        check_endpoint(endpoints.workers, None, "endpoints.workers: the manager's own workers, always local")
        for endpoint in (endpoints.requests, endpoints.events, endpoints.workers):
            prepare_ipc_dir(endpoint)
        self.poller = zmq.Poller()
        # Before any socket binds: it answers their handshakes (the workers' secrets, CURVE clients' keys).
        self.gatekeeper = Gatekeeper(self.ctx, self.curve.authorized_dir if self.curve else None)
        self.poller.register(self.gatekeeper.sock, zmq.POLLIN)
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        # A reply to a client that has gone raises EHOSTUNREACH instead of vanishing: that is how a streaming
        # request whose client died is noticed and cancelled.
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.SNDHWM, 100_000)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, config.limits.max_message_bytes)
        serve_securely(self.frontend, endpoints.requests, self.curve)
        self.events = EventPublisher(
            self.ctx,
            endpoints.events,
            lambda sock, endpoint: serve_securely(sock, endpoint, self.curve),
            self.poller,
            heartbeat=Heartbeat(protocol.EVENT_HEARTBEAT, self._heartbeat, config.manager.heartbeat_s),
        )
        self.backend = self.ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 1000)
        self.backend.plain_server = True
        self.backend.zap_domain = WORKERS_DOMAIN
        self.poller.register(self.gatekeeper.watch_workers(self.backend), zmq.POLLIN)
        self.backend.bind(endpoints.workers)
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        self.pool = WorkerPool(
            self.backend, endpoints.workers, config.manager.spare_workers, self.poller, self.gatekeeper
        )
        self.memory = MemoryAccounting(config, self.pool)
        self.metrics = ManagerMetrics(config.metrics)
        self.lifecycle = Lifecycle(config, self.pool, self.memory, self.metrics, self)
        self.slots = self.lifecycle.slots
        self.catalogue = LiveCatalogue(config, self.lifecycle, self)
        self.pulls = Pulls(config, self, self._fit, self.catalogue, self._watch_fd)
        self.pulls.gpus = any(device.kind == "gpu" for device in self.memory.devices())
        self.ops = Ops(config, self.lifecycle, self, self.status, self.catalogue, self.pulls)
        self._reload_asked = False
        self._shed_at: dict[str, float] = {}  # when each model's last request.shed event went out
        self._shed_counts: Counter[str] = Counter()  # refusals since then
        self.rejected: Counter[str] = Counter()  # requests refused before any op ran, by reason
        self._handling: _Handling | None = None  # the client message being handled, while it is
        self.rate = RateLimiter(config.limits.requests_per_second, config.limits.burst)
        self.metrics.start()
        self._next_metrics = 0.0
        self._next_tick = 0.0

    def tcp_ports(self) -> dict[str, int]:
        """The ports the request and event sockets listen on, where they are TCP (``tcp://HOST:*``: any free one)."""
        ports = {}
        for name, sock in (("requests", self.frontend), ("events", self.events.sock)):
            endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
            if endpoint.startswith("tcp://"):
                ports[name] = int(endpoint.rsplit(":", 1)[1])
        return ports

    # ----- the loop -------------------------------------------------------------------------------------------

    def _fit(self, spec: ModelSpec, facts: GgufFacts | None, size: int | None) -> dict[str, Any]:
        return self.memory.fit(spec, list(self.slots.values()), time.monotonic(), facts, size)

    def _watch_fd(self, fd: int, watch: bool) -> None:
        if watch:
            self.poller.register(fd, zmq.POLLIN)
        else:
            self.poller.unregister(fd)

    def _ask_reload(self, _signum: int, _frame: Any) -> None:
        self._reload_asked = True  # taken in the loop: a signal handler changes nothing itself

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGHUP, self._ask_reload)
        self.catalogue.reload()
        log.info(
            "manager_started",
            pid=os.getpid(),
            requests=self.config.endpoints.requests,
            events=self.config.endpoints.events,
            models=list(self.slots),
            config=self.config_path,
            devices=self.memory.inventory.mode,
        )
        self.lifecycle.start()
        shutdown_deadline: float | None = None
        while True:
            ready = dict(self.poller.poll(TICK_S * 1000))
            if self.gatekeeper.sock in ready:
                self.gatekeeper.on_readable()
            if self.gatekeeper.monitor in ready:
                self.gatekeeper.on_monitor_readable()
            if self.backend in ready:
                self._drain(self.backend, self._on_worker_message)
            if self.frontend in ready:
                self._drain(self.frontend, self._on_client_message, copy=False)
            if self.events.sock in ready:
                self.events.on_readable()
            exited = False
            for fd in [fd for fd in ready if isinstance(fd, int)]:
                if fd in self.pulls.by_fd:
                    self.pulls.on_readable(fd)  # a pull's progress
                else:
                    exited = True  # a worker's pidfd: it has exited
            if exited:
                self.lifecycle.reap()
            now = time.monotonic()
            if now >= self._next_tick:
                self._next_tick = now + TICK_S
                self._housekeeping(now)
            if self.stopping:
                shutdown_deadline = shutdown_deadline or now + SHUTDOWN_GRACE_S
                if now > shutdown_deadline or not self.lifecycle.busy:
                    break
        self._shutdown()

    def _request_stop(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info("manager_stopping", signal=signal.Signals(signum).name)
            # A bound on the whole shutdown, kept by a thread of faulthandler's own: should anything hang past the
            # requests' grace and the workers' exit time, every thread's stack goes to the log and the process
            # ends (its workers with it: they die with their parent).
            faulthandler.dump_traceback_later(self.shutdown_bound_s, exit=True)
        self.stopping = self.lifecycle.stopping = True

    @property
    def shutdown_bound_s(self) -> float:
        return SHUTDOWN_GRACE_S + self.config.manager.unload_timeout_s + SHUTDOWN_SLACK_S

    @staticmethod
    def _drain(sock: zmq.Socket, handle: Callable[[list[Any]], None], limit: int = 256, copy: bool = True) -> None:
        """Handle the messages waiting on ``sock``; asking EVENTS is cheaper than a failing NOBLOCK recv."""
        for _ in range(limit):
            handle(sock.recv_multipart(copy=copy))
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                return

    def _housekeeping(self, now: float) -> None:
        self.lifecycle.tick(now)
        if self._reload_asked:
            self._reload_asked = False
            self.catalogue.reload()
        self.catalogue.tick(now)
        if self.metrics.url is not None and now >= self._next_metrics:
            self._next_metrics = now + 1.0
            slots = list(self.slots.values())
            self.metrics.refresh(slots, self.memory.views(slots))
        self.events.tick(now)

    def _shutdown(self) -> None:
        self.pulls.shutdown()
        self.lifecycle.shutdown()
        self.memory.close()
        self.metrics.close()
        self.events.close()
        self.backend.disable_monitor()
        self.gatekeeper.close()
        for sock in (self.frontend, self.backend):
            sock.close(linger=0)
        self.ctx.term()
        endpoints = self.config.endpoints
        for endpoint in (endpoints.requests, endpoints.events, endpoints.workers):
            remove_ipc_file(endpoint)
        log.info("manager_stopped")

    # ----- the outbox: replies and events ---------------------------------------------------------------------

    def send(self, route: list[bytes], frames: list[bytes]) -> bool:
        """Send to a client; False when it is gone (or not reading), so the message could not go."""
        if self._handling is not None and route[:1] == self._handling.route[:1]:
            self._handling.answered = True
        try:
            self.frontend.send_multipart(route + frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            log.warning("client_not_reading", identity=route[0].hex() if route else None)
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise

    def _reply_error(self, route: list[bytes], request_id: str | None, error: ModelManagerError) -> None:
        self.send(route, protocol.encode_error(request_id, error))

    def publish(self, topic: str, **body: Any) -> None:
        self.events.send_multipart(protocol.encode_event(topic, body, time.time()))

    # ----- framing --------------------------------------------------------------------------------------------

    def _on_client_message(self, message: list[zmq.Frame]) -> None:
        """One client message, behind a last guard: a fault anywhere in its handling, answering an error included,
        is logged and answered ``internal`` if nothing was sent to the peer yet; the loop, and every other client,
        goes on."""
        self._handling = _Handling(route=[message[0].bytes, b""] if message else [])
        try:
            self._handle_client_message(message)
        except Exception as exc:  # noqa: BLE001 - the daemon outlives any one message
            self.rejected["crashed"] += 1
            handling = self._handling
            log.exception("client_message_crashed", id=handling.request_id, answered=handling.answered)
            if not handling.answered and handling.route:
                try:
                    self._reply_error(handling.route, handling.request_id, InternalError(f"{type(exc).__name__}"))
                except Exception:  # noqa: BLE001 - not even the apology could go: the peer gets nothing
                    log.exception("client_message_unanswered", id=handling.request_id)
        finally:
            self._handling = None

    def _handle_client_message(self, message: list[zmq.Frame]) -> None:
        """Framing first (the whole message's size, its frame count, the delimiter), then the envelope, the rate
        limit, the op's arguments; any failure is a typed error back to the peer's route."""
        frames = [frame.bytes for frame in message]
        try:
            delimiter = frames.index(b"", 1)
        except ValueError:
            self.rejected["no_delimiter"] += 1
            self._reply_error(frames[:1] + [b""], None, BadRequest("missing the empty delimiter frame"))
            return
        route, body = frames[: delimiter + 1], frames[delimiter + 1 :]
        assert self._handling is not None
        self._handling.route = route
        too_large = protocol.oversized(frames, self.config.limits.max_message_bytes)
        if too_large is not None:
            self.rejected["too_large"] += 1
            self._reply_error(route, None, too_large)
            return
        # Remote (CURVE) clients are rate limited by their key, so reconnecting does not refill their bucket; local
        # ones, by connection, only when the YAML asks for it (a busy local agent or a benchmark is no stranger).
        user = _peer_property(message[-1], "User-Id")
        limited = user is not None or self.config.limits.rate_limit_local
        allowed = not limited or self.rate.allow(user.encode() if user else route[0], time.monotonic())
        try:
            request = protocol.decode_request(body)
            self._handling.request_id = request.id
            if not allowed:
                self.metrics.rate_limited.inc()
                limit = self.config.limits.requests_per_second
                busy = Busy(f"over {limit:g} requests per second from this client", rate=limit)
                busy.request_id = request.id
                raise busy
        except ModelManagerError as exc:
            log.info("request_rejected", id=exc.request_id, code=exc.code, message=exc.message)
            self.metrics.requests.labels("-", "-", exc.code).inc()
            self._reply_error(route, exc.request_id, exc)
            return
        try:
            args = protocol.parse_args(request.op, request.args)
            if getattr(args, "stream", False) and _peer_property(message[-1], "Socket-Type") == "REQ":
                raise BadRequest("stream needs a DEALER socket: a REQ socket takes exactly one reply per request")
            self.ops.run(route, request, args)
        except ModelManagerError as exc:
            log.info("request_failed", id=request.id, op=request.op, code=exc.code, message=exc.message)
            model = request.args.get("model") or request.args.get("voice")
            model = model if isinstance(model, str) and model in self.slots else "-"  # no label from strangers
            self.metrics.requests.labels(request.op, model, exc.code).inc()
            self._reply_error(route, request.id, exc)
            if isinstance(exc, Busy) and model != "-" and request.op in SHEDDABLE_OPS:
                self._shed(model, request.op, exc)
        except Exception as exc:  # a bug here must not take the daemon down with it
            log.exception("request_crashed", id=request.id, op=request.op)
            self._reply_error(route, request.id, InternalError(f"{type(exc).__name__}: {exc}"))

    def _shed(self, model: str, op: str, exc: Busy) -> None:
        """Say on the event stream why requests for ``model`` are refused: at most once a second per model (a
        flood of refusals makes one event a second, with how many were refused since the last)."""
        now = time.monotonic()
        self._shed_counts[model] += 1
        if now - self._shed_at.get(model, 0.0) < 1.0:
            return
        self._shed_at[model] = now
        count, self._shed_counts[model] = self._shed_counts[model], 0
        body = {**exc.details, "model": model, "op": op, "reason": exc.message, "refused": count}
        self.publish(protocol.EVENT_REQUEST_SHED, **body)

    def _on_worker_message(self, frames: list[bytes]) -> None:
        """Only workers this manager started get past the handshake; what one sends is still checked, since a
        worker runs engines on untrusted input."""
        handle = self.pool.by_id.get(frames[0].decode("utf-8", "replace"))
        if handle is None or len(frames) != 2:
            log.warning("worker_message_dropped", worker=frames[0].hex(), frames=len(frames))
            return
        try:
            message = wire.decode_from_worker(frames[1])
        except msgspec.DecodeError as exc:
            log.error("worker_message_malformed", worker=handle.id, error=str(exc))
            return
        try:
            self.lifecycle.on_worker_message(handle, message)
        except Exception:  # a bug, or a worker saying what no check foresaw: that worker goes, the manager stays
            log.exception("worker_message_crashed", worker=handle.id, message=type(message).__name__)
            handle.kill()

    # ----- visibility -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.time()
        slots = list(self.slots.values())
        manager = {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime_s": round(now - self.started_at, 1),
            "config": self.config_path,
            "endpoints": msgspec.to_builtins(self.config.endpoints),
            "workers": len(self.pool.by_id),
            "spare_workers": sum(1 for w in self.pool.spares() if w.ready),
            "stopping": self.stopping,
            "metrics": self.metrics.url,
            "refused": self.refused(),
        }
        report = status.manager_report(
            manager=manager,
            inventory=self.memory.inventory.describe(),
            views=self.memory.views(slots),
            slots=slots,
            now=now,
        )
        return {**report, "pulls": self.pulls.report(), "catalogue": self.catalogue.status()}

    def refused(self) -> dict[str, Any]:
        """What hostile or broken peers were refused since start: failed handshakes (on the workers socket, and
        CURVE clients), times the events socket dropped its subscribers, messages refused before their envelope."""
        return {
            "handshakes": dict(self.gatekeeper.refused),
            "subscriber_resets": self.events.resets,
            "requests": dict(self.rejected),
        }

    def _heartbeat(self) -> dict[str, Any]:
        return status.heartbeat(os.getpid(), time.time() - self.started_at, list(self.slots.values()))
