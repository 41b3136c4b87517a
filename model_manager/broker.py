"""The ModelManagerAgent: one socket loop that never waits on a model.

Clients talk to a ROUTER socket (REQ and DEALER clients both work); workers talk to a second ROUTER socket,
one DEALER each (the zguide's load-balancing broker shape). Every state change of a model happens here, in one
thread, driven by messages: a client request, a worker's ``ready``/``loaded``/``chunk``/``done``, or a worker's
exit seen by the periodic housekeeping. Requests to one model wait in its bounded queue; different models run in
their own processes, so they run in parallel.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
import zmq

from daemonkit.binding import check_endpoint, load_server, prepare_ipc_dir, remove_ipc_file, serve_securely
from daemonkit.publisher import EventPublisher
from model_client import protocol
from model_client.errors import (
    BadRequest,
    Busy,
    InsufficientMemory,
    InternalError,
    InvalidAudio,
    ModelFailed,
    ModelLoadFailed,
    ModelManagerError,
    ModelNotFound,
    Timeout,
    error_from_wire,
)
from model_manager import policy
from model_manager import worker_protocol as wire
from model_manager.config import MIB, Config, ModelSpec
from model_manager.gatekeeper import WORKERS_DOMAIN, Gatekeeper
from model_manager.kvcache import spill_path
from model_manager.memory import MemoryAccounting
from model_manager.metrics import ManagerMetrics
from model_manager.policy import Decision, decay_demand
from model_manager.pool import WorkerHandle, WorkerPool
from model_manager.ratelimit import RateLimiter
from model_manager.slots import Job, ModelSlot, ModelState, Waiter
from model_manager.status import catalogue_entry, device_entry, model_entry

VERSION = "0.1.0"
TICK_S = 0.05
SHUTDOWN_GRACE_S = 5.0
SPARE_RESTART_BACKOFF_S = 5.0

log = structlog.get_logger("model_manager")


def _peer_property(frame: zmq.Frame, name: str) -> str | None:
    """What the peer's ZeroMQ handshake said of it: ``Socket-Type`` (REQ, DEALER, ...), ``User-Id`` (a CURVE
    client's public key, set by the gatekeeper)."""
    try:
        return frame.get(name) or None
    except (zmq.ZMQError, KeyError):
        return None


def _payloads(payload: bytes | None) -> tuple[bytes, ...]:
    """Binary data a worker sent beside a result or chunk travels to the client as its own frame."""
    return (payload,) if payload is not None else ()


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
            self.ctx, endpoints.events, lambda sock, endpoint: serve_securely(sock, endpoint, self.curve), self.poller
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
        self.slots = {name: ModelSlot(name=name, spec=spec) for name, spec in config.models.items()}
        self.handlers: dict[str, Callable[[list[bytes], protocol.Request, Any], None]] = {
            "ping": self._op_ping,
            "status": self._op_status,
            "models": self._op_models,
            "load": self._op_load,
            "unload": self._op_unload,
            "chat": self._op_generate,
            "complete": self._op_generate,
            "conversation.drop": self._op_drop_conversation,
            "transcribe": self._op_transcribe,
            "synthesize": self._op_synthesize,
        }
        self.rejected: Counter[str] = Counter()  # requests refused before any op ran, by reason
        self.rate = RateLimiter(config.limits.requests_per_second, config.limits.burst)
        self.metrics = ManagerMetrics(config.metrics)
        self.metrics.start()
        self._next_metrics = 0.0
        self._next_tick = 0.0
        self._next_heartbeat = 0.0
        self._spares_paused_until = 0.0
        self._spare_missing_since: float | None = None

    # ----- the loop -------------------------------------------------------------------------------------------

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        self.pool.refill()
        for slot in self.slots.values():
            slot.want_loaded = slot.spec.preload
        log.info(
            "manager_started",
            pid=os.getpid(),
            requests=self.config.endpoints.requests,
            events=self.config.endpoints.events,
            models=list(self.slots),
            config=self.config_path,
            devices=self.memory.inventory.mode,
        )
        self._schedule()
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
            if any(isinstance(fd, int) for fd in ready):
                self._reap()  # a worker's pidfd: it has exited
            now = time.monotonic()
            if now >= self._next_tick:
                self._next_tick = now + TICK_S
                self._housekeeping(now)
            if self.stopping:
                shutdown_deadline = shutdown_deadline or now + SHUTDOWN_GRACE_S
                if now > shutdown_deadline or not any(slot.busy for slot in self.slots.values()):
                    break
        self._shutdown()

    def _request_stop(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info("manager_stopping", signal=signal.Signals(signum).name)
        self.stopping = True

    @staticmethod
    def _drain(sock: zmq.Socket, handle: Callable[[list[Any]], None], limit: int = 256, copy: bool = True) -> None:
        """Handle the messages waiting on ``sock``; asking EVENTS is cheaper than a failing NOBLOCK recv."""
        for _ in range(limit):
            handle(sock.recv_multipart(copy=copy))
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                return

    def _shutdown(self) -> None:
        stopped = ModelFailed("the model manager shut down before this request ran")
        for slot in self.slots.values():
            for job in [*slot.running.values(), *slot.queue]:
                self._reply_error(job.route, job.request_id, stopped)
            slot.queue.clear()
        self.pool.close(self.config.manager.unload_timeout_s)
        for slot in self.slots.values():  # every worker is gone: their files are the manager's now
            self._answer_drop_waiters(slot)
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

    # ----- replies and events ---------------------------------------------------------------------------------

    def _send(self, route: list[bytes], frames: list[bytes]) -> bool:
        """Send to a client; False when it is gone (or not reading), so the message could not go."""
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

    def _reply(self, route: list[bytes], request_id: str | None, result: Any) -> None:
        self._send(route, protocol.encode_result(request_id, result))

    def _reply_error(self, route: list[bytes], request_id: str | None, error: ModelManagerError) -> None:
        self._send(route, protocol.encode_error(request_id, error))

    def _publish(self, topic: str, **body: Any) -> None:
        self.events.send_multipart(protocol.encode_event(topic, body, time.time()))

    # ----- client requests ------------------------------------------------------------------------------------

    def _on_client_message(self, message: list[zmq.Frame]) -> None:
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
            self.handlers[request.op](route, request, args)
        except ModelManagerError as exc:
            log.info("request_failed", id=request.id, op=request.op, code=exc.code, message=exc.message)
            model = request.args.get("model") or request.args.get("voice")
            model = model if isinstance(model, str) and model in self.slots else "-"  # no label from strangers
            self.metrics.requests.labels(request.op, model, exc.code).inc()
            self._reply_error(route, request.id, exc)
        except Exception as exc:  # a bug here must not take the daemon down with it
            log.exception("request_crashed", id=request.id, op=request.op)
            self._reply_error(route, request.id, InternalError(f"{type(exc).__name__}: {exc}"))

    def _slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotFound(f"model {name!r} is not in the catalogue", model=name, available=sorted(self.slots))
        return slot

    def _op_ping(self, route: list[bytes], request: protocol.Request, _args: Any) -> None:
        self._reply(route, request.id, {"pong": True, "protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid()})

    def _op_status(self, route: list[bytes], request: protocol.Request, _args: Any) -> None:
        self._reply(route, request.id, self.status())

    def _op_models(self, route: list[bytes], request: protocol.Request, _args: Any) -> None:
        self._reply(route, request.id, {"models": [catalogue_entry(slot) for slot in self.slots.values()]})

    def _op_load(self, route: list[bytes], request: protocol.Request, args: protocol.ModelArgs) -> None:
        slot = self._slot(args.model)
        if slot.state is ModelState.READY:
            self._reply(route, request.id, self._model_status(slot, time.time()))
            return
        slot.load_waiters.append(Waiter(route, request.id))
        self._pump(slot)

    def _op_unload(self, route: list[bytes], request: protocol.Request, args: protocol.ModelArgs) -> None:
        slot = self._slot(args.model)
        if slot.state in (ModelState.UNLOADED, ModelState.FAILED) and not slot.busy:
            self._reply(route, request.id, self._model_status(slot, time.time()))
            return
        slot.unload_waiters.append(Waiter(route, request.id))
        self._maybe_unload(slot)

    def _op_generate(self, route: list[bytes], request: protocol.Request, args: protocol.GenerationArgs) -> None:
        limit = self.config.limits.max_tokens
        if args.max_tokens > limit:
            raise BadRequest(f"max_tokens {args.max_tokens} is over the limit of {limit}", max_tokens=limit)
        messages = len(getattr(args, "messages", ()))
        if messages > self.config.limits.max_messages:
            limit = self.config.limits.max_messages
            raise BadRequest(f"{messages} messages is over the limit of {limit}", max_messages=limit)
        # Checked here, before a worker spends seconds tokenizing megabytes only to refuse them by token count.
        texts = [args.prompt] if isinstance(args, protocol.CompleteArgs) else [m.content for m in args.messages]
        prompt_bytes, limit = sum(len(text.encode()) for text in texts), self.config.limits.max_prompt_bytes
        if prompt_bytes > limit:
            raise BadRequest(
                f"the prompt is {prompt_bytes} bytes, over the limit of {limit}",
                prompt_bytes=prompt_bytes,
                max_prompt_bytes=limit,
            )
        self._enqueue(self._kind_slot(args.model, "llm", request.op), route, request, args)

    def _op_transcribe(self, route: list[bytes], request: protocol.Request, args: protocol.TranscribeArgs) -> None:
        slot = self._kind_slot(args.model, "stt", request.op)
        if not request.payloads:
            raise InvalidAudio("no audio: transcribe takes the audio in one binary frame after the envelope")
        if len(request.payloads) != 1:
            raise BadRequest(
                f"transcribe takes the audio in one binary frame after the envelope, got {len(request.payloads)}"
            )
        if not request.payloads[0]:
            raise InvalidAudio("the audio frame is empty")
        self._enqueue(slot, route, request, args, audio=request.payloads[0])

    def _op_synthesize(self, route: list[bytes], request: protocol.Request, args: protocol.SynthesizeArgs) -> None:
        if not args.text.strip():
            raise BadRequest("text is empty: there is nothing to say")
        if "\x00" in args.text:
            raise BadRequest("text holds a NUL character")
        limit = self.config.limits.max_text_chars
        if len(args.text) > limit:
            raise BadRequest(f"text is {len(args.text)} characters, over the limit of {limit}", max_text_chars=limit)
        if args.stream and args.format != "pcm":
            raise BadRequest("streamed speech is raw PCM: ask for format 'pcm' with stream, or 'wav' without")
        try:
            slot = self._kind_slot(args.voice, "tts", request.op)
        except ModelNotFound as exc:
            voices = [name for name, s in self.slots.items() if s.spec.kind == "tts"]
            message = f"voice {args.voice!r} is not in the catalogue"
            raise ModelNotFound(message, voice=args.voice, available=voices) from exc
        self._enqueue(slot, route, request, args)

    def _kind_slot(self, name: str | None, kind: str, op: str) -> ModelSlot:
        """The named catalogue model, which must be of ``kind``; None: the catalogue's first model of it."""
        if name is None:
            for slot in self.slots.values():
                if slot.spec.kind == kind:
                    return slot
            raise ModelNotFound(f"the catalogue has no {kind} model for {op!r}", kind=kind)
        slot = self._slot(name)
        if slot.spec.kind != kind:
            raise BadRequest(f"{op!r} needs a model of kind {kind}; {name!r} is {slot.spec.kind}", model=name)
        return slot

    def _enqueue(self, slot: ModelSlot, route: list[bytes], request: protocol.Request, args: Any, **extra: Any) -> None:
        if len(slot.queue) >= slot.spec.max_queue:
            raise Busy(f"model {slot.name!r} has {len(slot.queue)} requests queued", queued=len(slot.queue))
        job_args = protocol.args_to_dict(args) | extra
        job = Job(route=route, request_id=request.id, op=request.op, args=job_args)
        job.priority = protocol.PRIORITY_NORMAL if request.priority is None else request.priority
        if request.deadline_ms is not None:
            job.deadline = job.received_at + request.deadline_ms / 1000
        slot.queue.append(job)
        now = time.monotonic()
        half_life = self.config.scheduler.demand_half_life_s
        slot.demand = decay_demand(slot.demand, now - slot.last_used_mono, half_life) + 1.0
        self._pump(slot)

    def _op_drop_conversation(
        self, route: list[bytes], request: protocol.Request, args: protocol.ConversationArgs
    ) -> None:
        """The spilled files belong to the model's worker while it lives: a loaded model's worker drops the state
        itself (in turn with its requests), an exiting one first writes its states out, so the drop waits until it
        is gone; with no worker, the manager deletes the file."""
        slot = self._kind_slot(args.model, "llm", request.op)
        if slot.state in (ModelState.READY, ModelState.LOADING):
            self._enqueue(slot, route, request, args)
        elif slot.worker is not None:
            slot.drop_waiters.append((Waiter(route, request.id), args.conversation_id))
        else:
            self._reply(route, request.id, self._drop_spilled(slot, args.conversation_id))

    def _answer_drop_waiters(self, slot: ModelSlot) -> None:
        for waiter, conversation_id in slot.drop_waiters:
            self._reply(waiter.route, waiter.request_id, self._drop_spilled(slot, conversation_id))
        slot.drop_waiters.clear()

    def _drop_spilled(self, slot: ModelSlot, conversation_id: str) -> dict[str, Any]:
        dropped = False
        if self.config.kv_cache.spill_dir:
            path = spill_path(self.config.kv_cache.spill_dir, slot.name, conversation_id)
            dropped = path.exists()
            path.unlink(missing_ok=True)
        return {"dropped": dropped, "conversation_id": conversation_id}

    # ----- model life cycle -----------------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Place every model that waits to be loaded, or evict to make room, or give up on it (see scheduler)."""
        now = time.monotonic()
        pending = [
            s for s in self.slots.values() if s.state in (ModelState.UNLOADED, ModelState.FAILED) and s.wants_load
        ]
        for slot in sorted(pending, key=lambda s: (-s.spec.priority, s.pending_since or now)):
            slot.pending_since = slot.pending_since or now
            try:
                needs = self.memory.needs(slot)
            except ModelManagerError as exc:
                self._fail_load(slot, exc)
                continue
            if needs is None:
                continue  # the GGUF header is being read
            decision = self.memory.plan(slot, list(self.slots.values()), needs, now)
            slot.plan = decision
            if decision.action == "place":
                self._start_load(slot, self.memory.place(slot, decision, needs))
            elif decision.action == "evict":
                log.info("evicting", model=slot.name, victims=decision.evict, device=decision.device_ids[0])
                for victim in decision.evict:
                    self._maybe_unload(self.slots[victim], reason="pressure")
            elif decision.action == "fail" or now - slot.pending_since > self.config.scheduler.wait_for_memory_s:
                self._fail_load(slot, self._insufficient_memory(slot, decision))

    @staticmethod
    def _insufficient_memory(slot: ModelSlot, decision: Decision) -> InsufficientMemory:
        free = {device: round(bytes_ / MIB, 1) for device, bytes_ in decision.free.items()}
        reason = f"waited too long; {decision.reason}" if decision.action == "wait" else decision.reason
        return InsufficientMemory(
            f"{slot.name!r} needs {decision.need / MIB:.0f} MiB: {reason}",
            model=slot.name,
            needed_mib=round(decision.need / MIB, 1),
            free_mib=free,
        )

    def _start_load(self, slot: ModelSlot, spec: ModelSpec) -> None:
        slot.transition(ModelState.LOADING)
        slot.plan, slot.pending_since = None, None
        slot.load_started_at = time.monotonic()
        slot.load_spec = spec
        slot.worker = self.pool.take(slot.name, slot.spec.kind)
        log.info(
            "model_loading",
            model=slot.name,
            device="+".join(slot.placements),
            reserved_mib=round(sum(slot.placements.values()) / MIB, 1),
            worker=slot.worker.id,
            spare=slot.worker.ready,
        )
        if slot.worker.ready:
            self._send_load(slot)

    def _send_load(self, slot: ModelSlot) -> None:
        assert slot.worker is not None and slot.load_spec is not None
        load = wire.Load(
            name=slot.name,
            spec=slot.load_spec,
            warm=slot.want_loaded and slot.spec.preload,
            kv=self.config.kv_cache,
            limits=self.config.limits,
        )
        self.pool.send(slot.worker, load)

    def _pump(self, slot: ModelSlot) -> None:
        """Start the next queued request if the model can take it; ask for a load if the model is not there."""
        if self.stopping and slot.state is not ModelState.READY:
            return
        if slot.state in (ModelState.UNLOADED, ModelState.FAILED):
            if slot.wants_load:
                self._schedule()
        elif slot.state is ModelState.READY:
            assert slot.worker is not None
            while slot.queue and len(slot.running) < slot.capacity:
                job = slot.queue.popleft()
                job.started_at = time.monotonic()
                slot.running[job.request_id] = job
                run = wire.Run(rid=job.request_id, op=job.op, args=job.args)
                if job.deadline is not None and not job.stream:
                    # The client waits this much longer for the one reply: the worker stops past it. (A stream's
                    # client waits per chunk; if it goes away, the failed send of a chunk cancels the request.)
                    run.deadline_s = max(0.0, job.deadline - job.started_at)
                self.pool.send(slot.worker, run)

    def _maybe_unload(self, slot: ModelSlot, reason: str = "requested") -> None:
        if slot.state is ModelState.READY and not slot.busy and slot.worker is not None:
            slot.transition(ModelState.UNLOADING)
            slot.unload_reason = reason
            self.pool.end(slot.worker, self.config.manager.unload_timeout_s)
            log.info("model_unloading", model=slot.name, reason=reason)

    def _finish(self, slot: ModelSlot, job: Job) -> None:
        slot.running.pop(job.request_id, None)
        slot.last_used, slot.last_used_mono = time.time(), time.monotonic()
        slot.requests_served += 1
        if slot.unload_waiters:
            self._maybe_unload(slot)
        self._pump(slot)
        if not slot.busy:
            self._schedule()  # a model that stopped being busy may now be evicted for one that waits

    def _fail_load(self, slot: ModelSlot, error: ModelManagerError) -> None:
        """Every request that needed this load gets ``error``; the model shows ``failed`` until asked again."""
        if slot.worker is not None:
            self.pool.end(slot.worker, self.config.manager.unload_timeout_s)
        slot.transition(ModelState.FAILED)
        slot.worker, slot.last_error, slot.info = None, error.to_wire(), {}
        slot.placements, slot.plan, slot.pending_since, slot.want_loaded = {}, None, None, False
        log.error("model_load_failed", model=slot.name, code=error.code, message=error.message)
        self.metrics.loads.labels(slot.name, "error").inc()
        self._publish(protocol.EVENT_MODEL_FAILED, model=slot.name, reason="load", error=error.to_wire())
        while slot.queue:
            job = slot.queue.popleft()
            self._reply_error(job.route, job.request_id, error)
        for waiter in slot.load_waiters:
            self._reply_error(waiter.route, waiter.request_id, error)
        slot.load_waiters.clear()
        self._answer_unload_waiters(slot)

    def _answer_unload_waiters(self, slot: ModelSlot) -> None:
        status = self._model_status(slot, time.time())
        for waiter in slot.unload_waiters:
            self._reply(waiter.route, waiter.request_id, status)
        slot.unload_waiters.clear()

    # ----- worker messages ------------------------------------------------------------------------------------

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
        if isinstance(message, wire.Ready):
            handle.ready = True
            if handle.model is None:
                self.memory.spare_ready(message.rss)
        slot = self.slots.get(handle.model) if handle.model else None
        if slot is None or slot.worker is not handle:
            return
        if isinstance(message, wire.Ready) and slot.state is ModelState.LOADING:
            self._send_load(slot)
        elif isinstance(message, wire.Loaded):
            self._on_loaded(slot, message.info)
        elif isinstance(message, wire.LoadFailed):
            self._fail_load(slot, error_from_wire(message.error))
        elif isinstance(message, wire.Idle):
            slot.kv_stats = message.kv or {}
        elif isinstance(message, wire.Chunk | wire.Done | wire.Failed):
            job = slot.running.get(message.rid)
            if job is not None:
                self._on_job_message(slot, job, message)

    def _on_job_message(self, slot: ModelSlot, job: Job, message: wire.Chunk | wire.Done | wire.Failed) -> None:
        if isinstance(message, wire.Chunk):
            if job.stream and not job.cancelled:
                frames = protocol.encode_chunk(job.request_id, message.chunk, _payloads(message.payload))
                if not self._send(job.route, frames):
                    self._cancel(slot, job, "client_gone")
            return
        if isinstance(message, wire.Done):
            result = self._final_result(slot, job, message.result)
            self._send(job.route, protocol.encode_result(job.request_id, result, _payloads(message.payload)))
            self._log_request(slot, job, "ok")
        else:
            error = error_from_wire(message.error)
            self._reply_error(job.route, job.request_id, error)
            self._log_request(slot, job, error.code)
        self._finish(slot, job)

    def _cancel(self, slot: ModelSlot, job: Job, reason: str) -> None:
        """The client will not read the answer: the worker stops generating within a token."""
        if job.cancelled:
            return
        job.cancelled = True
        self.metrics.cancelled.labels(slot.name, reason).inc()
        log.info("request_cancelled", id=job.request_id, model=slot.name, reason=reason)
        if slot.worker is not None:
            self.pool.send(slot.worker, wire.Cancel(rid=job.request_id))

    def _on_loaded(self, slot: ModelSlot, info: dict[str, Any]) -> None:
        slot.transition(ModelState.READY)
        slot.info, slot.last_error, slot.want_loaded = info, None, False
        slot.last_used, slot.last_used_mono = time.time(), time.monotonic()
        self.memory.loaded(slot, info["pid"], info.get("rss_bytes"))
        if slot.spec.kind == "llm" and info.get("quantization") not in (None, slot.spec.quantization):
            log.warning(
                "quantization_label_mismatch", model=slot.name, config=slot.spec.quantization, gguf=info["quantization"]
            )
        log.info("model_loaded", model=slot.name, pid=info.get("pid"), load_ms=info.get("load_ms"))
        self.metrics.loads.labels(slot.name, "ok").inc()
        self._publish(protocol.EVENT_MODEL_LOADED, model=slot.name, device="+".join(slot.placements), info=info)
        status = self._model_status(slot, time.time())
        for waiter in slot.load_waiters:
            self._reply(waiter.route, waiter.request_id, status)
        slot.load_waiters.clear()
        if slot.unload_waiters and not slot.queue:
            self._maybe_unload(slot)
        self._pump(slot)

    def _final_result(self, slot: ModelSlot, job: Job, result: dict[str, Any]) -> dict[str, Any]:
        assert job.started_at is not None
        result["model"] = slot.name
        ttft_ms = (result.get("timings") or {}).get("ttft_ms")
        if ttft_ms is not None:
            self.metrics.ttft.labels(slot.name).observe(ttft_ms / 1000)
        if "timings" in result:
            result["timings"]["queue_ms"] = round((job.started_at - job.received_at) * 1000, 2)
        return result

    def _log_request(self, slot: ModelSlot, job: Job, outcome: str) -> None:
        now = time.monotonic()
        self.metrics.requests.labels(job.op, slot.name, outcome).inc()
        self.metrics.latency.labels(job.op, slot.name).observe(now - job.received_at)
        if job.started_at is not None:
            self.metrics.queue_wait.labels(job.op, slot.name).observe(job.started_at - job.received_at)
        log.info(
            "request_done",
            id=job.request_id,
            op=job.op,
            model=slot.name,
            outcome=outcome,
            ms=round((time.monotonic() - job.received_at) * 1000, 2),
            conversation_id=job.args.get("conversation_id"),
        )

    # ----- housekeeping: worker exits, time limits, idle models, heartbeat ------------------------------------

    def _reap(self) -> None:
        for handle, code in self.pool.reap():
            self._on_worker_exit(handle, code)

    def _housekeeping(self, now: float) -> None:
        self._reap()
        limits, manager = self.config.limits, self.config.manager
        for action in policy.due(self._facts(now), now, limits.request_timeout_s, manager.load_timeout_s):
            self._carry_out(action)
        for slot in self.slots.values():
            for job in slot.queue.expired(now):
                late = Timeout(
                    "the client's deadline passed before the request could start", queued_s=now - job.received_at
                )
                self._reply_error(job.route, job.request_id, late)
                self._log_request(slot, job, "deadline")
        self.memory.prune_releasing(now)
        computing = any(s.state is ModelState.LOADING or s.running for s in self.slots.values())
        refill, self._spare_missing_since = policy.spare_due(
            len(self.pool.spares()), self._spare_missing_since, computing, now
        )
        if refill and not self.stopping and now >= self._spares_paused_until:
            self.pool.refill()
        if self.metrics.url is not None and now >= self._next_metrics:
            self._next_metrics = now + 1.0
            self.metrics.refresh(list(self.slots.values()), self.memory.views(list(self.slots.values())))
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + manager.heartbeat_s
            self._publish(protocol.EVENT_HEARTBEAT, **self._heartbeat())

    def _facts(self, now: float) -> list[policy.ModelFacts]:
        wall = time.time()
        return [
            policy.ModelFacts(
                name=slot.name,
                state=slot.state.value,
                live_worker=slot.worker is not None and slot.worker.exit_deadline is None,
                oldest_run_started=min((j.started_at for j in slot.running.values() if j.started_at), default=None),
                load_started=slot.load_started_at,
                idle_s=slot.idle_for(wall),
                idle_ttl_s=slot.spec.idle_ttl_s,
                pinned=slot.spec.pinned,
                waiting=slot.wants_load,
            )
            for slot in self.slots.values()
        ]

    def _carry_out(self, action: policy.Action) -> None:
        if isinstance(action, policy.KillWorker):
            slot = self.slots[action.model]
            assert slot.worker is not None
            slot.unload_reason = action.reason
            if action.reason == "request_timeout":
                log.error("request_timed_out", model=slot.name, ids=list(slot.running))
            slot.worker.kill()
        elif isinstance(action, policy.Unload):
            self._maybe_unload(self.slots[action.model], reason=action.reason)
        elif isinstance(action, policy.PlaceWaiting):
            self._schedule()

    def _on_worker_exit(self, handle: WorkerHandle, code: int) -> None:
        slot = self.slots.get(handle.model) if handle.model else None
        if slot is None or slot.worker is not handle:
            if handle.model is None and not handle.ready and not self.stopping:
                log.error("spare_worker_died", worker=handle.id, exit_code=code)
                self._spares_paused_until = time.monotonic() + SPARE_RESTART_BACKOFF_S
            return
        slot.worker = None
        self.memory.unloaded(slot, handle.pid)
        self._answer_drop_waiters(slot)
        if slot.state is ModelState.UNLOADING:
            slot.transition(ModelState.UNLOADED)
            slot.info = {}
            log.info("model_unloaded", model=slot.name, reason=slot.unload_reason, exit_code=code)
            self.metrics.unloads.labels(slot.name, slot.unload_reason).inc()
            self._publish(protocol.EVENT_MODEL_UNLOADED, model=slot.name, reason=slot.unload_reason)
            self._answer_unload_waiters(slot)
            self._pump(slot)
            self._schedule()
        elif slot.state is ModelState.LOADING:
            reason = "timed out" if slot.unload_reason == "load_timeout" else f"exited with code {code}"
            self._fail_load(slot, ModelLoadFailed(f"worker for {slot.name!r} {reason} while loading", exit_code=code))
        else:
            self._on_worker_crash(slot, code)

    def _on_worker_crash(self, slot: ModelSlot, code: int) -> None:
        """The worker died under a loaded model: its requests fail, queued ones get a fresh worker."""
        jobs = list(slot.running.values())
        if slot.unload_reason == "request_timeout":
            error: ModelManagerError = Timeout(
                f"request ran past {self.config.limits.request_timeout_s} s",
                limit_s=self.config.limits.request_timeout_s,
            )
        else:
            error = ModelFailed(f"worker for {slot.name!r} exited with code {code}", exit_code=code)
        slot.transition(ModelState.FAILED)
        slot.info, slot.last_error, slot.running = {}, error.to_wire(), {}
        slot.unload_reason = "requested"
        log.error("model_failed", model=slot.name, exit_code=code, code=error.code)
        self.metrics.unloads.labels(slot.name, "error").inc()
        self._publish(protocol.EVENT_MODEL_FAILED, model=slot.name, reason="worker_exit", error=error.to_wire())
        self._publish(protocol.EVENT_MODEL_UNLOADED, model=slot.name, reason="error")
        for job in jobs:
            self._reply_error(job.route, job.request_id, error)
            self._log_request(slot, job, error.code)
        self._answer_unload_waiters(slot)
        self._pump(slot)

    # ----- visibility -----------------------------------------------------------------------------------------

    def _model_status(self, slot: ModelSlot, now: float) -> dict[str, Any]:
        return model_entry(slot, now)

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {
            "manager": {
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
            },
            "devices": {
                **self.memory.inventory.describe(),
                "list": [device_entry(view) for view in self.memory.views(list(self.slots.values()))],
            },
            "models": [model_entry(slot, now) for slot in self.slots.values()],
        }

    def refused(self) -> dict[str, Any]:
        """What hostile or broken peers were refused since start: failed handshakes (on the workers socket, and
        CURVE clients), times the events socket dropped its subscribers, messages refused before their envelope."""
        return {
            "handshakes": dict(self.gatekeeper.refused),
            "subscriber_resets": self.events.resets,
            "requests": dict(self.rejected),
        }

    def _heartbeat(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "models": {name: slot.state.value for name, slot in self.slots.items()},
        }
