"""An engine that carries its own C++ runtime, planted into the real workers: one runtime serves the process, and a
worker that dies of a signal is explained (what it was doing, the signal, its frames, the library, a remedy).

The planted engine is a small C++ library linked with ``-static-libstdc++`` (as a CUDA build of llama.cpp from a
custom toolchain is), loaded ``RTLD_GLOBAL`` just before ``llama_cpp`` is imported, through a ``sitecustomize``
on the workers' ``PYTHONPATH``. With the same compiler on both sides the two runtime copies agree, so nothing
crashes here by itself: where they differ (on a CUDA machine, every GPU worker died at its first message) the GPU
kit's run shows the fix.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_client import ModelClient
from model_client.cli import format_status
from model_client.errors import ModelFailed, ModelLoadFailed
from model_manager import native
from tests.conftest import ManagerProcess, base_config, model_status, wait_for

ENGINE_SOURCE = r"""
#include <sstream>
#include <stdexcept>
#include <string>
extern "C" int engine_touch(int n) {
    std::ostringstream out;
    for (int i = 0; i < n; ++i) out << i;
    try {
        throw std::runtime_error(out.str());
    } catch (const std::exception &e) {
        return (int)std::string(e.what()).size();
    }
}
extern "C" void engine_crash(void) { *(volatile int *)0 = 1; }
"""

SITECUSTOMIZE = r'''
"""Planted by tests/test_native_runtime.py: the engine library loads just before llama_cpp, as its own would."""
import ctypes, importlib.abc, os, sys

class _PlantEngine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "llama_cpp":
            return None
        sys.meta_path.remove(self)
        engine = ctypes.CDLL(os.environ["PLANTED_ENGINE"], mode=ctypes.RTLD_GLOBAL)
        assert engine.engine_touch(50) > 0
        if os.environ.get("PLANTED_CRASH_AT_LOAD"):
            def crash_on_load(*args, **kwargs):
                engine.engine_crash()

            import llama_cpp.llama_cpp as bindings

            bindings.llama_model_load_from_file = crash_on_load
        return None

sys.meta_path.insert(0, _PlantEngine())
'''


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the planted engine (built here) and the sitecustomize that loads it into workers."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the planted engine library")
    folder = tmp_path_factory.mktemp("planted")
    (folder / "engine.cpp").write_text(ENGINE_SOURCE)
    library = folder / "libplanted_engine.so"
    command = ["g++", "-shared", "-fPIC", "-O1", "-static-libstdc++", "-static-libgcc", "engine.cpp"]
    subprocess.run([*command, "-o", str(library)], cwd=folder, check=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


@pytest.fixture
def planted_manager(planted: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerProcess]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(planted), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PLANTED_ENGINE", str(planted / "libplanted_engine.so"))
    config = base_config(run_dir)
    config["manager"]["spare_workers"] = 0
    process = ManagerProcess(run_dir, config)
    process.start()
    yield process
    process.stop()


def test_the_planted_library_carries_its_own_runtime(planted: Path) -> None:
    """The plant is what it claims: it defines the C++ runtime's symbols and needs no shared runtime."""
    needed = subprocess.run(
        ["readelf", "-d", str(planted / "libplanted_engine.so")], capture_output=True, text=True, check=True
    ).stdout
    assert native.CXX_RUNTIME not in needed
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(planted / "libplanted_engine.so")], capture_output=True, text=True
    ).stdout
    assert "__cxa_begin_catch" in symbols


def test_a_worker_killed_while_serving_is_explained(planted_manager: ManagerProcess) -> None:
    """Killed with SIGSEGV while serving: the error names the signal, the phase, the frames and the planted library,
    and the worker's C++ runtime calls went to the shared runtime, not to the plant's copy (loaded before llama_cpp,
    ``RTLD_GLOBAL``: without the preload, the global lookup finds the plant first)."""
    with planted_manager.client(timeout=60) as client:
        reply = client.chat("smollm2", [{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0.0)
        assert reply.usage.completion_tokens >= 1
        pid = model_status(client, "smollm2")["pid"]
        os.kill(pid, signal.SIGSEGV)
        wait_for(lambda: model_status(client, "smollm2")["state"] == "failed", timeout=30)
        error = model_status(client, "smollm2")["last_error"]
    assert error["code"] == ModelFailed.code
    assert "killed by SIGSEGV while serving" in error["message"], error
    details = error["details"]
    assert details["signal"] == "SIGSEGV" and details["phase"] == "serving"
    assert details["frames"], "faulthandler's stack of the crashed thread"
    assert any(p.endswith("libplanted_engine.so") for p in details["embedded_runtime"])
    assert "libplanted_engine.so carries its own C++ runtime" in details["remedy"]
    assert os.path.basename(details["cxx_runtime"]).startswith(native.CXX_RUNTIME), details["cxx_runtime"]


def test_a_worker_that_crashes_while_loading_names_the_library_and_the_remedy(
    planted_manager: ManagerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash happens in the engine's native code during the load: the load error says so in words."""
    monkeypatch.setenv("PLANTED_CRASH_AT_LOAD", "1")
    planted_manager.stop()
    planted_manager.start()
    with ModelClient(planted_manager.endpoint, timeout=60) as client, pytest.raises(ModelLoadFailed) as failed:
        client.load("smollm2")
    message = str(failed.value)
    assert "killed by SIGSEGV while" in message and "carries its own C++ runtime" in message, message
    assert "crash_on_load" in message, "the innermost Python frame of the crash"
    assert failed.value.details["embedded_runtime"]
    with ModelClient(planted_manager.endpoint, timeout=60) as client:
        status = client.status()
    assert next(m for m in status["models"] if m["name"] == "smollm2")["last_error"]["message"] == message
    assert message in format_status(status), "mm status shows why"
