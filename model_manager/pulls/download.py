"""One file onto the disk: resumed where it stopped, checked against its hash before it takes its final name.

A file downloads to ``NAME.part`` beside its final place. A connection cut mid-file, or one that goes silent, is
resumed with a range request from the bytes already there; a 5xx or a 429 is waited out (``transport``: a few tries,
counted afresh after each MiB that arrives). A pull that fails all the same keeps a part that holds bytes, and a
later pull of the same model resumes it, after hashing what it holds; what a failed pull leaves empty (a part with
no bytes, a folder) is removed (``tidy``). Only a file whose size and hash are right is renamed to ``NAME``; a wrong
hash, or more bytes than the source said, deletes the part (which bytes are wrong cannot be known) and fails the
pull. Every path is the folder joined with a name checked by ``paths.inside``.

``huggingface_hub``'s own downloader is not used for the bytes: it keeps no partial file across processes (an
interrupted pull would start over) and checks no hash; its endpoint, token and HTTP session are.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from model_client.errors import PullFailed
from model_manager.pulls.paths import inside
from model_manager.pulls.remote import RemoteFile, headers_for
from model_manager.pulls.transport import Transient, retried, streamed

CHUNK = 1024 * 1024
KEPT_REASONS = ("network", "stalled", "server_error", "rate_limited", "cancelled")  # a part kept resumes later


def check_disk(folder: Path, files: list[RemoteFile], keep_free: int) -> int:
    """The bytes still to fetch; ``pull_failed`` (reason ``disk``) when they would leave less than ``keep_free``;
    ``unsafe_path`` when a file's place is not inside ``folder``. Nothing is created: a check leaves no folder."""
    missing = 0
    for file in files:
        final, part = inside(folder, file.name), inside(folder, file.name + ".part")
        if final.is_file() and final.stat().st_size == file.size:
            continue
        have = part.stat().st_size if part.is_file() else 0
        missing += max(0, (file.size or 0) - have)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
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
    final, part = inside(folder, file.name), inside(folder, file.name + ".part")
    if final.is_file():
        try:
            sha256 = verified(final, file)
            progress(final.stat().st_size)
            return sha256
        except PullFailed:
            final.unlink()  # a stale or damaged copy: fetched again
    digest = _hash_of(part) if part.is_file() else hashlib.sha256()
    done = part.stat().st_size if part.is_file() else 0

    def attempt() -> None:
        nonlocal digest, done
        headers = headers_for(file)
        if done:
            headers["Range"] = f"bytes={done}-"
        before = done
        try:
            with streamed(file, headers, (200, 206, 416)) as response:
                if response.status_code == 416:
                    if done:
                        return  # nothing left to send
                    raise PullFailed(f"{file.url} answered 416 to a whole-file request", reason="network", status=416)
                if done and response.status_code == 200:  # the server ignored the range: start over
                    digest, done = hashlib.sha256(), 0
                part.parent.mkdir(parents=True, exist_ok=True)
                with open(part, "ab" if done else "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if file.size is not None and done > file.size:
                            part.unlink(missing_ok=True)
                            raise PullFailed(
                                f"{file.name}: more than the {file.size} bytes the source says arrived",
                                reason="hash_mismatch",
                                file=file.name,
                            )
                        progress(done)
        except Transient as failure:
            failure.progressed = done - before >= CHUNK
            raise
        if file.size is not None and done < file.size:
            raise Transient(
                f"{file.url}: the body ended at {done} of {file.size} bytes",
                reason="network",
                file=file.name,
                progressed=done - before >= CHUNK,
            )

    try:
        retried(attempt)
    except PullFailed as exc:
        if done and exc.details.get("reason") in KEPT_REASONS:
            raise PullFailed(
                f"{exc.message}; pull again to resume from the {done} bytes kept", **{**exc.details, "kept_bytes": done}
            ) from None
        raise
    try:
        sha256 = verified(part, file, digest.hexdigest())
    except PullFailed:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, final)
    return sha256


def tidy(folder: Path) -> None:
    """What a failed download leaves empty goes: parts with no bytes, then empty folders, ``folder`` included.
    Links are not followed; a part with bytes stays, for the next pull to resume."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for at, _dirs, names in os.walk(folder, topdown=False):
        for name in names:
            path = Path(at) / name
            if name.endswith(".part") and not path.is_symlink() and path.stat().st_size == 0:
                path.unlink(missing_ok=True)
        try:
            os.rmdir(at)
        except OSError:
            pass  # not empty
