"""What the manager knows of each catalogue model: its state, its worker, its queue and its counters."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from model_manager.config import ModelSpec
from model_manager.workers import WorkerHandle


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass
class Job:
    """One client request waiting for, or running on, a model's worker."""

    route: list[bytes]  # ROUTER identity frames up to and including the empty delimiter
    request_id: str
    op: str
    args: dict[str, Any]
    received_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None

    @property
    def stream(self) -> bool:
        return bool(self.args.get("stream"))


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
    queue: deque[Job] = field(default_factory=deque)
    running: Job | None = None
    load_waiters: list[Waiter] = field(default_factory=list)
    unload_waiters: list[Waiter] = field(default_factory=list)
    unload_reason: str = "requested"
    load_started_at: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    last_error: dict[str, Any] | None = None
    last_used: float | None = None  # wall-clock seconds
    requests_served: int = 0

    @property
    def busy(self) -> bool:
        return self.running is not None or bool(self.queue)

    def idle_for(self, now: float) -> float | None:
        return None if self.last_used is None or self.busy else max(0.0, now - self.last_used)
