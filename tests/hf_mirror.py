"""A local stand-in for the Hugging Face hub and for plain file URLs, serving the installed models over HTTP.

It answers what ``huggingface_hub`` asks a hub (``/api/models/ORG/REPO[/revision/REV]?blobs=true`` with each file's
size and hash, ``/ORG/REPO/resolve/REV/FILE`` with ranges) and ``/files/NAME`` as plain URLs; tests point
``HF_ENDPOINT`` at it. Faults are planted per path: a connection cut once mid-file, a flipped byte, a size the
listing inflates; and, as a hostile or flaky hub would: answers of a chosen status (a 500, a 429 with
``Retry-After``), a body that goes silent halfway with its connection left open, a gated repo refused as the hub
refuses it (401 without a token, 403 with one, ``X-Error-Code: GatedRepo``), and any file name in a listing
(``../../x`` included). Every request is logged (method, path, range, when), and the body bytes served per path are
counted, so a test can say what was and was not fetched.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_FROM = 1024 * 1024  # files this large are listed as LFS files (sha256), smaller ones by git blob id


@cache
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False).hexdigest()


@dataclass
class Fault:
    """One planted misbehaviour, used up by the next request of its path that it matches."""

    status: int | None = None  # answer this status (a JSON error, as the hub's) instead of the file
    headers: dict[str, str] = field(default_factory=dict)  # sent with it: Retry-After, X-Error-Code
    stall: bool = False  # send half the body, then go silent with the connection open until released
    whole: bool | None = None  # only a whole-file GET (True), only a range read (False), or any request (None)

    def matches(self, method: str, wanted: str | None) -> bool:
        if self.whole is None:
            return True
        return method == "GET" and (wanted is None) == self.whole


@dataclass
class Mirror:
    repos: dict[str, dict[str, Path]]  # repo id -> file name in the repo -> local file
    plain: dict[str, Path] = field(default_factory=dict)  # /files/NAME -> local file
    cut_once: set[str] = field(default_factory=set)  # paths whose next whole-file GET stops halfway
    corrupt: set[str] = field(default_factory=set)  # paths served with one byte flipped
    listed_size: dict[str, int] = field(default_factory=dict)  # paths whose listing claims this size
    listed: dict[str, dict] = field(default_factory=dict)  # paths whose listing entry has these fields instead
    unsized: set[str] = field(default_factory=set)  # paths whose HEAD answers without a Content-Length
    faults: dict[str, list[Fault]] = field(default_factory=dict)  # path (or a prefix of it) -> faults in turn
    gated: set[str] = field(default_factory=set)  # repos listed to all, whose files need a token with access
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    timeline: list[tuple[float, str, str, str | None]] = field(default_factory=list)  # the log, with when (monotonic)
    served: dict[str, int] = field(default_factory=dict)  # body bytes sent per path
    release: threading.Event = field(default_factory=threading.Event)  # ends every stall
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Mirror:
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                self.answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                wanted = self.headers.get("Range")
                mirror.timeline.append((time.monotonic(), self.command, path, wanted))
                mirror.log.append((self.command, path, wanted))
                fault = mirror.take_fault(self.command, path, wanted)
                if fault is not None and fault.status is not None:
                    message = f"planted fault: {fault.status}"
                    return self.send_json(
                        fault.status, {"error": message}, {"X-Error-Message": message, **fault.headers}
                    )
                if path.startswith("/api/models/"):
                    return self.listing(path.removeprefix("/api/models/"))
                local = mirror.file_at(path)
                if local is None:
                    return self.send_json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                if (repo := mirror.repo_of(path)) in mirror.gated:
                    return self.refuse_gated(repo)
                self.send_file(path, local, body, stall=fault is not None and fault.stall)

            def refuse_gated(self, repo: str) -> None:
                """As the hub: 401 to an anonymous request, 403 to a token without access; GatedRepo either way."""
                if self.headers.get("Authorization"):
                    status, message = (
                        403,
                        f"Access to model {repo} is restricted and you are not in the authorized list.",
                    )
                else:
                    status = 401
                    message = f"Access to model {repo} is restricted. You must be authenticated to access it."
                self.send_json(status, {"error": message}, {"X-Error-Code": "GatedRepo", "X-Error-Message": message})

            def listing(self, rest: str) -> None:
                repo = rest.split("/revision/")[0]
                if repo not in mirror.repos:
                    return self.send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                siblings = []
                for name, local in mirror.repos[repo].items():
                    size = mirror.listed_size.get(f"/{repo}/resolve/{COMMIT}/{name}", local.stat().st_size)
                    if local.stat().st_size >= LFS_FROM:
                        siblings.append(
                            {
                                "rfilename": name,
                                "size": size,
                                "blobId": "0" * 40,
                                "lfs": {"size": size, "sha256": _sha256(local), "pointerSize": 134},
                            }
                        )
                    else:
                        siblings.append({"rfilename": name, "size": size, "blobId": _git_sha1(local)})
                    siblings[-1].update(mirror.listed.get(f"/{repo}/resolve/{COMMIT}/{name}", {}))
                gated = "manual" if repo in mirror.gated else False
                self.send_json(200, {"id": repo, "modelId": repo, "sha": COMMIT, "gated": gated, "siblings": siblings})

            def send_json(self, status: int, data: dict, headers: dict[str, str] | None = None) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def send_file(self, path: str, local: Path, body: bool, stall: bool = False) -> None:
                size = local.stat().st_size
                start, end, status = 0, size - 1, 200
                wanted = self.headers.get("Range")
                if wanted and wanted.startswith("bytes="):
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start = int(first)
                    end = min(int(last), size - 1) if last else size - 1
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                self.send_response(status)
                if body or path not in mirror.unsized:
                    self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{_sha256(local)}"')
                self.send_header("X-Repo-Commit", COMMIT)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if not body:
                    return
                stop = end + 1
                if (path in mirror.cut_once and wanted is None) or stall:  # cut_once: a whole-file GET only
                    mirror.cut_once.discard(path)
                    stop = start + (end - start + 1) // 2
                flip = size // 2 if path in mirror.corrupt else -1
                with open(local, "rb") as fh:
                    fh.seek(start)
                    at = start
                    while at < stop:
                        block = bytearray(fh.read(min(1 << 20, stop - at)))
                        if at <= flip < at + len(block):
                            block[flip - at] ^= 0xFF
                        self.wfile.write(block)
                        mirror.served[path] = mirror.served.get(path, 0) + len(block)
                        at += len(block)
                if stall:
                    self.wfile.flush()
                    mirror.release.wait(timeout=300)  # silent, the connection open, as a half-open one would be
                if stop <= end:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def take_fault(self, method: str, path: str, wanted: str | None) -> Fault | None:
        for key, faults in self.faults.items():
            if path.startswith(key) and faults and faults[0].matches(method, wanted):
                return faults.pop(0)
        return None

    def repo_of(self, path: str) -> str | None:
        return next((repo for repo in self.repos if path.startswith(f"/{repo}/resolve/")), None)

    def file_at(self, path: str) -> Path | None:
        if path.startswith("/files/"):
            return self.plain.get(path.removeprefix("/files/"))
        for repo, files in self.repos.items():
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                _revision, _, name = path.removeprefix(prefix).partition("/")
                if name in files:
                    return files[name]
        # A listed name such as ``../../x`` reaches the server as the client normalized its URL (``/ORG/x``): served
        # too, as a hub that lists such a name would serve it.
        for repo, files in self.repos.items():
            for name, local in files.items():
                if posixpath.normpath(f"/{repo}/resolve/{COMMIT}/{name}") == posixpath.normpath(path):
                    return local
        return None

    def body_gets(self, path: str) -> list[str | None]:
        """The ranges of the GETs of ``path`` (None: the whole file)."""
        return [wanted for method, logged, wanted in self.log if method == "GET" and logged == path]

    def requests_of(self, path: str) -> list[tuple[float, str, str | None]]:
        """When each request of ``path`` came, its method and its range."""
        return [(at, method, wanted) for at, method, logged, wanted in self.timeline if logged == path]

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
