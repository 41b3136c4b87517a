"""The real daemon for a benchmark: its own temporary directory and sockets, a client, and a clean stop."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemonkit.process import DaemonProcess  # noqa: E402
from model_client import ModelClient  # noqa: E402

SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"


def llm_entry(path: Path, quantization: str, threads: int | None, **extra: object) -> dict:
    entry = {"kind": "llm", "path": str(path), "quantization": quantization, "n_ctx": 2048, "idle_ttl_s": -1, **extra}
    if threads is not None:
        entry["n_threads"] = threads
    return entry


def filled(config: dict, run_dir: Path) -> dict:
    """``config`` with sockets and state of its own under ``run_dir`` and quiet logs (what it sets itself stays)."""
    return {
        **config,
        "endpoints": {
            **{k: f"ipc://{run_dir}/{k}.sock" for k in ("requests", "events", "workers")},
            **config.get("endpoints", {}),
        },
        "manager": {"log_level": "warning", "state_dir": str(run_dir / "state"), **config.get("manager", {})},
        "metrics": {"port": 0, **config.get("metrics", {})},
    }


@contextmanager
def running_daemon(config: dict) -> Iterator[ModelClient]:
    """Start ``python -m model_manager`` on ``config`` (endpoints and state are filled in) and yield a client."""
    run_dir = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    config = filled(config, run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    endpoint = config["endpoints"]["requests"]
    ports_file = run_dir / "ports.json"
    daemon = DaemonProcess("model_manager", run_dir / "config.yaml", endpoint, None, "--ports-file", str(ports_file))
    client: ModelClient | None = None
    try:
        daemon.start(wait=False)
        if endpoint.endswith(":*"):  # a TCP endpoint on any free port: the manager says which
            daemon.endpoint = endpoint[:-1] + str(daemon.wait_ports(ports_file)["requests"])
        daemon.wait_ready(timeout=60)
        client = ModelClient(daemon.endpoint, timeout=300, retries=20)
        yield client
    finally:
        if client is not None:
            client.close()
        daemon.stop(timeout=30)
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class Stack:
    """The manager and its HTTP gateway, running: a client of the manager, the gateway's URL, the manager's pid."""

    client: ModelClient
    url: str
    manager_pid: int


@contextmanager
def running_gateway(config: dict) -> Iterator[Stack]:
    """The manager and its gateway on ``config`` (filled in as for ``running_daemon``; the gateway on a free port)."""
    run_dir = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    config = filled({**config, "gateway": {**config.get("gateway", {}), "port": 0}}, run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    endpoint = config["endpoints"]["requests"]
    manager = DaemonProcess("model_manager", run_dir / "config.yaml", endpoint)
    ports_file = run_dir / "gateway.ports.json"
    gateway = DaemonProcess("gateway", run_dir / "config.yaml", endpoint, None, "--ports-file", str(ports_file))
    try:
        manager.start(timeout=60)
        gateway.start(wait=False)
        url = f"http://127.0.0.1:{gateway.wait_ports(ports_file)['http']}"
        with ModelClient(endpoint, timeout=600) as client:
            yield Stack(client, url, manager.proc.pid)  # type: ignore[union-attr]
    finally:
        gateway.stop(timeout=10)
        manager.stop(timeout=30)
        shutil.rmtree(run_dir, ignore_errors=True)
