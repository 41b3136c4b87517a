"""Memory management against the real daemon and real models, on a simulated GPU too small for both models.

Measured here on the CPU: SmolLM2 takes about 210 MiB in its worker and Gemma 3 270M about 380 MiB, so a 500 MiB
simulated GPU holds either one, never both.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from model_client import InsufficientMemory
from model_manager.config import MIB, DeviceSettings
from model_manager.devices import open_inventory
from model_manager.footprint import DEFAULT_WORKER_BASE, FootprintStore, estimate_gguf
from tests.conftest import GREEDY, SMOLLM2, ManagerProcess, base_config, collect_events, model_status, wait_for

QUESTION = [{"role": "user", "content": "Say one word."}]
SIM_GPU_MIB = 500
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy decoding keeps counting: a reliably long request


def simulated_config(run_dir: Path, **scheduler) -> dict:
    config = base_config(run_dir)
    config["devices"] = {
        "mode": "simulated",
        "simulated": [{"name": "sim-gpu", "total_mib": SIM_GPU_MIB}],
        "gpu_headroom_mib": 0,
        "allow_cpu_fallback": False,
    }
    config["scheduler"] = {"hold_after_use_s": 0.0, "max_wait_s": 10.0, "wait_for_memory_s": 30.0, **scheduler}
    for name in ("smollm2", "gemma3-270m"):
        config["models"][name]["n_gpu_layers"] = -1
    config["models"]["gemma-long-ctx"] = {**config["models"]["gemma3-270m"], "n_ctx": 32768}
    return config


def start(run_dir: Path, config: dict) -> ManagerProcess:
    manager = ManagerProcess(run_dir, config)
    manager.start()
    return manager


@pytest.fixture
def sim(run_dir: Path):
    manager = start(run_dir, simulated_config(run_dir))
    yield manager
    manager.stop()


def model_events(events) -> list[tuple[str, str, str | None]]:
    return [(e["event"], e["model"], e.get("reason")) for e in collect_events(events, time.monotonic() + 0.5)]


def test_simulated_devices_are_visible_as_such(sim: ManagerProcess) -> None:
    with sim.client() as c:
        devices = c.status()["devices"]
    assert devices["mode"] == "simulated" and devices["simulated"] is True
    gpu = next(d for d in devices["list"] if d["kind"] == "gpu")
    assert gpu["id"] == "sim:0" and gpu["simulated"] is True and gpu["total_bytes"] == SIM_GPU_MIB * MIB
    assert '"event": "devices_simulated"' in sim.log_path.read_text()


def test_alternating_models_that_cannot_coreside_all_succeed(run_dir: Path) -> None:
    """On a card big enough for both, whose budget (devices.gpus max_mib) holds only one of them."""
    config = simulated_config(run_dir)
    config["devices"]["simulated"] = [{"name": "big sim-gpu", "total_mib": 140_000}]
    config["devices"]["gpus"] = [{"index": 0, "max_mib": SIM_GPU_MIB}]
    sim = start(run_dir, config)
    events = sim.subscribe()
    try:
        with sim.client(timeout=60) as c:
            (gpu,) = [d for d in c.status()["devices"]["list"] if d["kind"] == "gpu"]
            assert gpu["budget_bytes"] == SIM_GPU_MIB * MIB and gpu["free_bytes"] == SIM_GPU_MIB * MIB
            for model in ("smollm2", "gemma3-270m", "smollm2", "gemma3-270m"):
                assert c.chat(model, QUESTION, max_tokens=3, **GREEDY).usage.completion_tokens >= 1
                status = c.status()
                ready = [m["name"] for m in status["models"] if m["state"] == "ready"]
                assert ready == [model], "only the model in use fits the GPU's budget"
                assert model_status(c, model)["device"] == "sim:0"
        assert model_events(events) == [
            ("model.loaded", "smollm2", None),
            ("model.unloaded", "smollm2", "pressure"),
            ("model.loaded", "gemma3-270m", None),
            ("model.unloaded", "gemma3-270m", "pressure"),
            ("model.loaded", "smollm2", None),
            ("model.unloaded", "smollm2", "pressure"),
            ("model.loaded", "gemma3-270m", None),
        ]
    finally:
        events.close()
        sim.stop()


def test_a_pinned_model_is_never_evicted(run_dir: Path) -> None:
    config = simulated_config(run_dir)
    config["models"]["smollm2"]["pinned"] = True
    manager = start(run_dir, config)
    try:
        with manager.client(timeout=60) as c:
            pid = c.load("smollm2")["pid"]
            with pytest.raises(InsufficientMemory) as err:
                c.chat("gemma3-270m", QUESTION, max_tokens=3)
            assert err.value.details["needed_mib"] > 300
            assert "sim:0" in err.value.details["free_mib"]
            smollm2 = model_status(c, "smollm2")
            assert smollm2["state"] == "ready" and smollm2["pid"] == pid
            assert smollm2["ttl_left_s"] is None, "pinned models have no keep-alive countdown"
    finally:
        manager.stop()


def test_a_model_fitting_nowhere_gets_insufficient_memory_at_once(sim: ManagerProcess) -> None:
    with sim.client(timeout=60) as c:
        started = time.monotonic()
        with pytest.raises(InsufficientMemory) as err:
            c.chat("gemma-long-ctx", QUESTION, max_tokens=3)
        assert time.monotonic() - started < 5
        assert err.value.details["needed_mib"] > SIM_GPU_MIB
        assert set(err.value.details["free_mib"]) == {"cpu", "sim:0"}
        assert c.chat("smollm2", QUESTION, max_tokens=2).usage.completion_tokens >= 1, "the next request works"


def test_a_model_with_a_request_in_flight_is_not_unloaded_under_it(sim: ManagerProcess) -> None:
    events = sim.subscribe()
    finished: dict[str, float] = {}

    def long_stream() -> None:
        with sim.client(timeout=60) as c:
            text = c.complete("smollm2", COUNTING, stream=True, max_tokens=120, **GREEDY).text()
            assert text
            finished["smollm2"] = time.time()

    with sim.client(timeout=60) as c:
        c.load("smollm2")
        thread = threading.Thread(target=long_stream)
        thread.start()
        wait_for(lambda: model_status(c, "smollm2")["in_flight"] == 1, interval=0.01)
        reply = c.chat("gemma3-270m", QUESTION, max_tokens=2)
        thread.join()
    assert "smollm2" in finished, "the streamed request finished normally"
    assert reply.timings.queue_ms > 100, "gemma waited for smollm2's request instead of evicting it"
    unloaded = [e for e in collect_events(events, time.monotonic() + 0.5) if e["event"] == "model.unloaded"]
    assert unloaded[0]["model"] == "smollm2" and unloaded[0]["reason"] == "pressure"
    assert unloaded[0]["time"] >= finished["smollm2"] - 0.05
    events.close()


def test_a_request_waits_for_memory_only_so_long(run_dir: Path) -> None:
    manager = start(run_dir, simulated_config(run_dir, wait_for_memory_s=0.5))
    try:
        with manager.client(timeout=60) as c:
            c.load("smollm2")
            # Long enough to hold the memory through the other request's wait, and no longer.
            stream = c.complete("smollm2", COUNTING, stream=True, max_tokens=150, **GREEDY)
            pieces = iter(stream)
            next(pieces)
            with manager.client(timeout=60) as other:
                started = time.monotonic()
                with pytest.raises(InsufficientMemory, match="waited too long"):
                    other.chat("gemma3-270m", QUESTION, max_tokens=2)
                assert 0.4 < time.monotonic() - started < 5
            assert "".join(pieces) and stream.result is not None, "the request that held the memory is unaffected"
    finally:
        manager.stop()


def test_a_model_that_just_served_is_held_against_thrashing(run_dir: Path) -> None:
    manager = start(run_dir, simulated_config(run_dir, hold_after_use_s=1.5, max_wait_s=30))
    try:
        with manager.client(timeout=60) as c:
            c.chat("smollm2", QUESTION, max_tokens=2)
            reply = c.chat("gemma3-270m", QUESTION, max_tokens=2)
            assert reply.timings.queue_ms >= 1000, "smollm2 was held for hold_after_use_s before eviction"
    finally:
        manager.stop()


def test_a_request_that_waited_too_long_overrides_the_hold(run_dir: Path) -> None:
    manager = start(run_dir, simulated_config(run_dir, hold_after_use_s=30, max_wait_s=0.5))
    try:
        with manager.client(timeout=60) as c:
            c.chat("smollm2", QUESTION, max_tokens=2)
            reply = c.chat("gemma3-270m", QUESTION, max_tokens=2)
            assert 400 <= reply.timings.queue_ms < 10_000
    finally:
        manager.stop()


def test_preloaded_models_are_ready_before_any_request(run_dir: Path) -> None:
    config = base_config(run_dir)
    config["models"]["smollm2"]["preload"] = True
    manager = start(run_dir, config)
    try:
        with manager.client() as c:
            wait_for(lambda: model_status(c, "smollm2")["state"] == "ready", timeout=20)
            assert model_status(c, "smollm2")["requests"] == 0
            assert model_status(c, "gemma3-270m")["state"] == "unloaded"
    finally:
        manager.stop()


def test_estimates_match_measured_sizes_and_survive_a_restart(run_dir: Path) -> None:
    """On the CPU the header estimate is within 15% of the worker's measured resident memory."""
    manager = start(run_dir, base_config(run_dir))
    try:
        with manager.client(timeout=60) as c:
            for model in ("smollm2", "gemma3-270m"):
                c.chat(model, QUESTION, max_tokens=2)
                status = model_status(c, model)
                ratio = status["measured_bytes"] / status["estimated_bytes"]
                assert 0.85 <= ratio <= 1.15, (model, ratio)
                assert status["size_bytes"] == status["measured_bytes"], "the measured size is what is reserved"
            measured = model_status(c, "smollm2")["measured_bytes"]
    finally:
        manager.stop()
    assert '"event": "model_measured"' in manager.log_path.read_text()
    restarted = start(run_dir, manager.config)
    try:
        with restarted.client() as c:
            c.chat("smollm2", QUESTION, max_tokens=1)
            assert model_status(c, "smollm2")["measured_bytes"] is not None
        log = restarted.log_path.read_text()
        assert f'"reserved_mib": {round(measured / 1024 / 1024, 1)}' in log, "the restart reserved the measured size"
    finally:
        restarted.stop()


def test_device_inventory_against_the_real_nvml_library() -> None:
    inventory = open_inventory(DeviceSettings(mode="auto"))
    devices = inventory.devices([])
    assert devices[0].id == "cpu" and devices[0].total > 0
    try:
        import pynvml

        pynvml.nvmlInit()
        gpus = pynvml.nvmlDeviceGetCount()
    except Exception as exc:
        assert inventory.mode == "cpu-only"
        assert type(exc).__name__ in inventory.reason, "the reason names what NVML said"
        assert [d.kind for d in devices] == ["cpu"]
    else:
        assert inventory.mode == ("nvml" if gpus else "cpu-only")
        assert len([d for d in devices if d.kind == "gpu"]) == gpus
        assert all(d.total > 0 for d in devices)
    explicit = open_inventory(DeviceSettings(mode="cpu-only"))
    assert explicit.describe() == {"mode": "cpu-only", "simulated": False, "reason": "devices.mode is cpu-only"}


def test_status_shows_devices_and_sizes(sim: ManagerProcess) -> None:
    from model_client.cli import format_status

    with sim.client(timeout=60) as c:
        c.load("smollm2")
        text = format_status(c.status())
    assert "sim:0" in text and "SIMULATED" in text
    assert "RESERVED" in text and "FREE" in text


class _Memory:
    def __init__(self, total: int, used: int) -> None:
        self.total, self.used = total, used


class _FakeNvml:
    """Stands in for two GPUs' hardware behind pynvml's API: GPU 1 can be made to fall off the bus."""

    class NVMLError(Exception):
        pass

    class NVMLError_GpuIsLost(NVMLError):
        pass

    def __init__(self) -> None:
        self.gone: set[int] = set()

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return [b"RTX 3060 Ti", b"GTX 1660 Super"][handle]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:
        if handle in self.gone:
            raise self.NVMLError_GpuIsLost("GPU is lost")
        return _Memory(8 << 30, 1 << 30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list:
        return []

    nvmlDeviceGetGraphicsRunningProcesses = nvmlDeviceGetComputeRunningProcesses


def test_a_gpu_lost_at_run_time_is_left_out_and_said_so() -> None:
    from model_manager.devices import NvmlInventory

    nvml = _FakeNvml()
    inventory = NvmlInventory(DeviceSettings(), nvml)
    assert [d.id for d in inventory.devices([])] == ["cpu", "cuda:0", "cuda:1"]
    nvml.gone.add(1)
    assert [d.id for d in inventory.devices([])] == ["cpu", "cuda:0"]
    described = inventory.describe()
    assert described["reason"].startswith("degraded: lost cuda:1 (GTX 1660 Super): GPU is lost")
    nvml.gone.clear()
    assert [d.id for d in inventory.devices([])] == ["cpu", "cuda:0", "cuda:1"]
    assert "lost" not in inventory.describe()


def test_a_partly_offloaded_model_books_its_gpu_share_and_the_rest_on_the_host(run_dir: Path) -> None:
    config = simulated_config(run_dir)
    config["devices"]["simulated"] = [{"name": "sim-gpu", "total_mib": 4000}]
    config["models"]["smollm2"]["n_gpu_layers"] = 10  # of its 30 layers
    config["models"]["smollm2-full"] = {**config["models"]["smollm2"], "n_gpu_layers": -1}
    manager = start(run_dir, config)
    try:
        with manager.client(timeout=60) as c:
            for model in ("smollm2", "smollm2-full"):
                c.chat(model, QUESTION, max_tokens=2)
            partial, full = model_status(c, "smollm2"), model_status(c, "smollm2-full")
            assert partial["device"] == "sim:0+cpu" and set(partial["placements"]) == {"sim:0", "cpu"}
            assert full["device"] == "sim:0" and set(full["placements"]) == {"sim:0"}
            # A third of the layers on the GPU: its GPU share is smaller than the whole model's, the rest on the host.
            assert 0 < partial["placements"]["sim:0"] < full["placements"]["sim:0"]
            assert partial["placements"]["cpu"] > partial["placements"]["sim:0"]
            devices = {d["id"]: d for d in c.status()["devices"]["list"]}
            assert devices["cpu"]["reserved_bytes"] >= partial["placements"]["cpu"]
    finally:
        manager.stop()


VARIANTS_DIR = Path(tempfile.gettempdir()) / "mm-test-variants"


def quantized_variants() -> dict[str, Path]:
    """SmolLM2 in Q8_0 and Q2_K besides its shipped Q4_1, made with llama.cpp's own quantizer (once per machine)."""
    VARIANTS_DIR.mkdir(exist_ok=True)
    made = {"Q4_1": SMOLLM2}
    for label, ftype in (("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), ("Q2_K", "LLAMA_FTYPE_MOSTLY_Q2_K")):
        out = VARIANTS_DIR / f"smollm2-{SMOLLM2.stat().st_size}-{label}.gguf"
        if not out.exists():
            script = (
                "import ctypes, sys, llama_cpp\n"
                "p = llama_cpp.llama_model_quantize_default_params()\n"
                f"p.ftype, p.allow_requantize, p.nthread = llama_cpp.{ftype}, True, 2\n"
                "src, out = (a.encode() for a in sys.argv[1:3])\n"
                "sys.exit(llama_cpp.llama_model_quantize(src, out, ctypes.byref(p)))\n"
            )
            partial = out.with_suffix(".part")
            run = subprocess.run([sys.executable, "-c", script, str(SMOLLM2), str(partial)], capture_output=True)
            assert run.returncode == 0, run.stderr[-2000:]
            partial.rename(out)
        made[label] = out
    return made


def test_the_best_quantization_variant_that_fits_is_loaded_and_a_pinned_one_is_kept(run_dir: Path) -> None:
    files = quantized_variants()
    store = FootprintStore(run_dir / "facts")
    need = {
        label: estimate_gguf(store.read_now(str(path)), 2048, 512, False, 0, DEFAULT_WORKER_BASE).total
        for label, path in files.items()
    }
    store.close()
    assert need["Q8_0"] > need["Q4_1"] > need["Q2_K"]
    config = simulated_config(run_dir)
    config["manager"]["spare_workers"] = 0  # the first estimate uses the default worker base, as computed here
    config["devices"]["simulated"] = [{"name": "sim-gpu", "total_mib": (need["Q8_0"] + need["Q4_1"]) // 2 // MIB}]
    variants = [{"quantization": label, "path": str(files[label])} for label in ("Q8_0", "Q4_1", "Q2_K")]
    smollm2 = {k: v for k, v in config["models"]["smollm2"].items() if k not in ("path", "quantization")}
    config["models"] = {
        "smollm2-variants": {**smollm2, "variants": variants},
        "smollm2-q8": {**smollm2, "variants": variants, "variant": "Q8_0"},
    }
    manager = start(run_dir, config)
    try:
        with manager.client(timeout=60) as c:
            assert model_status(c, "smollm2-variants")["variants"] == ["Q8_0", "Q4_1", "Q2_K"]
            assert c.chat("smollm2-variants", QUESTION, max_tokens=3, **GREEDY).usage.completion_tokens >= 1
            status = model_status(c, "smollm2-variants")
            assert status["variant"] == "Q4_1" and status["quantization"] == "Q4_1"  # Q8_0 does not fit this GPU
            with pytest.raises(InsufficientMemory):
                c.chat("smollm2-q8", QUESTION, max_tokens=3)  # pinned to Q8_0: no smaller file instead
    finally:
        manager.stop()
