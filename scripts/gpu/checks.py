"""The GPU checks: the real manager on a synthetic model, each check's figures in one JSON report.

    python scripts/gpu/checks.py --out report.json [--size-mib 1500] [--model file.gguf]
    python scripts/gpu/checks.py --out report.json --dry      # on the CPU: what the test suite runs

Checks (each ``ok`` true or false with its figures, or ``skipped`` with why; the report is rewritten as each one
completes, so a run cut short keeps what it measured):
- ``runtime``: the engine imported beside pyzmq, ZeroMQ traffic in a bare process, as it is (a CUDA build that
  carries its own C++ runtime crashes here) and as the manager starts a worker (the shared runtime preloaded);
  the engine libraries found carrying their own runtime.
- ``inventory``: the manager's NVML reading of the GPUs (name, total, free) against ``nvidia-smi``.
- ``load``: the model on the GPU (``n_gpu_layers: -1``) shows in NVML's per-process list under its worker's pid;
  that memory against the manager's estimate (within 15%). Dry: the worker's resident memory on the CPU.
- ``decode``: tokens per second on the GPU and on the CPU, the same model and prompt.
- ``budget``: a ``devices.gpus`` budget that holds one copy of the model, not two: requests alternating between two
  catalogue entries of it evict and reload each time, and NVML shows the memory back within
  ``memory_release_timeout_s`` of each unload. Dry: on a simulated GPU.
- ``sigkill``: SIGKILL of the worker: its GPU memory back (NVML), the manager still answering.
- ``spare``: the spare worker (llama.cpp imported, no model) holds no GPU memory. Dry: skipped.
- ``batching``: ``bench/batching.py`` on the GPU with the same model (1 to 8 streams, daemon vs raw). Dry: skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_gguf import write_synthetic_gguf  # noqa: E402

from daemonkit.process import DaemonProcess  # noqa: E402
from model_client import ModelClient  # noqa: E402
from model_manager.config import MIB, DeviceSettings  # noqa: E402
from model_manager.devices import NvmlInventory, open_inventory  # noqa: E402

PROMPT = [{"role": "user", "content": "Count from one to ten."}]
Check = dict[str, Any]


class Nvml:
    """The manager's own NVML reading (model_manager.devices), so the checks test it rather than a second copy."""

    def __init__(self, inventory: NvmlInventory) -> None:
        self.inventory = inventory

    def gpus(self) -> list[dict[str, Any]]:
        return [
            {"index": d.index, "name": d.name, "total": d.total, "free": d.total - d.used_by_others}
            for d in self.inventory.devices([])
            if d.kind == "gpu"
        ]

    def used(self, index: int = 0) -> int:
        """Bytes in use on GPU ``index`` (no process is counted as the manager's, so all of it)."""
        return next(d.used_by_others for d in self.inventory.devices([]) if d.index == index and d.kind == "gpu")

    def of_pid(self, pid: int) -> int:
        return sum(self.inventory.gpu_memory_of(pid).values())


def open_nvml() -> Nvml | None:
    inventory = open_inventory(DeviceSettings())
    return Nvml(inventory) if isinstance(inventory, NvmlInventory) else None


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until ``predicate`` held, or None if it did not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return round(time.monotonic() - started, 3)
        time.sleep(interval)
    return None


class Manager:
    def __init__(self, run: Path, name: str, config: dict) -> None:
        self.dir = run / name
        self.dir.mkdir()
        config["endpoints"] = {k: f"ipc://{self.dir}/{k}.sock" for k in ("requests", "events", "workers")}
        config.setdefault("manager", {}).update(state_dir=str(self.dir / "state"), heartbeat_s=0.5)
        config["metrics"] = {"port": 0}
        config["kv_cache"] = {"spill_dir": None}
        path = self.dir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        self.process = DaemonProcess("model_manager", path, config["endpoints"]["requests"], self.dir / "manager.log")

    def __enter__(self) -> ModelClient:
        self.process.start(timeout=60)
        self.client = ModelClient(self.process.endpoint, timeout=600)
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.process.stop(timeout=30)


def model(path: Path, gpu_layers: int, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "llm",
        "path": str(path),
        "quantization": "Q8_0",
        "n_ctx": 2048,
        "n_gpu_layers": gpu_layers,
        "parallel": 1,
        "idle_ttl_s": -1,
        **extra,
    }


def status_of(client: ModelClient, name: str) -> dict[str, Any]:
    return next(m for m in client.status()["models"] if m["name"] == name)


CLASH = """
import json, sys
import llama_cpp, zmq
from model_manager import native
ctx = zmq.Context()
a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
a.bind("tcp://127.0.0.1:*")
b.connect(a.last_endpoint.decode())
for i in range(100):
    b.send(b"x" * (i * 64))
    a.recv()
print(json.dumps({"embedded_runtime": native.libraries_with_embedded_runtime(), "runtime": native.runtime_in_use()}))
"""


def check_runtime() -> Check:
    """The engine and libzmq in one process: as Python starts it, and as the manager starts a worker."""
    from model_manager import native

    plain_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    runs = {}
    for name, env in (("plain", plain_env), ("as_a_worker", native.worker_environment(plain_env))):
        done = subprocess.run([sys.executable, "-c", CLASH], env=env, capture_output=True, text=True, timeout=120)
        lines = done.stdout.strip().splitlines()
        found = json.loads(lines[-1]) if done.returncode == 0 and lines else None
        runs[name] = {"exit": done.returncode, "found": found}
        if done.returncode != 0:
            runs[name]["stderr"] = done.stderr[-600:]
    return {"ok": runs["as_a_worker"]["exit"] == 0, **runs}


def check_inventory(nvml: Nvml | None) -> Check:
    if nvml is None:
        return {"skipped": "no NVML (dry run)"}
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = [[c.strip() for c in line.split(",")] for line in smi.stdout.strip().splitlines()]
    gpus = nvml.gpus()
    pairs = []
    for gpu, row in zip(gpus, rows, strict=False):
        pairs.append({"nvml": gpu, "nvidia_smi": {"name": row[1], "total_mib": int(row[2]), "free_mib": int(row[3])}})
    ok = len(gpus) == len(rows) and all(
        p["nvml"]["name"] == p["nvidia_smi"]["name"]
        and abs(p["nvml"]["total"] / MIB - p["nvidia_smi"]["total_mib"]) <= 1
        and abs(p["nvml"]["free"] / MIB - p["nvidia_smi"]["free_mib"]) <= 256  # free moves between the two reads
        for p in pairs
    )
    return {"ok": ok, "gpus": pairs}


def check_load_decode_sigkill(run: Path, path: Path, nvml: Nvml | None) -> tuple[Check, Check, Check]:
    layers = -1 if nvml else 0
    config = {"models": {"synthetic": model(path, layers), "synthetic-cpu": model(path, 0)}}
    with Manager(run, "load", config) as client:
        client.load("synthetic")
        entry = status_of(client, "synthetic")
        pid, estimate = entry["pid"], entry["estimated_bytes"]
        measured = nvml.of_pid(pid) if nvml else entry["measured_bytes"]
        ratio = round(measured / estimate, 3) if measured and estimate else None
        load = {
            "ok": bool(ratio and 0.85 <= ratio <= 1.15),
            "pid": pid,
            "device": entry["device"],
            "measured_bytes": measured,
            "estimated_bytes": estimate,
            "measured_over_estimate": ratio,
            "load_ms": entry.get("load_ms"),
            "where_measured": "nvml per process" if nvml else "worker rss",
        }
        speeds = {}
        for name in ("synthetic", "synthetic-cpu") if nvml else ("synthetic",):
            reply = client.chat(name, PROMPT, max_tokens=64, temperature=0.0)
            speeds[name] = reply.timings.tokens_per_s
        decode = {"ok": all(speeds.values()), "tokens_per_s": speeds}
        if nvml:
            decode["gpu_over_cpu"] = round(speeds["synthetic"] / speeds["synthetic-cpu"], 2)
            client.unload("synthetic-cpu")
        before = nvml.used() if nvml else None
        os.kill(pid, signal.SIGKILL)
        if nvml:
            freed_s = wait_until(lambda: before - nvml.used() >= 0.8 * measured, 30)
        else:
            freed_s = wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30)
        answered = client.chat("synthetic", PROMPT, max_tokens=2).usage.completion_tokens >= 1
        sigkill = {"ok": freed_s is not None and answered, "freed_within_s": freed_s, "manager_answers_after": answered}
    return load, decode, sigkill


def check_budget(run: Path, path: Path, nvml: Nvml | None, model_bytes: int) -> Check:
    budget_mib = int(model_bytes * 1.5 / MIB)
    devices: dict[str, Any] = {
        "gpus": [{"index": 0, "max_mib": budget_mib}],
        "allow_cpu_fallback": False,
        "memory_release_timeout_s": 10,
    }
    if nvml is None:
        devices.update(mode="simulated", simulated=[{"name": "simulated big GPU", "total_mib": 140_000}])
    layers = -1
    config = {
        "devices": devices,
        "scheduler": {"hold_after_use_s": 0},
        "manager": {"spare_workers": 0},
        "models": {"a": model(path, layers), "b": model(path, layers)},
    }
    rounds = []
    with Manager(run, "budget", config) as client:
        for name in ("a", "b", "a", "b"):
            used_before = nvml.used() if nvml else None
            client.chat(name, PROMPT, max_tokens=2)
            ready = sorted(m["name"] for m in client.status()["models"] if m["state"] == "ready")
            rounds.append(
                {
                    "model": name,
                    "ready": ready,
                    "nvml_used_before": used_before,
                    "nvml_used_after": nvml.used() if nvml else None,
                }
            )
        release_s = None
        if nvml:
            used = nvml.used()
            client.unload("b")
            release_s = wait_until(lambda: used - nvml.used() >= 0.8 * model_bytes, 10)
    ok = all(r["ready"] == [r["model"]] for r in rounds) and (nvml is None or release_s is not None)
    return {"ok": ok, "budget_mib": budget_mib, "rounds": rounds, "memory_back_within_s": release_s}


def check_spare(run: Path, path: Path, nvml: Nvml | None) -> Check:
    if nvml is None:
        return {"skipped": "no GPU (dry run)"}
    import psutil

    with Manager(run, "spare", {"manager": {"spare_workers": 1}, "models": {"x": model(path, -1)}}) as client:
        manager_pid = client.ping()["pid"]
        found = wait_until(lambda: psutil.Process(manager_pid).children(), 30)
        spares = [p.pid for p in psutil.Process(manager_pid).children()]
        time.sleep(5)  # the spare imports llama.cpp (and with it CUDA) after it starts
        held = {pid: nvml.of_pid(pid) for pid in spares}
    return {"ok": found is not None and not any(held.values()), "spare_pids": spares, "gpu_bytes_by_pid": held}


def check_batching(path: Path, nvml: Nvml | None, levels: str, log: Path) -> Check:
    """bench/batching.py on the GPU: the daemon's batched decoding against raw llama_decode at ``levels`` streams.
    Its output goes to ``log`` as it comes, so a run cut short shows how far it got."""
    if nvml is None:
        return {"skipped": "the CPU's figures come from bench/batching.py itself (its tiny mode runs in the suite)"}
    command = [sys.executable, str(REPO / "bench" / "batching.py"), "--gguf", f"{path}:Q8_0", "--models", "custom"]
    command += ["--gpu-layers", "-1", "--repeats", "1", "--rounds", "3", "--levels", levels, "--tokens", "96"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # (the benchmark preloads the shared C++ runtime itself)
    with open(log, "w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=300, cwd=REPO, env=env)
        except subprocess.TimeoutExpired:
            return {"ok": False, "timed_out_s": 300, "tail": log.read_text()[-3000:]}
    lines = log.read_text().strip().splitlines()
    try:
        figures = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"ok": False, "exit": code.returncode, "tail": "\n".join(lines[-40:])}
    return {
        "ok": code.returncode == 0,
        "table": [line for line in lines[:-1] if not line.startswith("20")],
        "figures": figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="a GGUF (Q8_0); default: a synthetic one of --size-mib")
    parser.add_argument("--size-mib", type=float, default=1500)
    parser.add_argument("--dry", action="store_true", help="the CPU only (NVML not used even if present)")
    parser.add_argument("--levels", default="1,4,16,64", help="streams for the batching check")
    args = parser.parse_args()
    nvml = None if args.dry else open_nvml()
    if not args.dry and nvml is None:
        sys.exit("no NVML here: run with --dry, or on the GPU machine")
    run = Path(tempfile.mkdtemp(prefix="mm-gpu-"))
    report: dict[str, Any] = {"mode": "gpu" if nvml else "dry", "checks": {}}

    def record(**checks: Check) -> None:
        """Each check's result as it completes, the report rewritten whole (a run cut short keeps them)."""
        for name, check in checks.items():
            report["checks"][name] = {**check, "at_s": round(time.monotonic() - started, 1)}
            print(f"{name}: {'skipped' if 'skipped' in check else 'ok' if check.get('ok') else 'FAILED'}", flush=True)
        report["ok"] = all(c.get("ok", True) for c in report["checks"].values())
        args.out.write_text(json.dumps(report, indent=1, default=str))

    started = time.monotonic()
    try:
        record(runtime=check_runtime())
        path = args.model or run / "synthetic.gguf"
        if args.model is None:
            report["model"] = write_synthetic_gguf(path, args.size_mib, "Q8_0")
        record(inventory=check_inventory(nvml))
        load, decode, sigkill = check_load_decode_sigkill(run, path, nvml)
        record(load=load, decode=decode, sigkill=sigkill)
        record(budget=check_budget(run, path, nvml, load["measured_bytes"] or load["estimated_bytes"]))
        record(spare=check_spare(run, path, nvml))
        record(batching=check_batching(path, nvml, args.levels, args.out.with_name("batching.log")))
    finally:
        shutil.rmtree(run, ignore_errors=True)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
