"""The whole scheduling policy, in one place, as pure functions over a snapshot and the time.

Where and whom: the broker describes the world (devices, what each model reserves where, which models are busy)
and asks ``plan_placement`` where a model should go; the answer is one ``Decision``: place it, evict these first,
wait, or fail with ``insufficient_memory``. When: ``due`` reads each model's facts and returns what the time calls
for (kill a worker whose request or load ran too long, unload an idle model, place models that wait), and
``spare_due`` says when to start a spare worker. The broker only carries the actions out.

When, per model, each tick (the first rule that applies):
a. A request running longer than ``limits.request_timeout_s``: kill the worker (its requests get ``timeout``).
b. A load running longer than ``manager.load_timeout_s``: kill the worker (``model_load_failed``).
c. A ready model, idle (no request running or queued) for its ``idle_ttl_s`` (0: after each request, -1: never)
   and not pinned: unload it.
d. A request whose client gave a deadline is admitted only when its predicted wait fits it (``admission``):
   the requests ahead of it at its priority or higher, served ``parallel`` at a time at the model's measured
   service time. Otherwise it gets ``busy`` at once, with when to try again, instead of a ``timeout`` later.
And: when any unloaded or failed model has requests waiting, place it (below); start a spare worker when none is
there and nothing loads or computes (a spare starting beside a fresh load slows its first token), or once one has
been missing for ``SPARE_MAX_DELAY_S`` anyway.

Where and whom, in order:
1. A model pinned to a GPU (``gpu: N``) goes there or nowhere. A model with ``n_gpu_layers: 0`` goes to the CPU.
   Any other model goes to the GPU with the most memory free after reservations, then (``allow_split``, LLMs
   only) split over several GPUs, then (``allow_cpu_fallback``) to the CPU.
2. On each candidate device, first without evicting anything, then evicting the cheapest models to lose:
   lower ``priority`` first, then the least cost of reloading (measured load time x recent demand, where demand
   decays with ``demand_half_life_s``), then the least recently used.
3. Never evicted: ``pinned`` models, models with requests in flight or queued, models being loaded, and (against
   thrashing) a model that served a request less than ``hold_after_use_s`` ago, unless the waiting request has
   waited ``max_wait_s``.
4. If memory would be enough once busy or held models are done, or once models already unloading have gone, wait
   (the broker fails the request after ``wait_for_memory_s``). If not even that: ``insufficient_memory`` now.
5. A model only partly offloaded (``n_gpu_layers`` below its layer count) books its GPU share on the GPU and the
   rest on the host: a GPU is a candidate only while the host has room for that rest (nothing is evicted from the
   host for it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from model_manager.config import MIB, DeviceSettings, SchedulerSettings
from model_manager.devices import Device


@dataclass(frozen=True)
class Resident:
    """A model that holds (or is about to hold) memory on a device."""

    name: str
    placements: dict[str, int]  # device id -> bytes reserved there
    priority: int
    pinned: bool
    busy: bool  # requests in flight or queued
    unloading: bool
    loading: bool
    last_used: float  # monotonic seconds
    load_ms: float
    demand: float


@dataclass(frozen=True)
class PlacementRequest:
    name: str
    need_gpu: int  # bytes on a GPU
    need_cpu: int  # bytes on the CPU
    wants_gpu: bool
    pinned_gpu: int | None
    waited_s: float
    splittable: bool = True  # llama.cpp can split a model over GPUs; the speech engines cannot
    host_share: int = 0  # bytes that stay on the host when it goes to a GPU (the layers a partial offload keeps)


@dataclass
class Decision:
    action: str  # "place", "evict", "wait" or "fail"
    device_ids: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] | None = None
    evict: list[str] = field(default_factory=list)
    need: int = 0
    reason: str = ""
    free: dict[str, int] = field(default_factory=dict)
    host_share: int = 0  # bytes booked on the host beside a GPU placement (a partial offload)


@dataclass(frozen=True)
class DeviceView:
    device: Device
    reserved: int
    headroom: int
    loaded: int
    budget: int | None = None  # devices.gpus max_mib: the most the manager's models book here together

    @property
    def free(self) -> int:
        """What a new model may book: the device's free memory less headroom, and never past the budget (evicting a
        model frees as much of both, so eviction arithmetic holds)."""
        free = self.device.total - self.device.used_by_others - self.reserved - self.headroom
        return free if self.budget is None else min(free, self.budget - self.reserved)


def device_views(devices: list[Device], residents: list[Resident], settings: DeviceSettings) -> list[DeviceView]:
    budgets = {gpu.index: gpu for gpu in settings.gpus}
    views = []
    for device in devices:
        on_it = [r.placements[device.id] for r in residents if device.id in r.placements]
        headroom_mib = settings.gpu_headroom_mib if device.kind == "gpu" else settings.host_headroom_mib
        budget = budgets.get(device.index) if device.kind == "gpu" and device.index is not None else None
        if budget is not None and budget.headroom_mib is not None:
            headroom_mib = budget.headroom_mib
        ceiling = budget.max_mib * MIB if budget is not None and budget.max_mib is not None else None
        views.append(DeviceView(device, sum(on_it), headroom_mib * MIB, len(on_it), ceiling))
    return views


def reload_cost(resident: Resident) -> float:
    return resident.load_ms * resident.demand


def eviction_order(residents: list[Resident]) -> list[Resident]:
    """Cheapest to lose first: priority, then reload cost (load time x demand), then least recently used."""
    return sorted(residents, key=lambda r: (r.priority, reload_cost(r), r.last_used))


def decay_demand(demand: float, elapsed_s: float, half_life_s: float) -> float:
    return demand * math.pow(0.5, elapsed_s / half_life_s)


def _evictable(r: Resident, now: float, waited_s: float, sched: SchedulerSettings, ignore_busy: bool) -> bool:
    if r.pinned:
        return False
    if ignore_busy:  # what will become evictable once its requests, its load or its hold are over
        return True
    if r.unloading or r.loading or r.busy:
        return False
    return now - r.last_used >= sched.hold_after_use_s or waited_s >= sched.max_wait_s


def _candidates(request: PlacementRequest, views: list[DeviceView], settings: DeviceSettings) -> list[DeviceView]:
    gpus = sorted((v for v in views if v.device.kind == "gpu"), key=lambda v: v.free, reverse=True)
    host = [v for v in views if v.device.kind == "cpu"]
    if request.pinned_gpu is not None:
        return [v for v in gpus if v.device.index == request.pinned_gpu]
    if not request.wants_gpu:
        return host
    return gpus + (host if settings.allow_cpu_fallback else [])


def _need(request: PlacementRequest, view: DeviceView) -> int:
    return request.need_gpu if view.device.kind == "gpu" else request.need_cpu


def plan_placement(
    request: PlacementRequest,
    devices: list[Device],
    residents: list[Resident],
    settings: DeviceSettings,
    sched: SchedulerSettings,
    now: float,
) -> Decision:
    views = device_views(devices, residents, settings)
    candidates = _candidates(request, views, settings)
    free = {v.device.id: v.free for v in views}
    if not candidates:
        where = f"GPU {request.pinned_gpu}" if request.pinned_gpu is not None else "a GPU or the CPU"
        return Decision("fail", need=request.need_gpu, reason=f"{where} is not available", free=free)
    max_loaded = settings.max_loaded_models

    def count_ok(view: DeviceView, evicted: int = 0) -> bool:
        return not max_loaded or view.loaded - evicted < max_loaded

    host_room = next((v.free for v in views if v.device.kind == "cpu"), 0)
    if request.host_share:  # a partial offload: a GPU is only a candidate while the host takes the rest
        candidates = [v for v in candidates if v.device.kind != "gpu" or request.host_share <= host_room]
        if not candidates:
            reason = f"the host has no room for the {request.host_share / MIB:.0f} MiB of layers kept off the GPU"
            return Decision("fail", need=request.need_gpu, reason=reason, free=free)

    def placed(view: DeviceView, action: str = "place", evict: list[str] | None = None) -> Decision:
        share = request.host_share if view.device.kind == "gpu" else 0
        need = _need(request, view)
        return Decision(action, (view.device.id,), evict=evict or [], need=need, free=free, host_share=share)

    # 1. A device with room now.
    for view in candidates:
        if _need(request, view) <= view.free and count_ok(view):
            return placed(view)
    # 2. Evict the cheapest models on one device.
    waited = request.waited_s
    for view in candidates:
        need = _need(request, view)
        evictable = [
            r for r in residents if view.device.id in r.placements and _evictable(r, now, waited, sched, False)
        ]
        victims, room = [], view.free
        for r in eviction_order(evictable):
            if room >= need and count_ok(view, len(victims)):
                break
            victims.append(r.name)
            room += r.placements[view.device.id]
        if room >= need and count_ok(view, len(victims)) and victims:
            return placed(view, "evict", victims)
    # 3. Split over several GPUs, without evicting.
    gpus = [v for v in candidates if v.device.kind == "gpu" and v.free > 0 and count_ok(v)]
    if settings.allow_split and request.splittable and request.pinned_gpu is None and len(gpus) > 1:
        context = settings.cuda_context_mib * MIB
        usable = {v.device.id: v.free - context for v in gpus if v.free > context}
        weights_and_kv = request.need_gpu - context
        if len(usable) > 1 and sum(usable.values()) >= weights_and_kv:
            total = sum(usable.values())
            ids = tuple(sorted(usable))
            return Decision(
                "place",
                ids,
                tensor_split=tuple(round(usable[i] / total, 4) for i in ids),
                need=request.need_gpu,
                free=free,
                host_share=request.host_share,
            )
    # 4. Wait for busy, held or unloading models, or give up.
    for view in candidates:
        need = _need(request, view)
        releasable = sum(
            r.placements[view.device.id]
            for r in residents
            if view.device.id in r.placements and _evictable(r, now, waited, sched, True)
        )
        if view.free + releasable >= need:
            return Decision("wait", (view.device.id,), need=need, reason="memory is held by models in use", free=free)
    need = min(_need(request, v) for v in candidates)
    return Decision(
        "fail",
        need=need,
        reason="no device can hold the model, even after evicting every model that may be evicted",
        free=free,
    )


def idle_expired(idle_s: float | None, ttl_s: float, pinned: bool) -> bool:
    """Keep-alive: ``ttl_s`` 0 unloads after each request, -1 never; pinned models stay."""
    return not pinned and ttl_s >= 0 and idle_s is not None and idle_s >= ttl_s


# ----- when: timers, idle models, spares ------------------------------------------------------------------------

SPARE_MAX_DELAY_S = 10.0


@dataclass(frozen=True)
class ModelFacts:
    """What the "when" rules read of one model, at one instant (monotonic seconds)."""

    name: str
    state: str  # a ModelState value
    live_worker: bool  # it has a worker that is not already on its way out
    oldest_run_started: float | None = None  # the request running longest, when it started
    load_started: float | None = None
    idle_s: float | None = None  # None while it has requests running or queued
    idle_ttl_s: float = 300.0
    pinned: bool = False
    waiting: bool = False  # requests or load requests wait for it


@dataclass(frozen=True)
class KillWorker:
    model: str
    reason: str  # request_timeout | load_timeout


@dataclass(frozen=True)
class Unload:
    model: str
    reason: str  # idle


@dataclass(frozen=True)
class PlaceWaiting:
    """Unloaded or failed models have requests waiting: run ``plan_placement`` for them."""


Action = KillWorker | Unload | PlaceWaiting


def due(models: list[ModelFacts], now: float, request_timeout_s: float, load_timeout_s: float) -> list[Action]:
    actions: list[Action] = []
    for m in models:
        if not m.live_worker:
            continue
        if m.oldest_run_started is not None and now - m.oldest_run_started > request_timeout_s:
            actions.append(KillWorker(m.name, "request_timeout"))
        elif m.state == "loading" and m.load_started is not None and now - m.load_started > load_timeout_s:
            actions.append(KillWorker(m.name, "load_timeout"))
        elif m.state == "ready" and idle_expired(m.idle_s, m.idle_ttl_s, m.pinned):
            actions.append(Unload(m.name, "idle"))
    if any(m.waiting and m.state in ("unloaded", "failed") for m in models):
        actions.append(PlaceWaiting())
    return actions


SERVICE_EWMA = 0.2  # weight of the newest request in a model's mean service time


def service_time(mean_s: float | None, took_s: float) -> float:
    """A model's mean time per request, moved towards the one just served."""
    return took_s if mean_s is None else (1 - SERVICE_EWMA) * mean_s + SERVICE_EWMA * took_s


def admission(ahead: int, capacity: int, service_s: float | None, wait_allowed_s: float | None) -> float | None:
    """None to admit a request; else the seconds after which one would fit. ``ahead``: requests running or queued
    before it (at its priority or higher); ``wait_allowed_s``: until its client's deadline (None: no deadline)."""
    if wait_allowed_s is None or service_s is None or ahead < capacity:
        return None  # no deadline, nothing measured yet, or a free place now
    rounds = ahead // capacity  # full rounds of service before its turn
    wait_s = rounds * service_s
    if wait_s <= wait_allowed_s:
        return None
    return wait_s - wait_allowed_s


def spare_due(spares: int, missing_since: float | None, computing: bool, now: float) -> tuple[bool, float | None]:
    """Whether to start a spare worker now, and since when one has been missing (the caller keeps it)."""
    if spares:
        return False, None
    missing_since = missing_since if missing_since is not None else now
    return (not computing or now - missing_since > SPARE_MAX_DELAY_S), missing_since
