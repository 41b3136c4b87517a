"""Every memory pool a model can live in: NVIDIA GPUs through NVML, host RAM, or a simulated set of GPUs.

The inventory reports, per device, its total memory and what *other* programs use of it; what the manager itself
holds (its workers) is taken out, because the scheduler counts that from its own reservations. Three modes:

- ``nvml``: real GPUs (nvidia-ml-py), plus host RAM.
- ``cpu-only``: no NVML library, no driver or no GPU; said once in the log and shown in status.
- ``simulated``: GPUs declared in the YAML drive the same placement logic on a machine without them. Models
  "on" a simulated GPU really run on the CPU, and their measured size is their worker's resident memory. The mode
  is explicit in the config and shown in status and logs; it is never a fallback.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psutil
import structlog

from model_manager.config import MIB, DeviceSettings

HOST = "cpu"

log = structlog.get_logger("model_manager.devices")


@dataclass(frozen=True, slots=True)
class Device:
    id: str  # "cpu", "cuda:0", "sim:1"
    kind: str  # "cpu" or "gpu"
    name: str
    index: int | None  # the GPU index llama.cpp knows (main_gpu); None for the host
    total: int  # bytes
    used_by_others: int  # bytes used by programs other than this manager and its workers
    simulated: bool = False


class Inventory:
    """Base: the host's RAM. Subclasses add GPUs."""

    mode = "cpu-only"

    def __init__(self, settings: DeviceSettings) -> None:
        self.settings = settings
        self.reason = ""

    def devices(self, our_pids: Iterable[int]) -> list[Device]:
        return [self.host(our_pids)]

    def host(self, our_pids: Iterable[int]) -> Device:
        memory = psutil.virtual_memory()
        ours = sum(process_anon_rss(pid) for pid in our_pids)
        others = max(0, memory.total - memory.available - ours)
        return Device(id=HOST, kind="cpu", name="host RAM", index=None, total=memory.total, used_by_others=others)

    def gpu_memory_of(self, pid: int) -> dict[str, int]:
        """Bytes each GPU holds for process ``pid`` (empty where the mode cannot tell)."""
        return {}

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode, "simulated": self.mode == "simulated", "reason": self.reason}


class NvmlInventory(Inventory):
    mode = "nvml"

    def __init__(self, settings: DeviceSettings, nvml) -> None:  # nvml: the initialised pynvml module
        super().__init__(settings)
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self.names = [_text(nvml.nvmlDeviceGetName(h)) for h in self.handles]
        self.lost: dict[int, str] = {}  # GPUs NVML stopped answering for, and its error

    def _processes(self, handle) -> list:
        procs = []
        for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs += getattr(self.nvml, query)(handle)
            except self.nvml.NVMLError:
                pass
        return procs

    def devices(self, our_pids: Iterable[int]) -> list[Device]:
        ours = set(our_pids)
        found = [self.host(ours)]
        for index, handle in enumerate(self.handles):
            try:
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                our_use = sum(p.usedGpuMemory or 0 for p in self._processes(handle) if p.pid in ours)
            except self.nvml.NVMLError as exc:  # a GPU that fell off the bus: carry on with the others
                if index not in self.lost:
                    self.lost[index] = str(exc) or type(exc).__name__
                    log.error("gpu_lost", index=index, name=self.names[index], error=self.lost[index])
                continue
            if self.lost.pop(index, None) is not None:
                log.warning("gpu_back", index=index, name=self.names[index])
            found.append(
                Device(
                    id=f"cuda:{index}",
                    kind="gpu",
                    name=self.names[index],
                    index=index,
                    total=memory.total,
                    used_by_others=max(0, memory.used - our_use),
                )
            )
        return found

    def describe(self) -> dict[str, object]:
        """Says so when GPUs were lost: placement goes on with what is left."""
        described = super().describe()
        if self.lost:
            lost = [f"cuda:{i} ({self.names[i]}): {error}" for i, error in sorted(self.lost.items())]
            described["lost"] = lost
            described["reason"] = "degraded: lost " + "; ".join(lost)
        return described

    def gpu_memory_of(self, pid: int) -> dict[str, int]:
        usage = {}
        for index, handle in enumerate(self.handles):
            for proc in self._processes(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    usage[f"cuda:{index}"] = usage.get(f"cuda:{index}", 0) + proc.usedGpuMemory
        return usage


class SimulatedInventory(Inventory):
    mode = "simulated"

    def devices(self, our_pids: Iterable[int]) -> list[Device]:
        host = self.host(our_pids)
        if self.settings.simulated_host_mib is not None:
            host = Device(
                id=HOST,
                kind="cpu",
                name="simulated host RAM",
                index=None,
                total=self.settings.simulated_host_mib * MIB,
                used_by_others=0,
                simulated=True,
            )
        gpus = [
            Device(
                id=f"sim:{i}",
                kind="gpu",
                name=gpu.name,
                index=i,
                total=gpu.total_mib * MIB,
                used_by_others=gpu.used_by_others_mib * MIB,
                simulated=True,
            )
            for i, gpu in enumerate(self.settings.simulated)
        ]
        return [host, *gpus]


def open_inventory(settings: DeviceSettings) -> Inventory:
    """The inventory the config asks for; ``auto`` tries NVML and falls back to CPU-only, saying why."""
    if settings.mode == "simulated":
        inventory: Inventory = SimulatedInventory(settings)
        log.warning("devices_simulated", gpus=[f"{g.name}={g.total_mib}MiB" for g in settings.simulated])
        return inventory
    if settings.mode == "cpu-only":
        inventory = Inventory(settings)
        inventory.reason = "devices.mode is cpu-only"
    else:
        inventory = _try_nvml(settings)
    if isinstance(inventory, NvmlInventory):
        log.info("devices_nvml", gpus=inventory.names)
    else:
        log.warning("devices_cpu_only", reason=inventory.reason)
    return inventory


def _try_nvml(settings: DeviceSettings) -> Inventory:
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() > 0:
            return NvmlInventory(settings, pynvml)
        reason = "NVML reports no GPU"
    except ImportError:
        reason = "nvidia-ml-py is not installed"
    except Exception as exc:  # pynvml.NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
    inventory = Inventory(settings)
    inventory.reason = reason
    return inventory


def process_anon_rss(pid: int) -> int:
    """Resident memory that is not file-backed: mapped model files are page cache, already outside `available`."""
    try:
        info = psutil.Process(pid).memory_info()
    except psutil.Error:
        return 0
    return max(0, info.rss - info.shared)


def process_rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
