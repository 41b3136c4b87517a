"""Native libraries in a worker: one C++ runtime for all of them, and a readable account when one crashes anyway.

An engine library built by a toolchain that links its C++ runtime statically (a CUDA build of llama.cpp from a
custom or conda compiler) exports that runtime's symbols. Loaded with ``RTLD_GLOBAL`` (as llama-cpp-python loads
its libraries) beside the shared runtime that pyzmq's libzmq uses, some calls land in one copy and some in the
other, and the process dies with SIGSEGV in a thread of neither (seen on a CUDA machine: every GPU worker died at
its first message). A worker therefore starts with the manager's own shared C++ runtime preloaded (``LD_PRELOAD``,
the dynamic linker's first choice for every lookup), so there is one runtime in the process whatever the engine
carries.

Should a worker die of a signal all the same, its Python stacks (``faulthandler``) and the engine libraries found
carrying their own runtime are written to a file the manager made for it, and the manager's error says what the
worker was doing, which signal, the last frames, and what to try.
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

CXX_RUNTIME = "libstdc++.so.6"
REPORT_LIMIT = 64 * 1024  # bytes of a crash report read back: its start (the libraries) and its end (the crash)
EMBEDDED_MARK = "embedded C++ runtime: "
RUNTIME_MARK = "C++ runtime in use: "
RTLD_NOLOAD = 4  # glibc


def loaded_libraries() -> list[str]:
    """Paths of the shared objects mapped into this process (in address order, each once)."""
    seen: dict[str, None] = {}
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if ".so" in os.path.basename(path):
                    seen.setdefault(path, None)
    except OSError:
        return []
    return list(seen)


def shared_cxx_runtime() -> str | None:
    """The shared C++ runtime this process uses (pyzmq's libzmq links it), the one a worker should use too."""
    return next((p for p in loaded_libraries() if os.path.basename(p).startswith(CXX_RUNTIME)), None)


def worker_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the shared C++ runtime preloaded ahead of whatever was (the user's preloads are kept)."""
    runtime = shared_cxx_runtime()
    if runtime is None:
        return env
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    if runtime not in preload:
        preload.insert(0, runtime)
    return dict(env, LD_PRELOAD=" ".join(preload))


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _defining_library(symbol: ctypes._CFuncPtr) -> str | None:
    """The file of the loaded object ``symbol``'s address lies in (``dladdr``)."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(ctypes.cast(symbol, ctypes.c_void_p).value, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode(errors="replace"))


def runtime_in_use() -> str | None:
    """The library the process's C++ runtime calls resolve to (the global lookup, as every library's would)."""
    try:
        return _defining_library(ctypes.CDLL(None).__cxa_begin_catch)
    except AttributeError:
        return None


def libraries_with_embedded_runtime() -> list[str]:
    """Loaded libraries other than the C++ runtime itself that define its symbols: each carries a copy of it.

    ``dlsym`` on a library's own handle looks in that library before its dependencies, and ``dladdr`` names the
    object a symbol's address lies in, so a library that merely links the shared runtime is not counted."""
    found = []
    for path in loaded_libraries():
        name = os.path.basename(path)
        if name.startswith(("libstdc++", "libc++", "ld-linux", "libc.so")):
            continue
        try:
            symbol = ctypes.CDLL(path, mode=RTLD_NOLOAD).__cxa_begin_catch
        except (OSError, AttributeError):
            continue
        if _defining_library(symbol) == os.path.realpath(path):
            found.append(path)
    return found


def write_report_header(report: TextIO) -> None:
    """Facts a crash report starts with, found once the engine is imported."""
    for path in libraries_with_embedded_runtime():
        report.write(f"{EMBEDDED_MARK}{path}\n")
    report.write(f"{RUNTIME_MARK}{runtime_in_use()}\n")
    report.flush()


@dataclass(frozen=True)
class Death:
    """Why a worker is gone, for a person: the phase it was in, the signal, the report's last frames, a remedy."""

    exit_code: int
    phase: str  # what it was doing: "importing its engine", "loading", "serving"
    signal: str | None
    frames: list[str]
    embedded_runtime: list[str]
    runtime: str | None  # the C++ runtime the process's calls resolved to

    @property
    def remedy(self) -> str | None:
        if self.signal == "SIGKILL":
            return "killed from outside: often the kernel's out-of-memory killer (see dmesg); give it more memory"
        if self.signal == "SIGILL":
            return (
                "the engine was built for instructions this CPU lacks: rebuild llama-cpp-python here "
                "(pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python llama-cpp-python)"
            )
        if self.signal in ("SIGSEGV", "SIGBUS", "SIGABRT") and self.embedded_runtime:
            names = ", ".join(os.path.basename(p) for p in self.embedded_runtime)
            return (
                f"{names} carries its own C++ runtime (linked statically) and the shared one preloaded beside it "
                "did not help: build the engine with the system's compiler"
            )
        if self.signal in ("SIGSEGV", "SIGBUS", "SIGABRT"):
            return "a native library crashed: the error's details list the crashed thread's last Python frames"
        return None

    def message(self, model: str) -> str:
        what = f"killed by {self.signal}" if self.signal else f"exited with code {self.exit_code}"
        text = f"worker for {model!r} {what} while {self.phase}"
        if self.frames:
            text += f" (in {self.frames[0]})"
        return text + (f"; {self.remedy}" if self.remedy else "")

    def details(self) -> dict[str, object]:
        details: dict[str, object] = {"exit_code": self.exit_code, "phase": self.phase}
        if self.signal:
            details["signal"] = self.signal
        if self.frames:
            details["frames"] = self.frames
        if self.embedded_runtime:
            details["embedded_runtime"] = self.embedded_runtime
        if self.runtime:
            details["cxx_runtime"] = self.runtime
        if self.remedy:
            details["remedy"] = self.remedy
        return details


def signal_name(exit_code: int) -> str | None:
    if exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


def read_report(fd: int) -> str:
    """A worker's crash report, read from the manager's own descriptor of the file: its start (the libraries it found)
    and, of a long one, its end (faulthandler's stacks), at most ``REPORT_LIMIT`` bytes."""
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, min(size, REPORT_LIMIT // 8), 0)
        tail = os.pread(fd, REPORT_LIMIT, max(len(head), size - REPORT_LIMIT)) if size > len(head) else b""
    except OSError:
        return ""
    return (head + b"\n" + tail).decode(errors="replace")


def read_death(exit_code: int, phase: str, text: str) -> Death:
    """What a worker's crash report says (faulthandler's stacks, the libraries it found carrying a runtime)."""
    lines = text.splitlines()
    embedded = [line[len(EMBEDDED_MARK) :].strip() for line in lines if line.startswith(EMBEDDED_MARK)]
    runtime = next((line[len(RUNTIME_MARK) :].strip() for line in lines if line.startswith(RUNTIME_MARK)), None)
    return Death(exit_code, phase, signal_name(exit_code), crashing_frames(text), embedded, runtime)


def crashing_frames(report: str) -> list[str]:
    """The innermost Python frames of the thread that crashed, from faulthandler's text ("File ..., line N in f")."""
    lines = report.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    if start is None:
        return []
    frames = []
    for line in lines[start + 1 :]:
        line = line.strip()
        if not line.startswith("File "):
            break
        path, _, rest = line[5:].partition(", line ")
        frames.append(f"{Path(path.strip(chr(34))).name}:{rest}")
    return frames[:5]
