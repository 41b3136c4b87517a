"""The manager's side of pulls: one process per pull (``python -m model_manager.pulls``), its lines read from a
pipe in the broker's poll loop, relayed to the clients that asked as stream chunks and to subscribers as
``model.pull`` events; the fit check answered between the header and the download; the catalogue fragment written
only after every file is verified.

Two requests for the same model share one pull (the second sees its progress from then on), as long as that pull
has not answered: a request that comes after a pull failed starts a pull of its own, even while the failed one's
process is still ending. A ``check`` runs a pull process of its own that stops after the header. A client that goes
away does not stop a pull.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import structlog

from model_client import protocol
from model_client.errors import BadRequest, Busy, InsufficientMemory, ModelManagerError, PullFailed, error_from_wire
from model_manager.catalogue import model_body
from model_manager.config import Config, ModelName, ModelSpec, resolve_model
from model_manager.footprint import GgufFacts
from model_manager.kvcache import model_folder
from model_manager.pulls.refs import Ref, parse_ref
from model_manager.slots import Waiter

EVENT_MODEL_PULL = protocol.EVENT_MODEL_PULL


@dataclass
class PullWaiter(Waiter):
    stream: bool = False  # progress chunks before the result (DEALER clients)


MAX_LINE = 1 << 20
PULL_STOP_S = 5.0  # what the pulls get, together, to stop when the manager does

log = structlog.get_logger("model_manager.pulls")


@dataclass
class Pull:
    name: str
    ref: Ref
    check: bool
    allow_no_fit: bool
    process: subprocess.Popen
    dest: str
    waiters: list[Waiter] = field(default_factory=list)
    buffer: bytes = b""
    started: float = field(default_factory=time.monotonic)
    status: str = "resolving"
    kind: str | None = None
    total: int | None = None
    completed: int = 0
    fit: dict[str, Any] | None = None
    header: dict[str, Any] = field(default_factory=dict)
    answered: bool = False

    def report(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "ref": self.ref.text,
            "status": self.status,
            "kind": self.kind,
            "completed": self.completed,
            "total": self.total,
            "check": self.check,
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }


# What the tracker needs from the manager: the fit of a model not yet on disk, and the catalogue to add it to.
Fit = Callable[[ModelSpec, GgufFacts | None, int | None], dict[str, Any]]


class Pulls:
    def __init__(self, config: Config, outbox: Any, fit: Fit, catalogue: Any, register: Callable[[int, bool], None]):
        self.config = config
        self.settings = config.catalogue
        self.outbox = outbox
        self.fit = fit
        self.catalogue = catalogue
        self.register = register  # (fd, add): the broker's poller watches the pipes
        self.by_fd: dict[int, Pull] = {}
        self.gpus = False  # set by the broker: whether the inventory has GPUs (pulled LLMs then go on them)

    # ----- requests -------------------------------------------------------------------------------------------

    def start(self, waiter: Waiter, ref_text: str, name: str | None, check: bool, allow_no_fit: bool) -> None:
        ref = parse_ref(ref_text)
        name = name or ref.default_name
        try:
            msgspec.convert(name, ModelName)
        except msgspec.ValidationError:
            raise BadRequest(f"{name!r} is not a valid model name: pass another name", field="name") from None
        if name in self.catalogue.fixed or name in self.catalogue.aliases:
            what = "an alias" if name in self.catalogue.aliases else "a model of the main YAML"
            raise PullFailed(f"{name!r} is {what} already: pull with another name", reason="exists", model=name)
        # A pull already answered (failed, or done) is only waiting for its process to end: a new request never
        # joins it, or it would get that pull's last chunk and no answer of its own.
        running = [pull for pull in self.by_fd.values() if not pull.answered]
        if not check:
            for pull in running:
                if pull.name == name and not pull.check:
                    pull.waiters.append(waiter)
                    self._chunk(waiter, {"status": pull.status, "completed": pull.completed, "total": pull.total})
                    return
        if len(running) >= self.settings.max_pulls:
            raise Busy(f"{len(running)} pulls are running (catalogue.max_pulls)", retry_after_ms=5000)
        dest = Path(self.settings.models_dir) / model_folder(name).replace(":", "_")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "model_manager.pulls",
                "--ref",
                ref.text,
                "--dest",
                str(dest),
                "--keep-free",
                str(self.settings.keep_free_mib * 2**20),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert process.stdout is not None
        fd = process.stdout.fileno()
        os.set_blocking(fd, False)
        pull = Pull(name, ref, check, allow_no_fit, process, str(dest), waiters=[waiter])
        self.by_fd[fd] = pull
        self.register(fd, True)
        log.info("pull_started", model=name, ref=ref.text, check=check, pid=process.pid)
        self._chunk(waiter, {"status": "resolving", "model": name})

    # ----- the pipes ------------------------------------------------------------------------------------------

    def on_readable(self, fd: int) -> None:
        pull = self.by_fd[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self._ended(fd, pull)
            return
        pull.buffer += data
        while b"\n" in pull.buffer:
            line, pull.buffer = pull.buffer.split(b"\n", 1)
            try:
                self._on_line(pull, msgspec.json.decode(line))
            except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
                self._fail(pull, PullFailed(f"the pull process said something unreadable: {exc}", reason="network"))
        if len(pull.buffer) > MAX_LINE:
            self._fail(pull, PullFailed("the pull process wrote a line too long", reason="network"))

    def _on_line(self, pull: Pull, line: dict[str, Any]) -> None:
        event = line["event"]
        if event == "resolved":
            pull.kind, pull.total, pull.status = line["kind"], line["total"], "resolved"
            self._progress(pull, {"status": "resolved", "kind": pull.kind, "files": line["files"], "total": pull.total})
        elif event in ("facts", "sizes"):
            self._on_fit(pull, line)
        elif event == "progress":
            pull.status, pull.completed = "downloading", int(line["completed"])
            self._progress(
                pull, {"status": "downloading", "file": line["file"], "completed": pull.completed, "total": pull.total}
            )
        elif event == "verified":
            pull.completed = int(line["completed"])
            self._progress(
                pull,
                {
                    "status": "verified",
                    "file": line["file"],
                    "sha256": line["sha256"],
                    "completed": pull.completed,
                    "total": pull.total,
                },
            )
        elif event == "retrying":
            keys = ("reason", "message", "tries", "wait_s")
            self._progress(pull, {"status": "retrying", **{k: line[k] for k in keys}, "total": pull.total})
        elif event == "done":
            self._on_done(pull, line)
        elif event == "error":
            self._fail(pull, error_from_wire(line["error"]))

    def _spec(self, pull: Pull, line: dict[str, Any], path: str) -> ModelSpec:
        """The catalogue entry a pulled model gets: an LLM on the GPUs when there are any, speech as configured."""
        if pull.kind == "llm":
            return self._resolve(
                {
                    "kind": "llm",
                    "path": path,
                    "quantization": line["quantization"],
                    "n_gpu_layers": -1 if self.gpus else 0,
                }
            )
        return self._resolve(
            {"kind": pull.kind, "path": path, **({"compute_type": "int8"} if pull.kind == "stt" else {})}
        )

    def _resolve(self, body: dict[str, Any]) -> ModelSpec:
        spec = msgspec.convert(body, ModelSpec)
        return resolve_model(spec, self.config.defaults, Path("/"), "pull", "$")

    def _on_fit(self, pull: Pull, line: dict[str, Any]) -> None:
        facts = GgufFacts(**line["facts"]) if line["event"] == "facts" else None
        pull.header = {
            k: line[k] for k in ("quantization", "header_bytes", "header_requests", "file_bytes") if k in line
        }
        path = str(Path(pull.dest) / "model")
        spec = self._spec(pull, line, path)
        pull.fit = self.fit(spec, facts, line.get("total"))
        pull.status = "checked"
        self._progress(pull, {"status": "fit", **pull.fit, **pull.header, "total": pull.total})
        go = not pull.check and (pull.fit["fits"] or pull.allow_no_fit)
        self._say(pull, "go" if go else "stop")
        if pull.check:
            self._answer(
                pull,
                {
                    "model": pull.name,
                    "ref": pull.ref.text,
                    "check": True,
                    "kind": pull.kind,
                    "total": pull.total,
                    "fit": pull.fit,
                    **pull.header,
                },
            )
        elif not go:
            self._fail(
                pull,
                InsufficientMemory(
                    f"{pull.name} would fit on no device ({pull.fit['reason']}): not downloaded; "
                    "pull with allow_no_fit to fetch it anyway",
                    model=pull.name,
                    fit=pull.fit,
                ),
            )

    def _on_done(self, pull: Pull, line: dict[str, Any]) -> None:
        main = line["main"]
        path = str(Path(pull.dest) / main) if main else pull.dest
        spec = self._spec(pull, line, path)
        model = {**model_body(spec), "description": f"pulled from {pull.ref.text}"}
        model = {
            k: v
            for k, v in model.items()
            if k in ("kind", "path", "quantization", "n_gpu_layers", "compute_type", "description")
        }
        source = {
            "ref": pull.ref.text,
            "repo": line.get("repo"),
            "revision": line.get("revision"),
            "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": line["files"],
        }
        comment = (
            f"Pulled by `mm pull {pull.ref.text}`; `mm rm {pull.name}` removes it and its files. "
            "Edit freely: `mm reload` (or SIGHUP) takes the change."
        )
        reload = self.catalogue.add_pulled(pull.name, model, source, comment)
        pull.status = "success"
        self._progress(pull, {"status": "success", "completed": pull.total, "total": pull.total})
        self._answer(
            pull,
            {
                "model": pull.name,
                "ref": pull.ref.text,
                "status": "success",
                "kind": pull.kind,
                "total": pull.total,
                "files": line["files"],
                "fit": pull.fit,
                "added": pull.name in reload["added"] or pull.name in reload["changed"],
            },
        )
        log.info(
            "pull_done",
            model=pull.name,
            ref=pull.ref.text,
            bytes=pull.total,
            seconds=round(time.monotonic() - pull.started, 1),
        )

    def _ended(self, fd: int, pull: Pull) -> None:
        self.register(fd, False)
        del self.by_fd[fd]
        pull.process.stdout.close()  # type: ignore[union-attr]
        code = pull.process.wait()
        if not pull.answered:
            self._fail(pull, PullFailed(f"the pull process ended ({code}) before finishing", reason="network"))

    # ----- answers --------------------------------------------------------------------------------------------

    def _say(self, pull: Pull, word: str) -> None:
        try:
            pull.process.stdin.write(word.encode() + b"\n")  # type: ignore[union-attr]
            pull.process.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass

    def _chunk(self, waiter: Waiter, chunk: dict[str, Any]) -> None:
        if not getattr(waiter, "stream", False):
            return  # a REQ client, or one that asked for the final answer only
        self.outbox.send(waiter.route, protocol.encode_chunk(waiter.request_id, chunk))

    def _progress(self, pull: Pull, chunk: dict[str, Any]) -> None:
        for waiter in pull.waiters:
            self._chunk(waiter, chunk)
        self.outbox.publish(EVENT_MODEL_PULL, **{**pull.report(), **chunk, "model": pull.name})

    def _answer(self, pull: Pull, result: dict[str, Any]) -> None:
        pull.answered = True
        for waiter in pull.waiters:
            self.outbox.send(waiter.route, protocol.encode_result(waiter.request_id, result))
        pull.waiters.clear()

    def _fail(self, pull: Pull, error: ModelManagerError) -> None:
        if pull.answered:
            return
        pull.answered, pull.status = True, "failed"
        self.outbox.publish(EVENT_MODEL_PULL, **pull.report(), error=error.to_wire())
        for waiter in pull.waiters:
            self.outbox.send(waiter.route, protocol.encode_error(waiter.request_id, error))
        pull.waiters.clear()
        if pull.process.poll() is None:
            pull.process.terminate()
        log.warning("pull_failed", model=pull.name, ref=pull.ref.text, error=error.message)

    def report(self) -> list[dict[str, Any]]:
        return [pull.report() for pull in self.by_fd.values()]

    def shutdown(self) -> None:
        """Every pull is told to stop at once (its part is kept for the next pull) and all are given 5 s together;
        one that has not ended by then is killed, so no pull holds the manager's shutdown."""
        pulls = list(self.by_fd.values())
        for pull in pulls:
            self._fail(pull, PullFailed("the model manager shut down during the pull", reason="cancelled"))
        deadline = time.monotonic() + PULL_STOP_S
        for pull in pulls:
            try:
                pull.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pull.process.kill()
                log.warning("pull_killed", model=pull.name)
