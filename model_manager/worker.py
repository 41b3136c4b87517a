"""The per-model worker process: one backend, one DEALER socket to the manager's worker ROUTER.

A worker starts as a spare (interpreter up, engine imported), is told to ``load`` one model, then serves
``run`` commands until told to ``exit``: one at a time; or, for a backend's batchable ops, as many as arrive
within its batch wait (up to its batch size), run together; or, for a stepping backend (an LLM with ``parallel``
sequences), each request joins the running ones as it arrives and the worker steps them all together, reading
its socket between steps. Ending the process is what gives all the model's memory
back; a native abort inside the engine ends this process only, and the manager sees it die.

The messages are the typed structs of ``worker_protocol`` (docs/workers.md).
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import os
import signal
import sys
import time
import traceback
from collections import deque
from typing import Any, TextIO

import zmq

from model_client.errors import InternalError, ModelLoadFailed, ModelManagerError
from model_client.results import Completion
from model_manager import native
from model_manager import worker_protocol as wire
from model_manager.backends import PAYLOAD, Backend, create_backend, warm_up
from model_manager.gatekeeper import SECRET_ENV

PARENT_CHECK_MS = 1000
DIRECT_OPS = frozenset({"conversation.drop", "embed"})  # a stepping backend runs these at once, between steps
STATS_EVERY_S = 1.0


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this worker when the manager dies, so no orphan keeps a model in memory. The manager may
    have died before this line ran (the signal is only sent for a death after it is asked for): then the worker's
    parent is no longer the manager, and it ends at once."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:
        os._exit(0)


class Worker:
    def __init__(self, endpoint: str, worker_id: str, kind: str, parent: int, secret: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 1000)
        # The manager's workers socket admits only the workers it started: each proves it with its own secret.
        self.sock.plain_username = worker_id.encode()
        self.sock.plain_password = secret.encode()
        self.sock.connect(endpoint)
        self.parent = parent
        self.kind = kind
        self.backend: Backend | None = None
        self.pending: deque[wire.ToWorker] = deque()  # read while collecting a batch, handled after it
        self.current: str | None = None  # the request being served
        self.deadline: float | None = None  # ...and when its client gives up (monotonic)
        self.stop_reason: str | None = None
        self.deadlines: dict[str, float] = {}  # a stepping backend's requests, by id: when their client gives up
        self._next_stats = 0.0

    def send(self, message: wire.FromWorker) -> None:
        self.sock.send(wire.encode(message))

    def _receive(self) -> wire.ToWorker:
        return wire.decode_to_worker(self.sock.recv())

    def _next(self, timeout_ms: float) -> wire.ToWorker | None:
        if self.pending:
            return self.pending.popleft()
        if not self.sock.poll(timeout_ms):
            return None
        return self._receive()

    def _forget(self, rid: str) -> None:
        """A request cancelled while it still waits here: it never runs."""
        self.pending = deque(m for m in self.pending if not (isinstance(m, wire.Run) and m.rid == rid))

    @property
    def stepping(self) -> bool:
        return self.backend is not None and hasattr(self.backend, "step")

    def serve(self) -> None:
        self.send(wire.Ready(pid=os.getpid(), rss=resident_bytes()))
        while True:
            if self.stepping and self.backend.busy:  # type: ignore[union-attr]
                if self._step():
                    return
                continue
            message = self._next(PARENT_CHECK_MS)
            if message is None:
                if os.getppid() != self.parent:
                    return
                continue
            if isinstance(message, wire.Load):
                self._load(message)
            elif isinstance(message, wire.Run):
                if self.stepping and message.op not in DIRECT_OPS:
                    self._submit(message)
                elif self.backend is not None and message.op in self.backend.batchable_ops:
                    self._run_batch(self._collect(message))
                else:
                    self._run(message)
            elif isinstance(message, wire.Cancel):
                self._forget(message.rid)
            elif isinstance(message, wire.Threads):
                self._set_threads(message.n)
            elif isinstance(message, wire.Exit):
                if self.backend is not None:
                    self.backend.unload()
                return

    def _load(self, load: wire.Load) -> None:
        try:
            spec = load.spec
            if spec.nice:
                os.nice(spec.nice)
            self.backend = create_backend(spec.kind)
            info = self.backend.load(spec, load.name, load.kv, load.limits)
            # Speech models always run once at load: cheap, and the measured size then includes working buffers.
            if load.warm or spec.kind != "llm":
                self.backend.warm_up()
        except ModelManagerError as exc:
            self.send(wire.LoadFailed(error=exc.to_wire()))
        except Exception as exc:
            self.send(wire.LoadFailed(error=ModelLoadFailed(f"{type(exc).__name__}: {exc}").to_wire()))
        else:
            info["pid"] = os.getpid()
            info["rss_bytes"] = resident_bytes()
            self.send(wire.Loaded(info=info))

    def _set_threads(self, n: int) -> None:
        set_threads = getattr(self.backend, "set_threads", None)
        if set_threads is not None:
            set_threads(n)

    def should_stop(self) -> bool:
        """Asked by a backend between tokens: has the client given up (deadline) or gone away (cancel)?"""
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stop_reason = "deadline"
            return True
        while self.sock.poll(0):
            message = self._receive()
            if isinstance(message, wire.Cancel):
                if message.rid == self.current:
                    self.stop_reason = "cancelled"
                    return True
                self._forget(message.rid)
            elif isinstance(message, wire.Threads):  # from the next token on: another model started computing
                self._set_threads(message.n)
            else:
                self.pending.append(message)
        return False

    def _run(self, run: wire.Run) -> None:
        assert self.backend is not None, "run before load"
        rid = run.rid

        def emit(chunk: dict[str, Any]) -> None:
            self.send(wire.Chunk(rid=rid, chunk=chunk, payload=chunk.pop(PAYLOAD, None)))

        self.current, self.stop_reason = rid, None
        self.deadline = time.monotonic() + run.deadline_s if run.deadline_s is not None else None
        self.backend.should_stop = self.should_stop
        try:
            result = self.backend.run(run.op, run.args, emit)
        except ModelManagerError as exc:
            self.send(wire.Failed(rid=rid, error=exc.to_wire()))
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self.send(wire.Failed(rid=rid, error=InternalError(f"{type(exc).__name__}: {exc}").to_wire()))
        else:
            self._done(rid, result, self.stop_reason)
        self.current = self.deadline = None
        # The reply is out: now save the conversation's state, off the request's critical path.
        self.backend.after_reply(idle=not self.pending and not self.sock.poll(0))
        self.send(wire.Idle(kv=self.backend.kv_stats()))

    # ----- a stepping backend: requests join and leave between steps ---------------------------------------------

    def _submit(self, run: wire.Run) -> None:
        backend: Any = self.backend
        rid = run.rid
        try:
            backend.submit(rid, run.args, voice=run.voice)
        except ModelManagerError as exc:
            self.send(wire.Failed(rid=rid, error=exc.to_wire()))
            return
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self.send(wire.Failed(rid=rid, error=InternalError(f"{type(exc).__name__}: {exc}").to_wire()))
            return
        if run.deadline_s is not None:
            self.deadlines[rid] = time.monotonic() + run.deadline_s

    def _step(self) -> bool:
        """Read what arrived, end requests whose client gave up, decode one step; True when told to exit."""
        backend: Any = self.backend
        while self.pending or self.sock.poll(0):
            message = self.pending.popleft() if self.pending else self._receive()
            if isinstance(message, wire.Run):
                if message.op in DIRECT_OPS:
                    self._run(message)
                else:
                    self._submit(message)
            elif isinstance(message, wire.Cancel):
                self._cancel(message.rid, "cancelled")
            elif isinstance(message, wire.Threads):
                self._set_threads(message.n)
            elif isinstance(message, wire.Exit):
                backend.unload()
                return True
        now = time.monotonic()
        for rid in [rid for rid, deadline in self.deadlines.items() if now > deadline]:
            self._cancel(rid, "deadline")
        try:
            outcomes = backend.step()
        except Exception as exc:  # the engine is in an unknown state: fail what runs, let the manager restart it
            traceback.print_exc(file=sys.stderr)
            error = InternalError(f"{type(exc).__name__}: {exc}")
            for rid in list(backend.requests):
                self.send(wire.Failed(rid=rid, error=error.to_wire()))
            os._exit(3)
        self._send_chunks()
        for outcome in outcomes:
            self._finish(outcome)
        if now >= self._next_stats:
            self._next_stats = now + STATS_EVERY_S
            self.send(wire.Stats(kv=backend.kv_stats(), batching=backend.batching_stats()))
        if not backend.busy:
            backend.after_reply(idle=True)
            self.send(wire.Idle(kv=backend.kv_stats()))
        return False

    def _send_chunks(self) -> None:
        """Every stream's text that is due, in one message (before any of their results)."""
        chunks = self.backend.take_chunks(time.monotonic())  # type: ignore[union-attr]
        if chunks:
            self.send(wire.Chunks(items=[wire.stream_item(rid, chunk) for rid, chunk in chunks]))

    def _cancel(self, rid: str, reason: str) -> None:
        """End a stepping request between steps: its last text, then its partial result."""
        outcome = self.backend.cancel(rid, reason)  # type: ignore[union-attr]
        if outcome is not None:
            self._send_chunks()
            self._finish(outcome)

    def _finish(self, outcome: tuple[str, dict[str, Any] | Completion | Exception]) -> None:
        rid, result = outcome
        self.deadlines.pop(rid, None)
        if isinstance(result, ModelManagerError):
            self.send(wire.Failed(rid=rid, error=result.to_wire()))
        elif isinstance(result, Exception):
            self.send(wire.Failed(rid=rid, error=InternalError(f"{type(result).__name__}: {result}").to_wire()))
        else:
            self._done(rid, result)

    def _done(self, rid: str, result: dict[str, Any] | Completion, stopped: str | None = None) -> None:
        """A request's result: a generation's typed, any other op's a map with its binary payload apart."""
        if isinstance(result, Completion):
            result.stopped = stopped or result.stopped
            self.send(wire.Generated(rid=rid, result=result))
            return
        if stopped:
            result["stopped"] = stopped
        self.send(wire.Done(rid=rid, result=result, payload=result.pop(PAYLOAD, None)))

    # ----- a batching backend: requests collected, then run together ------------------------------------------

    def _collect(self, first: wire.Run) -> list[wire.Run]:
        """``first`` and the runs of the same op that arrive within the batch wait, up to the batch size.
        Anything else read meanwhile is kept, in order, for after the batch."""
        assert self.backend is not None
        batch = [first]
        deadline = time.monotonic() + self.backend.batch_wait_s
        while len(batch) < self.backend.batch_size:
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0 or not self.sock.poll(left_ms):
                break
            message = self._receive()
            if isinstance(message, wire.Run) and message.op == first.op:
                batch.append(message)
            else:
                self.pending.append(message)
        return batch

    def _run_batch(self, batch: list[wire.Run]) -> None:
        assert self.backend is not None
        try:
            outcomes = self.backend.run_batch(batch[0].op, [run.args for run in batch])
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            outcomes = [exc] * len(batch)
        for run, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, ModelManagerError):
                self.send(wire.Failed(rid=run.rid, error=outcome.to_wire()))
            elif isinstance(outcome, Exception):
                error = InternalError(f"{type(outcome).__name__}: {outcome}")
                self.send(wire.Failed(rid=run.rid, error=error.to_wire()))
            else:
                self._done(run.rid, outcome)
        self.send(wire.Idle(kv=None))


def _open_report(fd: int | None) -> TextIO | None:
    """Python's stacks go to the manager's crash report on a fatal signal (faulthandler writes them from the signal
    handler, so they reach the file even when the process can do nothing else)."""
    if fd is None:
        return None
    report = os.fdopen(fd, "w", buffering=1)
    faulthandler.enable(file=report, all_threads=True)
    return report


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), read without importing psutil into every worker."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="model worker (started by the model manager)")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--kind", default="llm")
    parser.add_argument("--parent", type=int, required=True, help="the manager's pid: the worker ends with it")
    parser.add_argument("--report-fd", type=int, help="a file the manager reads if this worker dies of a signal")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    secret = os.environ.pop(SECRET_ENV, "")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the manager, which ends workers itself
    report = _open_report(args.report_fd)
    warm_up(args.kind)
    if report is not None:  # after the engine's import, which loads its libraries (6 ms for an LLM, 20 for Whisper)
        native.write_report_header(report)
    worker = Worker(args.endpoint, args.id, args.kind, args.parent, secret)
    try:
        worker.serve()
    finally:
        worker.sock.close(linger=1000)
        worker.ctx.term()
    # Skip the interpreter's teardown: the model's memory goes back as soon as the process is gone.
    os._exit(0)


if __name__ == "__main__":
    main()
