"""The client installs alone: importing every module of ``model_client`` loads none of the server's packages, so
an agent on another machine needs neither the engines nor the daemons (``pip install`` without the extras)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

SERVER_ONLY = {
    "agents",
    "av",
    "daemonkit",
    "faster_whisper",
    "gguf",
    "llama_cpp",
    "model_manager",
    "numpy",
    "piper",
    "prometheus_client",
    "psutil",
    "pynvml",
    "services",
    "structlog",
    "supervisor",
}
IMPORT_ALL = """
import importlib, json, pkgutil, sys
import model_client
for module in pkgutil.iter_modules(model_client.__path__):
    importlib.import_module(f"model_client.{{module.name}}")
{planted}
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""


def top_level_modules_after(planted: str = "") -> set[str]:
    code = IMPORT_ALL.format(planted=planted)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    return set(json.loads(run.stdout))


def test_the_client_loads_no_server_package() -> None:
    loaded = top_level_modules_after()
    assert "model_client" in loaded and "zmq" in loaded
    assert not loaded & SERVER_ONLY, sorted(loaded & SERVER_ONLY)


def test_the_check_sees_a_server_package_slipped_in() -> None:
    assert "structlog" in top_level_modules_after("import structlog") & SERVER_ONLY
