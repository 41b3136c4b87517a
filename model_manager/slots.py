"""What the manager knows of each catalogue model: its state, its worker, its queue and its counters."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from model_client.protocol import latency_class
from model_manager.config import ModelSpec, sequences
from model_manager.footprint import Estimate
from model_manager.policy import Decision
from model_manager.pool import WorkerHandle
from model_manager.worker_protocol import RunArgs


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


# The life of a model, every state change it may make. FAILED is left like UNLOADED (a new request loads it again)
# and may be entered again without a worker (a load given up before it started: no memory, no file).
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.UNLOADED: frozenset({ModelState.LOADING, ModelState.FAILED}),
    ModelState.FAILED: frozenset({ModelState.LOADING, ModelState.FAILED}),
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.FAILED}),
    ModelState.READY: frozenset({ModelState.UNLOADING, ModelState.FAILED}),
    ModelState.UNLOADING: frozenset({ModelState.UNLOADED}),
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in the manager, never a client's doing."""


_job_keys = itertools.count(1)


@dataclass
class Job:
    """One client request waiting for, or running on, a model's worker."""

    route: list[bytes]  # ROUTER identity frames up to and including the empty delimiter
    request_id: str  # the client's own id: echoed in its replies, unique only among that client's requests
    op: str
    args: RunArgs  # as the worker reads them
    received_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    priority: int = 50
    deadline: float | None = None  # monotonic: the client has given up after this
    cancelled: bool = False  # the client went away: its reply goes nowhere
    # The manager's own id for it, unique in this process: what the worker and the running table know it by, so
    # two clients' equal ids never meet.
    key: str = field(default_factory=lambda: str(next(_job_keys)))
    keep_alive_s: float | None = None  # the client's keep-alive for the model after this request (None: the YAML's)

    @property
    def client_key(self) -> tuple[bytes, str]:
        """The client (its route) and its id: unique among the requests in flight."""
        return b"\0".join(self.route), self.request_id

    @property
    def stream(self) -> bool:
        return bool(getattr(self.args, "stream", False))

    @property
    def latency_class(self) -> str:
        return latency_class(self.priority)

    @property
    def queue_wait_s(self) -> float:
        """From the manager's receiving it to its start (0 while it waits)."""
        return 0.0 if self.started_at is None else self.started_at - self.received_at


@dataclass
class ClassWaits:
    """How long the requests of one latency class waited for their model: what ``status`` shows."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def add(self, waited_s: float) -> None:
        self.count += 1
        self.total_s += waited_s
        self.max_s = max(self.max_s, waited_s)

    def report(self) -> dict[str, float]:
        mean = self.total_s / self.count if self.count else 0.0
        return {"count": self.count, "mean_ms": round(mean * 1000, 1), "max_ms": round(self.max_s * 1000, 1)}


class JobQueue:
    """A model's waiting requests: highest priority first, first come first served within a priority."""

    def __init__(self) -> None:
        self._jobs: list[Job] = []

    def append(self, job: Job) -> None:
        index = len(self._jobs)
        while index > 0 and self._jobs[index - 1].priority < job.priority:
            index -= 1
        self._jobs.insert(index, job)

    def popleft(self) -> Job:
        return self._jobs.pop(0)

    def first(self) -> Job:
        return self._jobs[0]

    def expired(self, now: float) -> list[Job]:
        """Take out the jobs whose client has given up waiting."""
        gone = [job for job in self._jobs if job.deadline is not None and now > job.deadline]
        if gone:
            ids = {id(job) for job in gone}
            self._jobs = [job for job in self._jobs if id(job) not in ids]
        return gone

    def clear(self) -> None:
        self._jobs.clear()

    def by_class(self) -> dict[str, int]:
        """Waiting requests per latency class (voice, chat, batch), the classes with none left out."""
        counts: dict[str, int] = {}
        for job in self._jobs:
            counts[job.latency_class] = counts.get(job.latency_class, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self._jobs)

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def __iter__(self):
        return iter(list(self._jobs))

    def ahead_of(self, priority: int) -> int:
        """Queued requests that would run before a new one of ``priority``."""
        return sum(1 for job in self._jobs if job.priority >= priority)


@dataclass
class Waiter:
    """A ``load`` or ``unload`` request answered when the model reaches the state it asked for."""

    route: list[bytes]
    request_id: str


@dataclass
class ModelSlot:
    name: str
    spec: ModelSpec
    state: ModelState = ModelState.UNLOADED
    worker: WorkerHandle | None = None
    queue: JobQueue = field(default_factory=JobQueue)
    running: dict[str, Job] = field(default_factory=dict)  # by Job.key; several for a batching model
    load_waiters: list[Waiter] = field(default_factory=list)
    unload_waiters: list[Waiter] = field(default_factory=list)
    # conversation.drop requests that came while a worker was exiting: its files are its own until it is gone
    drop_waiters: list[tuple[Waiter, str]] = field(default_factory=list)
    unload_reason: str = "requested"
    load_started_at: float | None = None
    load_spec: ModelSpec | None = None  # the spec as placed (device overrides applied)
    threads: int | None = None  # the CPU threads its worker was last told to use (None: the engine's default)
    info: dict[str, Any] = field(default_factory=dict)
    last_error: dict[str, Any] | None = None
    last_used: float | None = None  # wall-clock seconds
    last_used_mono: float = 0.0
    requests_served: int = 0
    demand: float = 0.0  # requests, decayed over time (the scheduler's "recent demand")
    service_s: float | None = None  # mean seconds a request takes once started (for admission by deadline)
    want_loaded: bool = False  # preload: load without a request waiting
    # Placement: where the model is (or is going), and what it reserves there.
    placements: dict[str, int] = field(default_factory=dict)
    tensor_split: tuple[float, ...] | None = None
    host_share: int = 0  # a partial offload's bytes on the host, beside its GPU share
    estimate: Estimate | None = None
    measured: int | None = None
    kv_stats: dict[str, int] = field(default_factory=dict)  # the worker's saved conversation states
    batching: dict[str, float] = field(default_factory=dict)  # a batching worker's last figures
    waits: dict[str, ClassWaits] = field(default_factory=dict)  # by latency class, since the manager started
    plan: Decision | None = None  # the scheduler's last answer while the model waits for memory
    keep_alive_s: float | None = None  # the last request's keep-alive, until the model unloads (None: the YAML's)
    pending_since: float | None = None
    pin: bool | None = None  # set by the `pin` op while the manager runs; None: the catalogue's `pinned`

    def transition(self, to: ModelState) -> None:
        """The one way a model changes state, checked against ``TRANSITIONS``."""
        if to not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.name}: {self.state} -> {to} is not a state change a model makes")
        self.state = to
        if to in (ModelState.UNLOADED, ModelState.FAILED):
            self.keep_alive_s = None  # a client's keep-alive lasts as long as the model it kept

    @property
    def idle_ttl_s(self) -> float:
        """How long it stays loaded once idle: the last request's keep-alive, else the catalogue's (-1: ever)."""
        if self.keep_alive_s is None:
            return self.spec.idle_ttl_s
        return -1.0 if self.keep_alive_s < 0 else self.keep_alive_s

    @property
    def pinned(self) -> bool:
        return self.spec.pinned if self.pin is None else self.pin

    @property
    def busy(self) -> bool:
        return bool(self.running) or bool(self.queue)

    @property
    def kv_bytes(self) -> int:
        return int(self.kv_stats.get("bytes", 0))

    @property
    def wants_load(self) -> bool:
        return bool(self.queue or self.load_waiters or self.want_loaded)

    @property
    def capacity(self) -> int:
        """Requests the worker may hold at once: Whisper's batch size, an LLM's sequences (its voice ones
        included), else one."""
        if self.spec.kind == "stt":
            return self.spec.batch_size
        return sequences(self.spec) if self.spec.kind == "llm" else 1

    @property
    def voice_sequences(self) -> int:
        """An LLM's sequences kept for voice requests beyond ``parallel``."""
        return sequences(self.spec) - (self.spec.parallel or 1) if self.spec.kind == "llm" else 0

    def may_start(self, job: Job) -> bool:
        """A free place for ``job``: a voice request may take any sequence, others only ``parallel`` of them."""
        if len(self.running) >= self.capacity:
            return False
        if self.spec.kind != "llm" or job.latency_class == "voice":
            return True
        others = sum(1 for j in self.running.values() if j.latency_class != "voice")
        return others < self.capacity - self.voice_sequences

    def idle_for(self, now: float) -> float | None:
        return None if self.last_used is None or self.busy else max(0.0, now - self.last_used)
