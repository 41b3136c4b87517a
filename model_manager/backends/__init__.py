"""Model engines behind one interface. Only worker processes import a backend, so an engine crash ends a worker.

Each backend loads one model and runs the ops of its kind; ``emit`` sends a streamed chunk to the client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from model_manager.config import KvCacheSettings, Limits, ModelSpec
from model_manager.worker_protocol import RunArgs

Emit = Callable[[dict[str, Any]], None]
# A result or chunk may carry binary data (audio) under this key: the manager sends it as its own frame.
PAYLOAD = "_payload"


class Backend(Protocol):
    batchable_ops: frozenset[str]  # ops whose concurrent requests the worker collects for ``run_batch``
    batch_size: int  # at most this many per batch...
    batch_wait_s: float  # ...collected for at most this long after the first
    should_stop: Callable[[], bool]  # asked between steps of a long request: stop early (client gone, deadline)

    def load(
        self, spec: ModelSpec, name: str, kv: KvCacheSettings | None, limits: Limits | None = None
    ) -> dict[str, Any]:
        """Load the model; return facts about it (load time, quantization, sizes). Raise ModelLoadFailed."""

    def warm_up(self) -> None:
        """Run the smallest request once, so the first real one finds every buffer in place."""

    def run(self, op: str, args: RunArgs, emit: Emit) -> dict[str, Any]:
        """Serve one request; stream chunks through ``emit`` and return the final result."""

    def run_batch(self, op: str, batch: list[RunArgs]) -> list[dict[str, Any] | Exception]:
        """Serve several requests of a batchable op together; one result or error per request, in order."""

    def after_reply(self, idle: bool) -> None:
        """Work that can wait until the reply is sent (saving a conversation's state)."""

    def kv_stats(self) -> dict[str, int] | None:
        """Saved conversation states: count, bytes in RAM, files on disk; None if the kind keeps none."""

    def unload(self) -> None:
        """Called before an orderly exit."""


def warm_up(kind: str) -> None:
    """Import the engine of ``kind`` ahead of time, so a spare worker's load costs only the model's own."""
    create_backend(kind)


def create_backend(kind: str) -> Backend:
    if kind == "llm":  # every `parallel`, 1 included: one engine
        from model_manager.backends.llm.backend import GGUFBackend

        return GGUFBackend()
    if kind == "stt":
        from model_manager.backends.whisper import WhisperBackend

        return WhisperBackend()
    if kind == "tts":
        from model_manager.backends.piper import PiperBackend

        return PiperBackend()
    raise ValueError(f"no backend for model kind {kind!r}")
