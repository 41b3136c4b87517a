"""The per-model worker process: one backend, one DEALER socket to the manager's worker ROUTER.

A worker starts as a spare (interpreter up, engine imported), is told to ``load`` one model, then serves
``run`` commands one at a time until told to ``exit``. Ending the process is what gives all the model's memory
back; a native abort inside the engine ends this process only, and the manager sees it die.

Messages (msgpack maps), manager -> worker: ``{cmd: load, spec}``, ``{cmd: run, rid, op, args}``,
``{cmd: exit}``; worker -> manager: ``{evt: ready, pid}``, ``{evt: loaded, info}``, ``{evt: load_failed, error}``,
``{evt: chunk, rid, chunk}``, ``{evt: done, rid, result}``, ``{evt: failed, rid, error}``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import traceback
from typing import Any

import msgpack
import msgspec
import zmq

from model_client.errors import InternalError, ModelLoadFailed, ModelManagerError
from model_manager.backends import Backend, create_backend, warm_up
from model_manager.config import KvCacheSettings, ModelSpec

PARENT_CHECK_MS = 1000


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the manager dies, so no orphan keeps a model in memory."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    def __init__(self, endpoint: str, worker_id: str, kind: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(endpoint)
        self.parent = os.getppid()
        self.kind = kind
        self.backend: Backend | None = None

    def send(self, message: dict[str, Any]) -> None:
        self.sock.send(msgpack.packb(message, use_bin_type=True))

    def serve(self) -> None:
        self.send({"evt": "ready", "pid": os.getpid(), "rss": resident_bytes()})
        while True:
            if not self.sock.poll(PARENT_CHECK_MS):
                if os.getppid() != self.parent:
                    return
                continue
            message = msgpack.unpackb(self.sock.recv(), raw=False)
            cmd = message.get("cmd")
            if cmd == "load":
                self._load(message["spec"], message.get("warm", False), message.get("name", "model"), message.get("kv"))
            elif cmd == "run":
                self._run(message["rid"], message["op"], message["args"])
            elif cmd == "exit":
                if self.backend is not None:
                    self.backend.unload()
                return

    def _load(self, spec_map: dict[str, Any], warm: bool, name: str, kv_map: dict[str, Any] | None) -> None:
        try:
            spec = msgspec.convert(spec_map, ModelSpec)
            kv = msgspec.convert(kv_map, KvCacheSettings) if kv_map else None
            self.backend = create_backend(spec.kind)
            info = self.backend.load(spec, name, kv)
            if warm:
                self.backend.warm_up()
        except ModelManagerError as exc:
            self.send({"evt": "load_failed", "error": exc.to_wire()})
        except Exception as exc:
            self.send({"evt": "load_failed", "error": ModelLoadFailed(f"{type(exc).__name__}: {exc}").to_wire()})
        else:
            info["pid"] = os.getpid()
            info["rss_bytes"] = resident_bytes()
            self.send({"evt": "loaded", "info": info})

    def _run(self, rid: str, op: str, args: dict[str, Any]) -> None:
        assert self.backend is not None, "run before load"

        def emit(chunk: dict[str, Any]) -> None:
            self.send({"evt": "chunk", "rid": rid, "chunk": chunk})

        try:
            result = self.backend.run(op, args, emit)
        except ModelManagerError as exc:
            self.send({"evt": "failed", "rid": rid, "error": exc.to_wire()})
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            error = InternalError(f"{type(exc).__name__}: {exc}")
            self.send({"evt": "failed", "rid": rid, "error": error.to_wire()})
        else:
            self.send({"evt": "done", "rid": rid, "result": result})
        # The reply is out: now save the conversation's state, off the request's critical path.
        self.backend.after_reply(idle=not self.sock.poll(0))
        self.send({"evt": "idle", "kv": self.backend.kv_stats()})


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), read without importing psutil into every worker."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="model worker (started by the model manager)")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--kind", default="llm")
    args = parser.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the manager, which ends workers itself
    warm_up(args.kind)
    worker = Worker(args.endpoint, args.id, args.kind)
    try:
        worker.serve()
    finally:
        worker.sock.close(linger=1000)
        worker.ctx.term()
    # Skip the interpreter's teardown: the model's memory goes back as soon as the process is gone.
    os._exit(0)


if __name__ == "__main__":
    main()
