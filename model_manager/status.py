"""What ``status`` and ``models`` report: plain maps built from the manager's state, nothing decided here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from model_manager.devices import Device
from model_manager.footprint import files_bytes
from model_manager.policy import DeviceView
from model_manager.slots import ModelSlot, ModelState
from model_manager.speech_facts import speech_facts


def device_entry(view: DeviceView) -> dict[str, Any]:
    device: Device = view.device
    return {
        "id": device.id,
        "name": device.name,
        "kind": device.kind,
        "simulated": device.simulated,
        "total_bytes": device.total,
        "used_by_others_bytes": device.used_by_others,
        "reserved_bytes": view.reserved,
        "headroom_bytes": view.headroom,
        "budget_bytes": view.budget,
        "free_bytes": max(0, view.free),
        "models": view.loaded,
    }


def model_entry(slot: ModelSlot, now: float) -> dict[str, Any]:
    idle = slot.idle_for(now)
    ttl = slot.idle_ttl_s
    loaded = slot.state is ModelState.READY
    ttl_left = None
    if idle is not None and loaded and ttl >= 0 and not slot.pinned:
        ttl_left = round(max(0.0, ttl - idle), 1)
    waiting = slot.plan.reason if slot.plan is not None and slot.state is ModelState.UNLOADED else None
    return {
        "name": slot.name,
        "kind": slot.spec.kind,
        "state": slot.state.value,
        "device": "+".join(slot.placements) or None,
        "placements": dict(slot.placements),
        "threads": slot.threads if slot.worker is not None else None,
        "pid": slot.worker.pid if slot.worker else None,
        "quantization": slot.info.get("quantization", slot.spec.quantization),
        "variant": (slot.load_spec or slot.spec).quantization if slot.spec.variants and slot.load_spec else None,
        "variants": [v.quantization for v in slot.spec.variants],
        "n_ctx": slot.info.get("n_ctx", slot.spec.n_ctx),
        "size_bytes": sum(slot.placements.values()) or None,
        "estimated_bytes": slot.estimate.total if slot.estimate else None,
        "measured_bytes": slot.measured,
        "load_ms": slot.info.get("load_ms"),
        "pinned": slot.pinned,
        "priority": slot.spec.priority,
        "in_flight": len(slot.running),
        "queued": len(slot.queue),
        "queued_by_class": slot.queue.by_class(),
        "requests": slot.requests_served,
        "last_used": slot.last_used,
        "idle_s": round(idle, 1) if idle is not None and loaded else None,
        "ttl_s": ttl,
        "ttl_left_s": ttl_left,
        "waiting_for": waiting,
        "parallel": slot.capacity - slot.voice_sequences,
        "voice_sequences": slot.voice_sequences,
        "waits": {kind: waits.report() for kind, waits in slot.waits.items()},
        "batching": slot.batching or None if loaded else None,
        "kv_cache": slot.kv_stats or None,
        "last_error": slot.last_error,
    }


def catalogue_entry(slot: ModelSlot) -> dict[str, Any]:
    path = Path(slot.spec.path)
    return {
        **msgspec.to_builtins(slot.spec),
        "name": slot.name,
        "state": slot.state.value,
        "file_exists": path.exists(),
        "file_bytes": files_bytes(str(path)) if path.exists() else None,
        **speech_facts(slot.spec.kind, str(path)),
    }


def manager_report(
    *,
    manager: dict[str, Any],
    inventory: dict[str, Any],
    views: list[DeviceView],
    slots: list[ModelSlot],
    now: float,
) -> dict[str, Any]:
    """The whole ``status`` answer: the manager's own facts, each memory pool, each model."""
    return {
        "manager": manager,
        "devices": {**inventory, "list": [device_entry(view) for view in views]},
        "models": [model_entry(slot, now) for slot in slots],
    }


def heartbeat(pid: int, uptime_s: float, slots: list[ModelSlot]) -> dict[str, Any]:
    return {"pid": pid, "uptime_s": round(uptime_s, 1), "models": {slot.name: slot.state.value for slot in slots}}
