"""``python -m model_manager.pulls --ref REF --dest DIR --keep-free BYTES``: one pull, as a process of its own.

The manager starts it and reads its standard output, one JSON object a line (``Line``); the network, the hashing and
the disk never touch the manager's loop, and a pull that hangs or crashes is only a process that ends. The steps:

1. ``resolved``: the files, their sizes and hashes (refused here if the disk cannot take them);
2. ``facts`` (a GGUF: its header, read by range requests) or ``sizes`` (speech), then it waits for the manager's
   word on standard input: ``go`` (download) or ``stop`` (a check only, or the model would fit nowhere);
3. ``progress`` lines, ``verifying``; then ``done`` with the files, or ``error`` with a typed error at any step.
   A request tried again (a 5xx, a 429, a stall) is said as a ``retrying`` line at any step.

Nothing is written before ``go``: every file name is checked to stay inside ``--dest`` first (``paths``), and a
check, or a pull refused before its download, leaves no folder. A download that fails (or a SIGTERM from the
manager) has what it left empty removed before the ``error`` line is written, so that when the manager answers, the
folder is as the next pull of the name will find it: parts with bytes kept to resume, nothing empty.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec

from model_client.errors import ModelManagerError, PullFailed
from model_manager.pulls.download import check_disk, fetch, tidy
from model_manager.pulls.refs import parse_ref
from model_manager.pulls.remote import Source, remote_gguf_fields, resolve
from model_manager.pulls.transport import Transient, on_retry

PROGRESS_EVERY_S = 0.25


def emit(event: str, **fields: Any) -> None:
    sys.stdout.buffer.write(msgspec.json.encode({"event": event, **fields}) + b"\n")
    sys.stdout.buffer.flush()


def retrying(failure: Transient, tries: int, wait_s: float) -> None:
    emit("retrying", reason=failure.reason, message=failure.message, tries=tries, wait_s=wait_s)


def header_facts(source: Source) -> dict[str, Any]:
    from model_manager.footprint import facts_from_fields, quantization_label

    fields, tensor_bytes, reader = remote_gguf_fields(source.files[0])
    facts = facts_from_fields(fields, tensor_bytes)
    return {
        "facts": asdict(facts),
        "quantization": quantization_label(facts.file_type),
        "header_bytes": reader.fetched,
        "header_requests": reader.requests,
        "file_bytes": source.files[0].size,
    }


def pull(ref_text: str, dest: Path, keep_free: int) -> None:
    source = resolve(parse_ref(ref_text))
    files = [{"name": f.name, "size": f.size} for f in source.files]
    emit("resolved", kind=source.kind, files=files, total=source.total, repo=source.repo, revision=source.revision)
    missing = check_disk(dest, source.files, keep_free)
    quantization = None
    if source.kind == "llm":
        facts = header_facts(source)
        quantization = facts["quantization"]
        emit("facts", **facts)
    else:
        emit("sizes", total=source.total)
    if sys.stdin.readline().strip() != "go":
        return
    try:
        download(source, dest, missing, quantization)
    except BaseException:
        tidy(dest)
        raise


def download(source: Source, dest: Path, missing: int, quantization: str | None) -> None:
    total, before, last = source.total, 0, 0.0
    emit("progress", file=source.files[0].name, completed=0, total=total, missing=missing)
    hashes = {}
    for file in source.files:

        def progress(done: int, file=file, before=before) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                emit("progress", file=file.name, completed=before + done, total=total)

        hashes[file.name] = fetch(file, dest, progress)
        before += file.size or (dest / file.name).stat().st_size
        emit("verified", file=file.name, sha256=hashes[file.name], completed=before, total=total)
    emit(
        "done",
        kind=source.kind,
        main=source.main,
        quantization=quantization,
        files=[
            {"name": f.name, "size": (dest / f.name).stat().st_size, "sha256": hashes[f.name]} for f in source.files
        ],
        repo=source.repo,
        revision=source.revision,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="model_manager.pulls")
    parser.add_argument("--ref", required=True)
    parser.add_argument("--dest", required=True, type=Path)
    parser.add_argument("--keep-free", type=int, default=0)
    args = parser.parse_args(argv)

    def stopped(_signal: int, _frame: object) -> None:
        raise PullFailed("the pull was stopped", reason="cancelled")

    signal.signal(signal.SIGTERM, stopped)  # the manager's stop: tidied and answered like any failure
    on_retry(retrying)
    try:
        pull(args.ref, args.dest, args.keep_free)
    except ModelManagerError as exc:
        emit("error", error=exc.to_wire())
        return 1
    except Exception as exc:  # noqa: BLE001 - whatever broke, the manager gets one typed answer
        emit("error", error=PullFailed(f"{type(exc).__name__}: {exc}", reason="network").to_wire())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
