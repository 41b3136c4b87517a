"""Manager side of the worker processes: start them, keep spares warm, hand them out, end them."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import structlog
import zmq

from model_client.endpoints import REPO_ROOT
from model_manager import native
from model_manager import worker_protocol as wire
from model_manager.gatekeeper import SECRET_ENV, Gatekeeper, new_secret

KILL_WAIT_S = 2.0  # how long shutdown waits for a killed worker to be gone

log = structlog.get_logger("model_manager.pool")


@dataclass
class WorkerHandle:
    id: str
    proc: subprocess.Popen
    kind: str = "llm"  # the engine it imported ahead of time
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    model: str | None = None
    exit_deadline: float | None = None
    pidfd: int | None = None  # readable once the process has exited (Linux), so exits are seen at once
    report_fd: int | None = None  # the worker's crash report (an unlinked file it shares): read if it dies
    report: str = ""  # ...what it said, once the worker has died

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def death(self, code: int, phase: str | None = None) -> native.Death:
        """Why it is gone; ``phase``: what it was doing, when the caller knows better than ready or not."""
        return native.read_death(code, phase or ("serving" if self.ready else "importing its engine"), self.report)


class WorkerPool:
    """Starts workers that connect back to the manager's worker ROUTER socket and keeps ``spares`` warm."""

    def __init__(
        self,
        sock: zmq.Socket,
        endpoint: str,
        spares: int,
        poller: zmq.Poller,
        gatekeeper: Gatekeeper,
        kind: str = "llm",
    ) -> None:
        self.sock = sock
        self.gatekeeper = gatekeeper
        self.poller = poller
        self.endpoint = endpoint
        self.spares_wanted = spares
        self.kind = kind
        self.by_id: dict[str, WorkerHandle] = {}
        self._ids = itertools.count(1)

    def spawn(self, kind: str | None = None) -> WorkerHandle:
        worker_id = f"w{os.getpid()}-{next(self._ids)}"
        secret = new_secret()  # in the environment, not the command line, which any local user can read
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = native.worker_environment(dict(os.environ, PYTHONPATH=pythonpath, **{SECRET_ENV: secret}))
        self.gatekeeper.admit_worker(worker_id, secret)
        with tempfile.TemporaryFile(prefix="mm-worker-") as report:
            report_fd = os.dup(report.fileno())
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "model_manager.worker",
                "--endpoint",
                self.endpoint,
                "--id",
                worker_id,
                "--kind",
                kind or self.kind,
                "--parent",
                str(os.getpid()),
                "--report-fd",
                str(report_fd),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=False,
            pass_fds=(report_fd,),
        )
        handle = WorkerHandle(id=worker_id, proc=proc, kind=kind or self.kind, report_fd=report_fd)
        try:
            handle.pidfd = os.pidfd_open(proc.pid)
            self.poller.register(handle.pidfd, zmq.POLLIN)
        except (AttributeError, OSError):
            pass  # no pidfd here: the periodic reap still sees the exit, a tick later
        self.by_id[worker_id] = handle
        return handle

    def spares(self) -> list[WorkerHandle]:
        return [w for w in self.by_id.values() if w.model is None and w.exit_deadline is None]

    def refill(self) -> None:
        """Spares are kept for LLMs, the models that come and go; a speech model starts its own worker."""
        for _ in range(self.spares_wanted - sum(1 for w in self.spares() if w.kind == self.kind)):
            self.spawn()

    def take(self, model: str, kind: str) -> WorkerHandle:
        """A spare that imported ``kind``'s engine for ``model`` (ready ones first); else a fresh worker."""
        spares = sorted((w for w in self.spares() if w.kind == kind), key=lambda w: not w.ready)
        handle = spares[0] if spares else self.spawn(kind)
        handle.model = model
        return handle

    def send(self, handle: WorkerHandle, message: wire.ToWorker) -> None:
        self.sock.send_multipart([handle.id.encode(), wire.encode(message)])

    def end(self, handle: WorkerHandle, grace_s: float) -> None:
        """Ask the worker to exit; ``reap`` kills it if it is still there after ``grace_s``."""
        if handle.exit_deadline is None:
            handle.exit_deadline = time.monotonic() + grace_s
            if handle.ready:
                self.send(handle, wire.Exit())
            else:
                handle.proc.terminate()

    def reap(self) -> list[tuple[WorkerHandle, int]]:
        """Forget workers that have exited, killing those past their exit deadline; return (handle, code)."""
        now = time.monotonic()
        gone = []
        for handle in list(self.by_id.values()):
            code = handle.exited()
            if code is None and handle.exit_deadline is not None and now > handle.exit_deadline:
                handle.kill()  # not waited for here: a process stuck in the kernel would stop the loop with it
                code = handle.exited()
            if code is not None:
                del self.by_id[handle.id]
                self.gatekeeper.forget_worker(handle.id)
                self._forget_pidfd(handle)
                if code != 0 and handle.report_fd is not None:
                    handle.report = native.read_report(handle.report_fd)
                self._forget_report(handle)
                gone.append((handle, code))
        return gone

    def _forget_report(self, handle: WorkerHandle) -> None:
        if handle.report_fd is not None:
            os.close(handle.report_fd)
            handle.report_fd = None

    def _forget_pidfd(self, handle: WorkerHandle) -> None:
        if handle.pidfd is not None:
            self.poller.unregister(handle.pidfd)
            os.close(handle.pidfd)
            handle.pidfd = None

    def close(self, grace_s: float) -> None:
        """End every worker within ``grace_s``, then kill the rest; bounded even if one will not die (it dies with
        the manager all the same: each worker asks the kernel for SIGKILL when its parent goes)."""
        for handle in self.by_id.values():
            self.end(handle, grace_s)
        deadline = time.monotonic() + grace_s
        for handle in self.by_id.values():
            try:
                handle.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                handle.kill()
                try:
                    handle.proc.wait(timeout=KILL_WAIT_S)
                except subprocess.TimeoutExpired:
                    log.warning("worker_not_gone", worker=handle.id, pid=handle.pid)
            self._forget_pidfd(handle)
            self._forget_report(handle)
            self.gatekeeper.forget_worker(handle.id)
        self.by_id.clear()
