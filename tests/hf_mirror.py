"""A local stand-in for the Hugging Face hub and for plain file URLs, serving the installed models over HTTP.

It answers what ``huggingface_hub`` asks a hub (``/api/models/ORG/REPO[/revision/REV]?blobs=true`` with each file's
size and hash, ``/ORG/REPO/resolve/REV/FILE`` with ranges) and ``/files/NAME`` as plain URLs; tests point
``HF_ENDPOINT`` at it. Faults are planted per path: a connection cut once mid-file, a flipped byte, a size the
listing inflates. Every request is logged (method, path, range), so a test can say what was and was not fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
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
class Mirror:
    repos: dict[str, dict[str, Path]]  # repo id -> file name in the repo -> local file
    plain: dict[str, Path] = field(default_factory=dict)  # /files/NAME -> local file
    cut_once: set[str] = field(default_factory=set)  # paths whose next whole-file GET stops halfway
    corrupt: set[str] = field(default_factory=set)  # paths served with one byte flipped
    listed_size: dict[str, int] = field(default_factory=dict)  # paths whose listing claims this size
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
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
                mirror.log.append((self.command, path, self.headers.get("Range")))
                if path.startswith("/api/models/"):
                    return self.listing(path.removeprefix("/api/models/"))
                local = mirror.file_at(path)
                if local is None:
                    return self.send_json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                self.send_file(path, local, body)

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
                self.send_json(200, {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings})

            def send_json(self, status: int, data: dict, headers: dict[str, str] | None = None) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def send_file(self, path: str, local: Path, body: bool) -> None:
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
                if path in mirror.cut_once and wanted is None:  # a whole-file GET, not a header's range
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
                        at += len(block)
                if stop <= end:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def file_at(self, path: str) -> Path | None:
        if path.startswith("/files/"):
            return self.plain.get(path.removeprefix("/files/"))
        for repo, files in self.repos.items():
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                _revision, _, name = path.removeprefix(prefix).partition("/")
                return files.get(name)
        return None

    def body_gets(self, path: str) -> list[str | None]:
        """The ranges of the GETs of ``path`` (None: the whole file)."""
        return [wanted for method, logged, wanted in self.log if method == "GET" and logged == path]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
