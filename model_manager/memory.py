"""Memory accounting: what each model needs, what it holds where, and memory on its way back after an unload.

It joins the device inventory, the footprint store and the scheduler's policy: the agent asks ``plan`` for a
waiting model and carries out the decision; it reports loads and worker exits here so the books stay right.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import msgspec
import structlog

from model_client.errors import ModelLoadFailed
from model_manager.config import MIB, Config, ModelSpec, sequences
from model_manager.devices import HOST, Device, open_inventory, process_rss
from model_manager.footprint import (
    DEFAULT_WORKER_BASE,
    FootprintStore,
    GgufFacts,
    estimate_gguf,
    estimate_speech,
    files_bytes,
)
from model_manager.policy import Decision, DeviceView, PlacementRequest, Resident, device_views, plan_placement
from model_manager.pool import WorkerPool
from model_manager.slots import ModelSlot, ModelState

DEFAULT_LOAD_MS = 1000.0
log = structlog.get_logger("model_manager.memory")


@dataclass
class Releasing:
    """A GPU worker that has exited, whose memory NVML has not shown back yet."""

    name: str
    pid: int
    placements: dict[str, int]
    deadline: float


def _with_kv_states(slot: ModelSlot) -> dict[str, int]:
    """Saved conversation states live in the worker's RAM: count them on the host, wherever the model is."""
    if not slot.kv_bytes:
        return slot.placements
    placements = dict(slot.placements)
    placements["cpu"] = placements.get("cpu", 0) + slot.kv_bytes
    return placements


def variant_specs(spec: ModelSpec) -> list[ModelSpec]:
    """The model as each of its files, best first (the pinned ``variant`` alone; the model itself without any)."""
    chosen = [v for v in spec.variants if spec.variant in (None, v.quantization)]
    return [msgspec.structs.replace(spec, path=v.path, quantization=v.quantization) for v in chosen] or [spec]


class MemoryAccounting:
    def __init__(self, config: Config, pool: WorkerPool) -> None:
        self.config = config
        self.pool = pool
        self.inventory = open_inventory(config.devices)
        self.store = FootprintStore(config.manager.state_dir)
        self.worker_base = DEFAULT_WORKER_BASE
        self.releasing: list[Releasing] = []

    # ----- sizes ----------------------------------------------------------------------------------------------

    def runs_on_gpu(self, device: Device) -> bool:
        """Simulated GPUs account models as they really run: on the CPU."""
        return device.kind == "gpu" and not device.simulated

    def measured_key(self, spec: ModelSpec, on_gpu: bool) -> str:
        file_key = self.store.file_key(spec.path) or spec.path
        where = f"gpu:{spec.n_gpu_layers}" if on_gpu else "cpu"
        if spec.kind != "llm":
            return f"{file_key}|{spec.kind}|{spec.compute_type}|batch={spec.batch_size}|{where}"
        parallel = f"|parallel={sequences(spec)}" if (spec.parallel or 1) > 1 else ""
        return f"{file_key}|ctx={spec.n_ctx}|batch={spec.n_batch}{parallel}|{where}"

    def needs(self, slot: ModelSlot, spec: ModelSpec | None = None) -> tuple[int, int] | None:
        """(bytes on a GPU, bytes on the CPU) for ``slot`` (as ``spec``, one of its variants); None while its header
        is still being read.

        Raises ModelLoadFailed when the file is missing or its header unreadable.
        """
        spec = spec or slot.spec
        if spec.kind != "llm":
            return self._speech_needs(slot)
        if not os.path.isfile(spec.path):
            raise ModelLoadFailed(f"model file not found: {spec.path}", path=spec.path)
        facts = self.store.facts(spec.path)
        if facts is None:
            failure = self.store.facts_failed(spec.path)
            if failure:
                raise ModelLoadFailed(f"cannot read the GGUF header of {spec.path}: {failure}", path=spec.path)
            return None
        needs = self.llm_needs(slot, spec, facts)
        slot.measured = self.store.measured(
            self.measured_key(spec, spec.wants_gpu and self.inventory.mode != "simulated")
        )
        return needs

    def llm_needs(self, slot: ModelSlot, spec: ModelSpec, facts: GgufFacts) -> tuple[int, int]:
        """(GPU bytes, CPU bytes) of an LLM from its header's facts: a local file's, or a remote one's before it is
        downloaded (the measured size of an earlier load of the same file replaces the estimate)."""
        context = self.config.devices.cuda_context_mib * MIB
        simulated = self.inventory.mode == "simulated"
        on_gpu = spec.wants_gpu and not simulated
        n_ctx = spec.n_ctx * sequences(spec)  # the KV pool of every sequence, the voice ones included
        est_cpu = estimate_gguf(facts, n_ctx, spec.n_batch, False, 0, self.worker_base)
        est_gpu = estimate_gguf(facts, n_ctx, spec.n_batch, True, spec.n_gpu_layers, context)
        slot.estimate = est_gpu if on_gpu else est_cpu
        cpu = self.store.measured(self.measured_key(spec, False)) or est_cpu.total
        gpu = cpu if simulated else self.store.measured(self.measured_key(spec, True)) or est_gpu.total
        slot.host_share = 0
        if spec.wants_gpu and 0 < spec.n_gpu_layers < facts.n_layer:
            # A partial offload: the GPU holds its layers' share, the host the rest (the worker's own memory too).
            # On a simulated GPU the model really runs on the CPU: the two halves split its CPU size.
            kept = 1.0 - spec.n_gpu_layers / facts.n_layer
            slot.host_share = int((est_cpu.weights + est_cpu.kv_cache) * kept) + est_cpu.compute + est_cpu.overhead
            if simulated:
                slot.host_share = min(slot.host_share, cpu)
                gpu = cpu - slot.host_share
        return gpu, cpu

    def _speech_needs(self, slot: ModelSlot, size: int | None = None) -> tuple[int, int]:
        """A speech model's needs from its files' size (``size``: of files not downloaded yet)."""
        spec = slot.spec
        if size is None:
            exists = os.path.isdir(spec.path) if spec.kind == "stt" else os.path.isfile(spec.path)
            if not exists:
                what = "model directory" if spec.kind == "stt" else "voice file"
                raise ModelLoadFailed(f"{what} not found: {spec.path}", path=spec.path)
            size = files_bytes(spec.path)
        simulated = self.inventory.mode == "simulated"
        on_gpu = spec.wants_gpu and not simulated
        context = self.config.devices.cuda_context_mib * MIB
        est_cpu = estimate_speech(spec.kind, size, spec.compute_type, False, self.worker_base)
        est_gpu = estimate_speech(spec.kind, size, spec.compute_type, True, context)
        slot.estimate = est_gpu if on_gpu else est_cpu
        cpu = self.store.measured(self.measured_key(spec, False)) or est_cpu.total
        gpu = cpu if simulated else self.store.measured(self.measured_key(spec, True)) or est_gpu.total
        slot.measured = self.store.measured(self.measured_key(spec, on_gpu))
        return gpu, cpu

    # ----- the books ------------------------------------------------------------------------------------------

    def devices(self) -> list[Device]:
        return self.inventory.devices(w.pid for w in self.pool.by_id.values())

    def residents(self, slots: list[ModelSlot]) -> list[Resident]:
        held = [
            Resident(
                name=slot.name,
                placements=_with_kv_states(slot),
                priority=slot.spec.priority,
                pinned=slot.pinned,
                busy=slot.busy,
                unloading=slot.state is ModelState.UNLOADING,
                loading=slot.state is ModelState.LOADING,
                last_used=slot.last_used_mono,
                load_ms=float(slot.info.get("load_ms") or DEFAULT_LOAD_MS),
                demand=slot.demand,
            )
            for slot in slots
            if slot.placements and slot.state in (ModelState.LOADING, ModelState.READY, ModelState.UNLOADING)
        ]
        for gone in self.releasing:
            held.append(Resident(gone.name, gone.placements, 0, False, False, True, False, 0.0, DEFAULT_LOAD_MS, 0.0))
        return held

    def views(self, slots: list[ModelSlot]) -> list[DeviceView]:
        return device_views(self.devices(), self.residents(slots), self.config.devices)

    def choose(
        self, slot: ModelSlot, slots: list[ModelSlot], now: float
    ) -> tuple[ModelSpec, tuple[int, int], Decision] | None:
        """Which of the model's files to load, and where: the best variant that can go somewhere now, or by evicting
        only models of its priority or lower; else the next; the last one takes the policy's answer as it is. None
        while a header is still being read."""
        priorities = {s.name: s.spec.priority for s in slots}
        variants = variant_specs(slot.spec)
        chosen: tuple[ModelSpec, tuple[int, int], Decision] | None = None
        for spec in variants:
            needs = self.needs(slot, spec)
            if needs is None:
                return None
            decision = self.plan(slot, slots, needs, now)
            chosen = (spec, needs, decision)
            lower = all((priorities.get(v) or 0) <= (slot.spec.priority or 0) for v in decision.evict)
            if decision.action == "place" or (decision.action == "evict" and lower):
                break
        assert chosen is not None
        if len(variants) > 1:
            self.needs(slot, chosen[0])  # the slot's estimate and host share are the chosen variant's
        return chosen

    def plan(self, slot: ModelSlot, slots: list[ModelSlot], needs: tuple[int, int], now: float) -> Decision:
        waited = now - slot.pending_since if slot.pending_since is not None else 0.0
        request = PlacementRequest(
            name=slot.name,
            need_gpu=needs[0],
            need_cpu=needs[1],
            wants_gpu=slot.spec.wants_gpu,
            pinned_gpu=slot.spec.gpu,
            waited_s=waited,
            splittable=slot.spec.kind == "llm",
            host_share=slot.host_share,
        )
        return plan_placement(
            request, self.devices(), self.residents(slots), self.config.devices, self.config.scheduler, now
        )

    def fit(
        self, spec: ModelSpec, slots: list[ModelSlot], now: float, facts: GgufFacts | None, size: int | None
    ) -> dict:
        """Where a model not downloaded yet would go now, and what it would push out: the placement a load would
        get, from its remote header's facts (an LLM) or its files' size (speech)."""
        probe = ModelSlot(name="(pull)", spec=spec)
        needs = self.llm_needs(probe, spec, facts) if facts is not None else self._speech_needs(probe, size)
        decision = self.plan(probe, slots, needs, now)
        device = decision.device_ids[0] if decision.device_ids else None
        return {
            "fits": decision.action != "fail",
            "action": decision.action,  # place, evict, wait (memory held by busy models) or fail
            "device": "+".join(decision.device_ids) or None,
            "variant": spec.quantization,
            "needs_bytes": needs[0] if device is not None and device != HOST else needs[1],
            "estimate": {k: v for k, v in vars(probe.estimate).items()} if probe.estimate else None,
            "evicts": list(decision.evict),
            "reason": decision.reason or None,
            "free_bytes": dict(decision.free),
        }

    def place(
        self, slot: ModelSlot, decision: Decision, needs: tuple[int, int], spec: ModelSpec | None = None
    ) -> ModelSpec:
        """Reserve the decision's memory for ``slot``; return the spec (``spec``: the chosen variant's) the worker
        loads with."""
        spec = spec or slot.spec
        by_id = {d.id: d for d in self.devices()}
        chosen = [by_id[i] for i in decision.device_ids]
        on_gpu = any(self.runs_on_gpu(d) for d in chosen)
        fractions = decision.tensor_split or (1.0,)
        need = needs[0] if chosen[0].kind == "gpu" else needs[1]
        slot.placements = {d.id: int(need * f) for d, f in zip(chosen, fractions, strict=True)}
        if decision.host_share:
            slot.placements[HOST] = decision.host_share
        slot.tensor_split = decision.tensor_split
        if not on_gpu:  # the host, or a simulated GPU: the model really runs on the CPU
            return msgspec.structs.replace(spec, n_gpu_layers=0, gpu=None, tensor_split=None, device="cpu")
        if decision.tensor_split:
            split = [0.0] * (1 + max(d.index or 0 for d in chosen))
            for device, fraction in zip(chosen, decision.tensor_split, strict=True):
                split[device.index or 0] = fraction
            return msgspec.structs.replace(spec, gpu=None, tensor_split=split)
        return msgspec.structs.replace(spec, gpu=chosen[0].index)

    def loaded(self, slot: ModelSlot, pid: int, rss: int | None) -> None:
        """Measure what the model really takes, log it against the estimate, and keep it for next time."""
        on_gpu = any(d.id in slot.placements and self.runs_on_gpu(d) for d in self.devices())
        if on_gpu:
            per_device = {k: v for k, v in self.inventory.gpu_memory_of(pid).items() if k in slot.placements}
            measured = sum(per_device.values())
            if per_device:
                if HOST in slot.placements:  # a partial offload: its host share is the worker's resident memory
                    per_device[HOST] = rss or process_rss(pid)
                slot.placements = per_device
        elif HOST in slot.placements and len(slot.placements) > 1:
            measured = 0  # a partial offload on a simulated GPU: both halves stay as estimated
        else:
            measured = rss or process_rss(pid)
            slot.placements = {device: measured for device in slot.placements}
        if not measured:
            return
        estimate = slot.estimate.total if slot.estimate else None
        slot.measured = measured
        key = self.measured_key(slot.load_spec or slot.spec, on_gpu)  # the file it loaded (a variant)
        self.store.remember_measured(key, measured, estimate)
        log.info(
            "model_measured",
            model=slot.name,
            device="+".join(slot.placements),
            estimate_mib=round(estimate / MIB, 1) if estimate else None,
            measured_mib=round(measured / MIB, 1),
            ratio=round(measured / estimate, 3) if estimate else None,
        )

    def unloaded(self, slot: ModelSlot, pid: int) -> None:
        """On a real GPU, keep the model's memory booked until NVML shows it back (bounded)."""
        gpu_ids = {d.id for d in self.devices() if self.runs_on_gpu(d)}
        on_gpu = {k: v for k, v in slot.placements.items() if k in gpu_ids}
        if on_gpu:
            deadline = time.monotonic() + self.config.devices.memory_release_timeout_s
            self.releasing.append(Releasing(slot.name, pid, on_gpu, deadline))
        slot.placements, slot.tensor_split = {}, None

    def prune_releasing(self, now: float) -> bool:
        """Drop bookings whose memory is back; return True if any was dropped."""
        kept = []
        for gone in self.releasing:
            if not self.inventory.gpu_memory_of(gone.pid):
                continue
            if now > gone.deadline:
                log.warning("memory_release_timeout", model=gone.name, pid=gone.pid)
                continue
            kept.append(gone)
        changed = len(kept) != len(self.releasing)
        self.releasing = kept
        return changed

    def spare_ready(self, rss: int | None) -> None:
        if rss:
            self.worker_base = rss

    def close(self) -> None:
        self.store.close()
