"""Saved KV-cache states of conversations, per model: an LRU in RAM under a byte budget, with a TTL, and
optionally spilled to disk so a conversation survives eviction and a daemon restart.

A state is the token ids a context held and the engine's opaque state bytes for them. This module knows nothing
of the engine; the GGUF backend saves and restores the bytes. Files are named by a hash of the conversation id,
inside a directory per model, and carry the model's identity so a state is never restored into another model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import structlog

SPILL_SUFFIX = ".kvstate"
FILE_VERSION = 1

log = structlog.get_logger("model_manager.kvcache")


@dataclass
class SavedState:
    tokens: list[int]
    state: bytes | bytearray  # the engine's, as it wrote them
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return len(self.state) + 4 * len(self.tokens)


def model_folder(model: str) -> str:
    """A model's folder name: a pulled ``hf.co/ORG/REPO:QUANT`` name holds slashes."""
    return model.replace("/", "--")


def spill_path(spill_dir: str | Path, model: str, conversation_id: str) -> Path:
    digest = hashlib.sha256(conversation_id.encode()).hexdigest()[:40]
    return Path(spill_dir) / model_folder(model) / f"{digest}{SPILL_SUFFIX}"


class ConversationStore:
    def __init__(
        self,
        model: str,
        model_key: str,
        budget_bytes: int,
        ttl_s: float,
        spill_dir: str | None = None,
        disk_ttl_s: float = 86400.0,
    ) -> None:
        self.model = model
        self.model_key = model_key
        self.budget = budget_bytes
        self.ttl_s = ttl_s
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self.disk_ttl_s = disk_ttl_s
        self.states: OrderedDict[str, SavedState] = OrderedDict()
        if self.spill_dir is not None:
            (self.spill_dir / model_folder(model)).mkdir(parents=True, exist_ok=True)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states.values())

    def get(self, conversation_id: str) -> SavedState | None:
        saved = self.states.get(conversation_id)
        if saved is None:
            saved = self._read_spilled(conversation_id)
            if saved is None:
                return None
            self.states[conversation_id] = saved
            self._fit_budget(keep=conversation_id)
        self.states.move_to_end(conversation_id)
        saved.last_used = time.monotonic()
        return saved

    def put(self, conversation_id: str, tokens: list[int], state: bytes | bytearray) -> None:
        self.states[conversation_id] = SavedState(tokens, state)
        self.states.move_to_end(conversation_id)
        self._fit_budget(keep=conversation_id)

    def drop(self, conversation_id: str) -> bool:
        found = self.states.pop(conversation_id, None) is not None
        if self.spill_dir is not None:
            path = spill_path(self.spill_dir, self.model, conversation_id)
            if path.exists():
                path.unlink()
                found = True
        return found

    def expire(self, now: float | None = None) -> None:
        """TTL: states unused for ``ttl_s`` leave RAM (for the disk, where configured); old files are deleted."""
        now = time.monotonic() if now is None else now
        for conversation_id, saved in list(self.states.items()):
            if now - saved.last_used >= self.ttl_s:
                self._evict(conversation_id, "ttl")
        if self.spill_dir is not None:
            cutoff = time.time() - self.disk_ttl_s
            for path in (self.spill_dir / model_folder(self.model)).glob(f"*{SPILL_SUFFIX}"):
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)

    def spill_all(self) -> None:
        """Write every state to disk (on an orderly unload), so the conversations outlive this worker."""
        if self.spill_dir is not None:
            for conversation_id, saved in self.states.items():
                self._write_spilled(conversation_id, saved)

    def stats(self) -> dict[str, int]:
        spilled = 0
        if self.spill_dir is not None:
            spilled = sum(1 for _ in (self.spill_dir / model_folder(self.model)).glob(f"*{SPILL_SUFFIX}"))
        return {"conversations": len(self.states), "bytes": self.nbytes, "spilled": spilled}

    def _fit_budget(self, keep: str) -> None:
        total = self.nbytes
        for conversation_id in list(self.states):
            if total <= self.budget:
                return
            if conversation_id == keep:
                continue
            total -= self.states[conversation_id].nbytes
            self._evict(conversation_id, "budget")

    def _evict(self, conversation_id: str, reason: str) -> None:
        saved = self.states.pop(conversation_id)
        if self.spill_dir is not None:
            self._write_spilled(conversation_id, saved)
        log.debug("conversation_evicted", model=self.model, reason=reason, spilled=self.spill_dir is not None)

    def _write_spilled(self, conversation_id: str, saved: SavedState) -> None:
        assert self.spill_dir is not None
        path = spill_path(self.spill_dir, self.model, conversation_id)
        record = {
            "v": FILE_VERSION,
            "model_key": self.model_key,
            "conversation_id": conversation_id,
            "tokens": array("i", saved.tokens).tobytes(),
            "state": saved.state,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(msgpack.packb(record, use_bin_type=True))
        os.replace(tmp, path)

    def _read_spilled(self, conversation_id: str) -> SavedState | None:
        if self.spill_dir is None:
            return None
        path = spill_path(self.spill_dir, self.model, conversation_id)
        try:
            record = msgpack.unpackb(path.read_bytes(), raw=False)
        except (OSError, ValueError, msgpack.UnpackException):
            return None
        if (
            not isinstance(record, dict)
            or record.get("v") != FILE_VERSION
            or record.get("model_key") != self.model_key
            or record.get("conversation_id") != conversation_id
        ):
            return None
        tokens = array("i")
        tokens.frombytes(record["tokens"])
        return SavedState(tokens.tolist(), record["state"])
