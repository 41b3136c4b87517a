"""A daemon as a child process, for the tests and the benchmarks: start ``python -m <module> --config <yaml>``, wait
until its request socket answers ``ping`` (or, for a daemon serving TCP, until it writes its ``--ports-file``), failing
at once with its log if it exits first; stop it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from model_client.client import ModelClient
from model_client.endpoints import REPO_ROOT


class DaemonExited(RuntimeError):
    """The daemon ended before it answered ``ping``."""


class DaemonProcess:
    def __init__(
        self, module: str, config_path: Path, endpoint: str, log_path: Path | None = None, *extra: str
    ) -> None:
        self.module = module
        self.config_path = config_path
        self.endpoint = endpoint  # its request socket, which answers ping once it is ready (a TCP-only daemon: the
        # manager's, and wait_ports instead)
        self.log_path = log_path  # None: the daemon's output goes to ours
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 30.0) -> DaemonProcess:
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-m", self.module, "--config", str(self.config_path), *self.extra]
        env = dict(os.environ, PYTHONPATH=pythonpath)
        if self.log_path is None:
            self.proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT)
        else:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=REPO_ROOT)
        if wait:
            self.wait_ready(timeout)
        return self

    def _stopped_on_failure(self) -> None:
        """A start that failed (no answer, no ports) leaves nothing running behind it."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop(timeout=10)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """The daemon's ``ping`` answer, once it gives one."""

        def still_running(_waited: float) -> None:
            if self.proc is None or self.proc.poll() is not None:
                raise DaemonExited(f"{self.module} exited before it answered ping\n{self.log_tail()}")

        try:
            with ModelClient(self.endpoint, retries=0) as client:
                return client.wait_ready(timeout=timeout, on_wait=still_running, interval=0.25)
        except BaseException:
            self._stopped_on_failure()
            raise

    def wait_ports(self, ports_file: Path, timeout: float = 30.0) -> dict[str, int]:
        """For a daemon that serves TCP, started with ``--ports-file``: the ports it listens on, once it does."""
        deadline = time.monotonic() + timeout
        while not ports_file.exists():
            if self.proc is None or self.proc.poll() is not None:
                raise DaemonExited(f"{self.module} exited before it listened\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self._stopped_on_failure()
                raise TimeoutError(f"{self.module} did not listen in {timeout} s\n{self.log_tail()}")
            time.sleep(0.05)
        return json.loads(ports_file.read_text())

    def client(self, **kwargs: Any) -> ModelClient:
        return ModelClient(self.endpoint, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Its exit code; killed if it has not stopped ``timeout`` seconds after ``sig`` (0: never started)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
