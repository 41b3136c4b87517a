"""One file onto the disk: resumed where it stopped, checked against its hash before it takes its final name.

A file downloads to ``NAME.part`` beside its final place. A connection cut mid-file is resumed with a range request
from the bytes already there (a few times, then the pull fails and keeps the part); a later pull of the same model
resumes the part too, after hashing what it holds. Only a file whose size and hash are right is renamed to
``NAME``; a wrong hash deletes the part (which bytes are wrong cannot be known) and fails the pull.

``huggingface_hub``'s own downloader is not used for the bytes: it keeps no partial file across processes (an
interrupted pull would start over) and checks no hash; its endpoint, token and HTTP session are.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from model_client.errors import PullFailed
from model_manager.pulls.remote import RemoteFile, headers_for, session

CHUNK = 1024 * 1024
RETRIES = 5


def check_disk(folder: Path, files: list[RemoteFile], keep_free: int) -> int:
    """The bytes still to fetch; ``pull_failed`` (reason ``disk``) when they would leave less than ``keep_free``."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = 0
    for file in files:
        final, part = folder / file.name, folder / (file.name + ".part")
        if final.is_file() and final.stat().st_size == file.size:
            continue
        have = part.stat().st_size if part.is_file() else 0
        missing += max(0, (file.size or 0) - have)
    free = shutil.disk_usage(folder).free
    if missing + keep_free > free:
        raise PullFailed(
            f"the pull needs {missing / 1e9:.2f} GB more and {folder} has {free / 1e9:.2f} GB free "
            f"(keeping {keep_free / 1e9:.2f} GB free)",
            reason="disk",
            needed_bytes=missing,
            free_bytes=free,
            keep_free_bytes=keep_free,
        )
    return missing


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_of(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest


def verified(path: Path, file: RemoteFile, sha256: str | None = None) -> str:
    """``path``'s sha256 if it is ``file`` (its size, and its hub hash); ``pull_failed`` otherwise."""
    size = path.stat().st_size
    if file.size is not None and size != file.size:
        raise PullFailed(
            f"{file.name}: {size} bytes arrived, the source says {file.size}",
            reason="hash_mismatch",
            file=file.name,
        )
    sha256 = sha256 or _hash_of(path).hexdigest()
    if file.sha256 and sha256 != file.sha256:
        raise PullFailed(
            f"{file.name}: its sha256 is {sha256}, the source says {file.sha256}: the download is corrupt",
            reason="hash_mismatch",
            file=file.name,
            expected=file.sha256,
            got=sha256,
        )
    if file.git_sha1 and (got := _git_blob_sha1(path)) != file.git_sha1:
        raise PullFailed(
            f"{file.name}: its git blob id is {got}, the hub says {file.git_sha1}: the download is corrupt",
            reason="hash_mismatch",
            file=file.name,
            expected=file.git_sha1,
            got=got,
        )
    return sha256


def fetch(file: RemoteFile, folder: Path, progress: Callable[[int], None]) -> str:
    """Download ``file`` into ``folder`` (resuming a part), verify it, give it its name; its sha256."""
    final = folder / file.name
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_file():
        try:
            sha256 = verified(final, file)
            progress(final.stat().st_size)
            return sha256
        except PullFailed:
            final.unlink()  # a stale or damaged copy: fetched again
    part = folder / (file.name + ".part")
    digest = _hash_of(part) if part.is_file() else hashlib.sha256()
    done = part.stat().st_size if part.is_file() else 0
    tries = RETRIES
    with open(part, "ab") as out:
        while file.size is None or done < file.size:
            headers = headers_for(file)
            if done:
                headers["Range"] = f"bytes={done}-"
            try:
                with session().stream("GET", file.url, headers=headers, follow_redirects=True) as response:
                    if response.status_code == 416 and done:
                        break  # nothing left to send
                    if response.status_code == 404:
                        raise PullFailed(f"{file.url} does not exist (404)", reason="not_found", file=file.name)
                    if response.status_code not in (200, 206):
                        raise PullFailed(
                            f"{file.url} answered {response.status_code}",
                            reason="network",
                            status=response.status_code,
                        )
                    if done and response.status_code == 200:  # the server ignored the range: start over
                        out.truncate(0)
                        digest, done = hashlib.sha256(), 0
                    for chunk in response.iter_bytes(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        progress(done)
                    out.flush()
                if file.size is None:
                    break  # a size-less URL: the stream's end is the file's end
            except PullFailed:
                raise
            except Exception as exc:  # noqa: BLE001 - a cut connection, a reset, a timeout: resume from `done`
                out.flush()
                tries -= 1
                if tries < 0:
                    raise PullFailed(
                        f"{file.url}: the connection failed {RETRIES + 1} times ({exc}); pull again to resume "
                        f"from the {done} bytes kept",
                        reason="network",
                        file=file.name,
                        kept_bytes=done,
                    ) from None
                time.sleep(0.2 * (RETRIES - tries))
    try:
        sha256 = verified(part, file, digest.hexdigest())
    except PullFailed:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, final)
    return sha256
