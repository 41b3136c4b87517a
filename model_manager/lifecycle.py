"""Each catalogue model's life: placed, loaded, serving its queue, unloaded, failed; and what its worker says.

``Lifecycle`` owns every ``ModelSlot`` and changes a state only through ``ModelSlot.transition``. It decides
nothing about *where* or *when* (that is ``policy``); it carries out the policy's actions and reacts to events
(what workers say and how they end: its base, ``worker_events.WorkerEvents``). It reaches the world through two
small interfaces (in ``worker_events``), so tests drive it with fakes: ``Workers`` (start, message, end and reap
worker processes; the real one is ``pool.WorkerPool``) and ``Outbox`` (frames to a client's route, events to
subscribers; the real one is the broker).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import structlog

from model_client import protocol
from model_client.errors import (
    BadRequest,
    Busy,
    InsufficientMemory,
    ModelFailed,
    ModelManagerError,
    Timeout,
)
from model_manager import policy, threads
from model_manager import worker_protocol as wire
from model_manager.config import MIB, Config, ModelSpec
from model_manager.kvcache import spill_path
from model_manager.memory import MemoryAccounting
from model_manager.metrics import ManagerMetrics
from model_manager.policy import Decision, decay_demand
from model_manager.slots import Job, ModelSlot, ModelState, Waiter
from model_manager.status import model_entry
from model_manager.worker_events import Outbox, WorkerEvents, Workers

log = structlog.get_logger("model_manager")


class Lifecycle(WorkerEvents):
    def __init__(
        self, config: Config, workers: Workers, memory: MemoryAccounting, metrics: ManagerMetrics, outbox: Outbox
    ) -> None:
        self.config = config
        self.workers = workers
        self.memory = memory
        self.metrics = metrics
        self.outbox = outbox
        self.slots = {name: ModelSlot(name=name, spec=spec) for name, spec in config.models.items()}
        self.cpu_threads = threads.cpu_budget(config.devices.cpu_threads)  # None: not handed out
        self.stopping = False
        self._spares_paused_until = 0.0
        self._spare_missing_since: float | None = None
        self._in_flight: set[tuple[bytes, str]] = set()  # (client, id) of every job queued or running

    # ----- what clients ask for -------------------------------------------------------------------------------

    def start(self) -> None:
        """Warm the spare workers and load the models marked ``preload``."""
        self.workers.refill()
        for slot in self.slots.values():
            slot.want_loaded = slot.spec.preload
        self.schedule()

    def enqueue(self, slot: ModelSlot, job: Job) -> None:
        if job.client_key in self._in_flight:
            raise BadRequest(f"request id {job.request_id!r} is already in flight from this client", field="id")
        if len(slot.queue) >= slot.spec.max_queue:
            raise Busy(f"model {slot.name!r} has {len(slot.queue)} requests queued", queued=len(slot.queue))
        if slot.state is ModelState.READY and job.deadline is not None:
            ahead = len(slot.running) + slot.queue.ahead_of(job.priority)
            late_s = policy.admission(ahead, slot.capacity, slot.service_s, job.deadline - time.monotonic())
            if late_s is not None:
                raise Busy(
                    f"model {slot.name!r} would start this request after its deadline: {ahead} requests are ahead",
                    queued=len(slot.queue),
                    retry_after_ms=round(late_s * 1000),
                )
        slot.queue.append(job)
        self._in_flight.add(job.client_key)
        if job.keep_alive_s is not None:
            slot.keep_alive_s = job.keep_alive_s
        now = time.monotonic()
        half_life = self.config.scheduler.demand_half_life_s
        slot.demand = decay_demand(slot.demand, now - slot.last_used_mono, half_life) + 1.0
        self._pump(slot)

    def load(self, slot: ModelSlot, waiter: Waiter, keep_alive_s: float | None = None) -> None:
        """Answer ``waiter`` with the model's status once it is loaded (at once if it is)."""
        if keep_alive_s is not None:
            slot.keep_alive_s = keep_alive_s
        if slot.state is ModelState.READY:
            self._reply(waiter, model_entry(slot, time.time()))
            return
        slot.load_waiters.append(waiter)
        self._pump(slot)

    def unload(self, slot: ModelSlot, waiter: Waiter) -> None:
        """Answer ``waiter`` once the model is unloaded; a busy model finishes its queue first."""
        if slot.state in (ModelState.UNLOADED, ModelState.FAILED) and not slot.busy:
            self._reply(waiter, model_entry(slot, time.time()))
            return
        slot.unload_waiters.append(waiter)
        self._maybe_unload(slot)

    def drop_conversation(self, slot: ModelSlot, waiter: Waiter, job: Job) -> None:
        """The spilled files belong to the model's worker while it lives: a loaded model's worker drops the state
        itself (in turn with its requests), an exiting one first writes its states out, so the drop waits until it
        is gone; with no worker, the lifecycle deletes the file."""
        assert isinstance(job.args, wire.DropRun)
        if slot.state in (ModelState.READY, ModelState.LOADING):
            self.enqueue(slot, job)
        elif slot.worker is not None:
            slot.drop_waiters.append((waiter, job.args.conversation_id))
        else:
            self._reply(waiter, self._drop_spilled(slot, job.args.conversation_id))

    # ----- the catalogue changing at run time ------------------------------------------------------------------

    def add_model(self, name: str, spec: ModelSpec) -> ModelSlot:
        slot = self.slots[name] = ModelSlot(name=name, spec=spec)
        return slot

    def at_rest(self, slot: ModelSlot) -> bool:
        """No worker, nothing queued or running, nobody waiting: the model can be changed or removed."""
        return (
            slot.worker is None
            and not slot.busy
            and not slot.load_waiters
            and not slot.unload_waiters
            and not slot.drop_waiters
            and slot.state in (ModelState.UNLOADED, ModelState.FAILED)
        )

    def retire(self, name: str, reason: str) -> bool:
        """Take a model out of the catalogue once it is at rest (True); until then, unload it when idle."""
        slot = self.slots[name]
        if self.at_rest(slot):
            del self.slots[name]
            return True
        self._maybe_unload(slot, reason=reason)
        return False

    def respec(self, name: str, spec: ModelSpec) -> bool:
        """Give a model its edited entry once it is at rest (True); a loaded one keeps serving as it was."""
        slot = self.slots[name]
        if not self.at_rest(slot):
            return False
        slot.spec, slot.load_spec, slot.estimate, slot.measured = spec, None, None, None
        return True

    # ----- answers --------------------------------------------------------------------------------------------

    def _reply(self, waiter: Waiter | Job, result: Any, payloads: tuple[bytes, ...] = ()) -> None:
        if isinstance(waiter, Job):
            self._in_flight.discard(waiter.client_key)
        self.outbox.send(waiter.route, protocol.encode_result(waiter.request_id, result, payloads))

    def _reply_error(self, waiter: Waiter | Job, error: ModelManagerError) -> None:
        if isinstance(waiter, Job):
            self._in_flight.discard(waiter.client_key)
        self.outbox.send(waiter.route, protocol.encode_error(waiter.request_id, error))

    def _answer_drop_waiters(self, slot: ModelSlot) -> None:
        for waiter, conversation_id in slot.drop_waiters:
            self._reply(waiter, self._drop_spilled(slot, conversation_id))
        slot.drop_waiters.clear()

    def _drop_spilled(self, slot: ModelSlot, conversation_id: str) -> dict[str, Any]:
        dropped = False
        if self.config.kv_cache.spill_dir:
            path = spill_path(self.config.kv_cache.spill_dir, slot.name, conversation_id)
            dropped = path.exists()
            path.unlink(missing_ok=True)
        return {"dropped": dropped, "conversation_id": conversation_id}

    def _answer_unload_waiters(self, slot: ModelSlot) -> None:
        status = model_entry(slot, time.time())
        for waiter in slot.unload_waiters:
            self._reply(waiter, status)
        slot.unload_waiters.clear()

    # ----- loading and unloading ------------------------------------------------------------------------------

    def schedule(self) -> None:
        """Place every model that waits to be loaded, or evict to make room, or give up on it (see policy)."""
        now = time.monotonic()
        pending = [
            s for s in self.slots.values() if s.state in (ModelState.UNLOADED, ModelState.FAILED) and s.wants_load
        ]
        for slot in sorted(pending, key=lambda s: (-s.spec.priority, s.pending_since or now)):
            slot.pending_since = slot.pending_since or now
            try:
                chosen = self.memory.choose(slot, list(self.slots.values()), now)
            except ModelManagerError as exc:
                self._fail_load(slot, exc)
                continue
            if chosen is None:
                continue  # a GGUF header is being read
            spec, needs, decision = chosen
            slot.plan = decision
            if decision.action == "place":
                self._start_load(slot, self.memory.place(slot, decision, needs, spec))
            elif decision.action == "evict":
                log.info("evicting", model=slot.name, victims=decision.evict, device=decision.device_ids[0])
                for victim in decision.evict:
                    self._maybe_unload(self.slots[victim], reason="pressure")
            elif decision.action == "fail" or now - slot.pending_since > self.config.scheduler.wait_for_memory_s:
                self._fail_load(slot, _insufficient_memory(slot, decision))

    def _start_load(self, slot: ModelSlot, spec: ModelSpec) -> None:
        slot.transition(ModelState.LOADING)
        slot.plan, slot.pending_since = None, None
        slot.load_started_at = time.monotonic()
        slot.load_spec = spec = self._with_threads(slot, spec)
        slot.threads = spec.n_threads
        slot.worker = self.workers.take(slot.name, slot.spec.kind)
        log.info(
            "model_loading",
            model=slot.name,
            device="+".join(slot.placements),
            reserved_mib=round(sum(slot.placements.values()) / MIB, 1),
            threads=slot.threads,
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
        self.workers.send(slot.worker, load)

    def _pump(self, slot: ModelSlot) -> None:
        """Start the next queued request if the model can take it; ask for a load if the model is not there."""
        if self.stopping and slot.state is not ModelState.READY:
            return
        if slot.state in (ModelState.UNLOADED, ModelState.FAILED):
            if slot.wants_load:
                self.schedule()
        elif slot.state is ModelState.READY:
            assert slot.worker is not None
            while slot.queue and slot.may_start(slot.queue.first()):
                job = slot.queue.popleft()
                job.started_at = time.monotonic()
                slot.running[job.key] = job
                if len(slot.running) == 1:
                    self._hand_out_threads()  # before the run: its worker steps with its new share
                run = wire.Run(rid=job.key, args=job.args, voice=job.latency_class == "voice")
                if job.deadline is not None and not job.stream:
                    # The client waits this much longer for the one reply: the worker stops past it. (A stream's
                    # client waits per chunk; if it goes away, the failed send of a chunk cancels the request.)
                    run.deadline_s = max(0.0, job.deadline - job.started_at)
                self.workers.send(slot.worker, run)

    # ----- CPU threads (see threads.py) -------------------------------------------------------------------------

    def _computing(self) -> list[threads.Computing]:
        return [
            threads.Computing(slot.name, slot.threads or 1, threads.adjustable(slot.spec))
            for slot in self.slots.values()
            if slot.running and slot.load_spec is not None and threads.computes_on_cpu(slot.load_spec)
        ]

    def _with_threads(self, slot: ModelSlot, spec: ModelSpec) -> ModelSpec:
        """The threads a model loads with: a speech model's fixed share; an LLM's share were it computing now."""
        budget = self.cpu_threads
        if budget is None or spec.n_threads is not None or not threads.computes_on_cpu(spec):
            return spec
        if not threads.adjustable(slot.spec):
            return msgspec.structs.replace(spec, n_threads=threads.fixed_share(budget))
        others = [c for c in self._computing() if c.name != slot.name]
        share = threads.shares(budget, [*others, threads.Computing(slot.name, 1, True)])[slot.name]
        return msgspec.structs.replace(spec, n_threads=share)

    def _hand_out_threads(self) -> None:
        """The set of models computing changed: tell each computing LLM whose share moved its new one."""
        if self.cpu_threads is None:
            return
        for name, n in threads.shares(self.cpu_threads, self._computing()).items():
            slot = self.slots[name]
            if n != slot.threads and slot.worker is not None:
                slot.threads = n
                self.workers.send(slot.worker, wire.Threads(n=n))
                log.debug("threads_assigned", model=name, threads=n)

    def _maybe_unload(self, slot: ModelSlot, reason: str = "requested") -> None:
        if slot.state is ModelState.READY and not slot.busy and slot.worker is not None:
            slot.transition(ModelState.UNLOADING)
            slot.unload_reason = reason
            self.workers.end(slot.worker, self.config.manager.unload_timeout_s)
            log.info("model_unloading", model=slot.name, reason=reason)

    def _finish(self, slot: ModelSlot, job: Job) -> None:
        slot.running.pop(job.key, None)
        if not slot.running:
            self._hand_out_threads()
        if job.started_at is not None and job.op != "conversation.drop":
            slot.service_s = policy.service_time(slot.service_s, time.monotonic() - job.started_at)
        slot.last_used, slot.last_used_mono = time.time(), time.monotonic()
        slot.requests_served += 1
        if slot.unload_waiters:
            self._maybe_unload(slot)
        self._pump(slot)
        if not slot.busy:
            self.schedule()  # a model that stopped being busy may now be evicted for one that waits

    def _fail_load(self, slot: ModelSlot, error: ModelManagerError) -> None:
        """Every request that needed this load gets ``error``; the model shows ``failed`` until asked again."""
        if slot.worker is not None:
            self.workers.end(slot.worker, self.config.manager.unload_timeout_s)
        slot.transition(ModelState.FAILED)
        slot.worker, slot.last_error, slot.info = None, error.to_wire(), {}
        slot.placements, slot.plan, slot.pending_since, slot.want_loaded = {}, None, None, False
        log.error("model_load_failed", model=slot.name, code=error.code, message=error.message)
        self.metrics.loads.labels(slot.name, "error").inc()
        self.outbox.publish(protocol.EVENT_MODEL_FAILED, model=slot.name, reason="load", error=error.to_wire())
        while slot.queue:
            self._reply_error(slot.queue.popleft(), error)
        for waiter in slot.load_waiters:
            self._reply_error(waiter, error)
        slot.load_waiters.clear()
        self._answer_unload_waiters(slot)

    # ----- the clock ------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Worker exits, the policy's time rules, client deadlines, memory coming back, spare workers."""
        self.reap()
        limits, manager = self.config.limits, self.config.manager
        for action in policy.due(self._facts(now), now, limits.request_timeout_s, manager.load_timeout_s):
            self._carry_out(action)
        for slot in self.slots.values():
            for job in slot.queue.expired(now):
                self._reply_error(
                    job,
                    Timeout(
                        "the client's deadline passed before the request could start", queued_s=now - job.received_at
                    ),
                )
                self._log_request(slot, job, "deadline")
        self.memory.prune_releasing(now)
        computing = any(s.state is ModelState.LOADING or s.running for s in self.slots.values())
        refill, self._spare_missing_since = policy.spare_due(
            len(self.workers.spares()), self._spare_missing_since, computing, now
        )
        if refill and not self.stopping and now >= self._spares_paused_until:
            self.workers.refill()

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
                idle_ttl_s=slot.idle_ttl_s,
                pinned=slot.pinned,
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
            self.schedule()

    # ----- the end --------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return any(slot.busy for slot in self.slots.values())

    def shutdown(self) -> None:
        """Fail what has not been answered, end every worker, then do the drops that waited for them."""
        stopped = ModelFailed("the model manager shut down before this request ran")
        for slot in self.slots.values():
            for job in [*slot.running.values(), *slot.queue]:
                self._reply_error(job, stopped)
            slot.queue.clear()
        self.workers.close(self.config.manager.unload_timeout_s)
        for slot in self.slots.values():  # every worker is gone: their files are the manager's now
            self._answer_drop_waiters(slot)


def _insufficient_memory(slot: ModelSlot, decision: Decision) -> InsufficientMemory:
    free = {device: round(bytes_ / MIB, 1) for device, bytes_ in decision.free.items()}
    reason = f"waited too long; {decision.reason}" if decision.action == "wait" else decision.reason
    return InsufficientMemory(
        f"{slot.name!r} needs {decision.need / MIB:.0f} MiB: {reason}",
        model=slot.name,
        needed_mib=round(decision.need / MIB, 1),
        free_mib=free,
    )
