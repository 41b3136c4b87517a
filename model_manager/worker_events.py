"""What a worker says, and how it ends: the half of a model's life that reacts to its worker.

``WorkerEvents`` is ``Lifecycle``'s base: its messages (loaded, load failed, a request's chunks, result or error,
idle and stats) and its exit (an unload completed, a load that died, a crash under running requests) become state
changes and answers. The half that acts (queues, placing, loading, answering, threads) is ``lifecycle``; each half
calls the other only through the methods declared here.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import structlog

from model_client import protocol
from model_client.errors import ModelFailed, ModelLoadFailed, ModelManagerError, Timeout, error_from_wire
from model_client.results import Completion
from model_manager import worker_protocol as wire
from model_manager.config import Config
from model_manager.memory import MemoryAccounting
from model_manager.metrics import ManagerMetrics
from model_manager.pool import WorkerHandle
from model_manager.slots import ClassWaits, Job, ModelSlot, ModelState, Waiter
from model_manager.status import model_entry

SPARE_RESTART_BACKOFF_S = 5.0
JobMessage = wire.Chunk | wire.Done | wire.Generated | wire.Failed  # what a worker says about one request

log = structlog.get_logger("model_manager")


class Workers(Protocol):
    """The worker processes, as the lifecycle needs them."""

    by_id: dict[str, WorkerHandle]

    def take(self, model: str, kind: str) -> WorkerHandle: ...
    def send(self, handle: WorkerHandle, message: wire.ToWorker) -> None: ...
    def end(self, handle: WorkerHandle, grace_s: float) -> None: ...
    def spares(self) -> list[WorkerHandle]: ...
    def refill(self) -> None: ...
    def reap(self) -> list[tuple[WorkerHandle, int]]: ...
    def close(self, grace_s: float) -> None: ...


class Outbox(Protocol):
    """Where answers and events go."""

    def send(self, route: list[bytes], frames: list[bytes]) -> bool:
        """False when the client is gone (or not reading): the frames could not go."""
        ...

    def publish(self, topic: str, **body: Any) -> None: ...


def _payloads(payload: bytes | None) -> tuple[bytes, ...]:
    """Binary data a worker sent beside a result or chunk travels to the client as its own frame."""
    return (payload,) if payload is not None else ()


class WorkerEvents:
    config: Config
    workers: Workers
    memory: MemoryAccounting
    metrics: ManagerMetrics
    outbox: Outbox
    slots: dict[str, ModelSlot]
    stopping: bool
    _spares_paused_until: float

    # what the acting half provides
    def _reply(self, waiter: Waiter | Job, result: Any, payloads: tuple[bytes, ...] = ()) -> None: ...
    def _reply_error(self, waiter: Waiter | Job, error: ModelManagerError) -> None: ...
    def _send_load(self, slot: ModelSlot) -> None: ...
    def _fail_load(self, slot: ModelSlot, error: ModelManagerError) -> None: ...
    def _finish(self, slot: ModelSlot, job: Job) -> None: ...
    def _maybe_unload(self, slot: ModelSlot, reason: str = "requested") -> None: ...
    def _pump(self, slot: ModelSlot) -> None: ...
    def _hand_out_threads(self) -> None: ...
    def _answer_drop_waiters(self, slot: ModelSlot) -> None: ...
    def _answer_unload_waiters(self, slot: ModelSlot) -> None: ...
    def schedule(self) -> None: ...

    # ----- what workers say -----------------------------------------------------------------------------------

    def on_worker_message(self, handle: WorkerHandle, message: wire.FromWorker) -> None:
        if isinstance(message, wire.Ready):
            handle.ready = True
            if handle.model is None:
                self.memory.spare_ready(message.rss)
        slot = self.slots.get(handle.model) if handle.model else None
        if slot is None or slot.worker is not handle:
            return
        # A worker runs engines on untrusted input: what it says out of turn (loaded twice, a load failure after
        # loading) is dropped, never a state change the table forbids.
        loading = slot.state is ModelState.LOADING
        if isinstance(message, wire.Ready | wire.Loaded | wire.LoadFailed) and not loading:
            if not isinstance(message, wire.Ready):
                log.warning("worker_message_out_of_turn", worker=handle.id, model=slot.name, state=slot.state.value)
            return
        if isinstance(message, wire.Ready):
            self._send_load(slot)
        elif isinstance(message, wire.Loaded):
            self._on_loaded(slot, message.info)
        elif isinstance(message, wire.LoadFailed):
            self._fail_load(slot, error_from_wire(message.error))
        elif isinstance(message, wire.Idle):
            slot.kv_stats = message.kv or {}
        elif isinstance(message, wire.Stats):
            slot.kv_stats, slot.batching = message.kv or {}, message.batching or {}
        elif isinstance(message, wire.Chunks):
            self._on_chunks(slot, message.items)
        elif isinstance(message, JobMessage):
            job = slot.running.get(message.rid)
            if job is not None:
                self._on_job_message(slot, job, message)

    def _on_job_message(self, slot: ModelSlot, job: Job, message: JobMessage) -> None:
        if isinstance(message, wire.Chunk):
            if job.stream and not job.cancelled:
                self._relay(slot, job, protocol.encode_chunk(job.request_id, message.chunk, _payloads(message.payload)))
            return
        if isinstance(message, wire.Generated):
            self._reply(job, self._final_generation(slot, job, message.result))
            self._log_request(slot, job, "ok")
        elif isinstance(message, wire.Done):
            self._reply(job, self._final_result(slot, job, message.result), _payloads(message.payload))
            self._log_request(slot, job, "ok")
        else:
            error = error_from_wire(message.error)
            self._reply_error(job, error)
            self._log_request(slot, job, error.code)
        self._finish(slot, job)

    def _on_chunks(self, slot: ModelSlot, items: list[wire.StreamItem]) -> None:
        for item in items:
            job = slot.running.get(item.rid)
            if job is not None and job.stream and not job.cancelled:
                self._relay(slot, job, protocol.encode_chunk(job.request_id, item.chunk))

    def _relay(self, slot: ModelSlot, job: Job, frames: list[bytes]) -> None:
        """A streamed piece to its client; a client that cannot take it is gone: its request is cancelled."""
        if not self.outbox.send(job.route, frames):
            self._cancel(slot, job, "client_gone")

    def _cancel(self, slot: ModelSlot, job: Job, reason: str) -> None:
        """The client will not read the answer: the worker stops generating within a token."""
        if job.cancelled:
            return
        job.cancelled = True
        self.metrics.cancelled.labels(slot.name, reason).inc()
        log.info("request_cancelled", id=job.request_id, model=slot.name, reason=reason)
        if slot.worker is not None:
            self.workers.send(slot.worker, wire.Cancel(rid=job.key))

    def _on_loaded(self, slot: ModelSlot, info: dict[str, Any]) -> None:
        slot.transition(ModelState.READY)
        slot.info, slot.last_error, slot.want_loaded = info, None, False
        slot.last_used, slot.last_used_mono = time.time(), time.monotonic()
        assert slot.worker is not None
        rss = info.get("rss_bytes")  # the worker's own word, shown but not trusted: else measured here
        self.memory.loaded(slot, slot.worker.pid, rss if isinstance(rss, int) and rss > 0 else None)
        expected = (slot.load_spec or slot.spec).quantization  # the variant loaded
        if slot.spec.kind == "llm" and info.get("quantization") not in (None, expected):
            log.warning("quantization_label_mismatch", model=slot.name, config=expected, gguf=info["quantization"])
        log.info("model_loaded", model=slot.name, pid=slot.worker.pid, load_ms=info.get("load_ms"))
        self.metrics.loads.labels(slot.name, "ok").inc()
        self.outbox.publish(protocol.EVENT_MODEL_LOADED, model=slot.name, device="+".join(slot.placements), info=info)
        status = model_entry(slot, time.time())
        for waiter in slot.load_waiters:
            self._reply(waiter, status)
        slot.load_waiters.clear()
        if slot.unload_waiters and not slot.queue:
            self._maybe_unload(slot)
        self._pump(slot)

    def _final_generation(self, slot: ModelSlot, job: Job, result: Completion) -> Completion:
        """The worker's result with the manager's figures: the model's name, the queue wait."""
        assert job.started_at is not None
        result.model = slot.name
        result.timings.queue_ms = round(job.queue_wait_s * 1000, 2)
        self.metrics.ttft.labels(slot.name).observe(result.timings.ttft_ms / 1000)
        return result

    def _final_result(self, slot: ModelSlot, job: Job, result: dict[str, Any]) -> dict[str, Any]:
        """Another op's result (speech, embeddings) with the model's name, and the queue wait where it has timings."""
        assert job.started_at is not None
        result["model"] = slot.name
        if isinstance(result.get("timings"), dict):
            result["timings"]["queue_ms"] = round(job.queue_wait_s * 1000, 2)
        return result

    def _log_request(self, slot: ModelSlot, job: Job, outcome: str) -> None:
        now = time.monotonic()
        self.metrics.requests.labels(job.op, slot.name, outcome).inc()
        self.metrics.latency.labels(job.op, slot.name).observe(now - job.received_at)
        if job.started_at is not None:
            waited = job.queue_wait_s
            self.metrics.queue_wait.labels(job.op, slot.name).observe(waited)
            self.metrics.class_wait.labels(slot.name, job.latency_class).observe(waited)
            slot.waits.setdefault(job.latency_class, ClassWaits()).add(waited)
        log.info(
            "request_done",
            id=job.request_id,
            op=job.op,
            model=slot.name,
            outcome=outcome,
            ms=round((now - job.received_at) * 1000, 2),
            conversation_id=getattr(job.args, "conversation_id", None),
        )

    # ----- worker exits ---------------------------------------------------------------------------------------

    def reap(self) -> None:
        for handle, code in self.workers.reap():
            self._on_worker_exit(handle, code)

    def _on_worker_exit(self, handle: WorkerHandle, code: int) -> None:
        slot = self.slots.get(handle.model) if handle.model else None
        if slot is None or slot.worker is not handle:
            if handle.model is None and not handle.ready and not self.stopping:
                death = handle.death(code)
                log.error("spare_worker_died", worker=handle.id, message=death.message("a spare"), **death.details())
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
            self.outbox.publish(protocol.EVENT_MODEL_UNLOADED, model=slot.name, reason=slot.unload_reason)
            self._answer_unload_waiters(slot)
            self._pump(slot)
            self.schedule()
        elif slot.state is ModelState.LOADING:
            if slot.unload_reason == "load_timeout":
                error = ModelLoadFailed(f"worker for {slot.name!r} timed out while loading", exit_code=code)
            else:
                death = handle.death(code, "loading" if handle.ready else None)
                error = ModelLoadFailed(death.message(slot.name), **death.details())
            self._fail_load(slot, error)
        else:
            self._on_worker_crash(slot, handle, code)

    def _on_worker_crash(self, slot: ModelSlot, handle: WorkerHandle, code: int) -> None:
        """The worker died under a loaded model: its requests fail, queued ones get a fresh worker."""
        jobs = list(slot.running.values())
        if slot.unload_reason == "request_timeout":
            limit = self.config.limits.request_timeout_s
            error: ModelManagerError = Timeout(f"request ran past {limit} s", limit_s=limit)
        else:
            death = handle.death(code)
            error = ModelFailed(death.message(slot.name), **death.details())
        slot.transition(ModelState.FAILED)
        slot.info, slot.last_error, slot.running = {}, error.to_wire(), {}
        slot.unload_reason = "requested"
        log.error("model_failed", model=slot.name, code=error.code, message=error.message, **error.details)
        self.metrics.unloads.labels(slot.name, "error").inc()
        self.outbox.publish(protocol.EVENT_MODEL_FAILED, model=slot.name, reason="worker_exit", error=error.to_wire())
        self.outbox.publish(protocol.EVENT_MODEL_UNLOADED, model=slot.name, reason="error")
        for job in jobs:
            self._reply_error(job, error)
            self._log_request(slot, job, error.code)
        self._hand_out_threads()
        self._answer_unload_waiters(slot)
        self._pump(slot)
