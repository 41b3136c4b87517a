"""Where a reference's files are and what they must hash to, and a remote GGUF's header read by HTTP ranges.

Hugging Face through ``huggingface_hub`` (its endpoint, ``HF_ENDPOINT``; its token, ``HF_TOKEN``; its HTTP session):
the repo's file list with each file's size and the hub's hash (an LFS file's sha256, a small file's git blob id).
A URL through the same session, without the hub's credentials. Every request is made through ``transport`` (a stall
limit, retries, honest reasons); every file name a source gives is checked by ``paths`` before the pull goes on.
"""

from __future__ import annotations

import io
import re
from typing import Any

import msgspec

from model_client.errors import PullFailed
from model_manager.footprint import MAX_HEADER_BYTES
from model_manager.pulls.paths import check_names
from model_manager.pulls.refs import Ref
from model_manager.pulls.transport import (
    STALL_S,
    denied,
    dropped,
    refusal,
    retried,
    session,
    streamed,
    token_set,
    transport_errors,
)

HEADER_BLOCK = 256 * 1024  # bytes per range request while reading a remote GGUF header
_SKIPPED = re.compile(r"(^|/)(README\.md|\.gitattributes|.*\.md)$", re.IGNORECASE)
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
DEFAULT_QUANT = "Q4_K_M"  # Ollama's choice when an hf.co reference names none


class RemoteFile(msgspec.Struct, kw_only=True):
    name: str  # where it goes, relative to the model's folder
    url: str
    size: int | None = None
    sha256: str | None = None  # an LFS file's (or a URL's stated) sha256
    git_sha1: str | None = None  # a small file's git blob id, as the hub lists it
    hub: bool = False  # the hub's credentials go with it
    repo: str | None = None  # the hub repo it is from


class Source(msgspec.Struct, kw_only=True):
    kind: str  # llm, stt or tts
    files: list[RemoteFile]
    main: str  # the file the catalogue entry points at ("" for a speech model's folder)
    repo: str | None = None
    revision: str | None = None  # the commit the files were taken from

    @property
    def total(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if None in sizes else sum(sizes)  # type: ignore[arg-type]


def hub_headers() -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    return {**build_hf_headers(), "Accept-Encoding": "identity"}


def headers_for(file: RemoteFile) -> dict[str, str]:
    return hub_headers() if file.hub else {"Accept-Encoding": "identity", "User-Agent": "model-manager-agent"}


def resolve(ref: Ref) -> Source:
    """Where ``ref``'s files are; ``unsafe_path`` if a name the source gives could lead out of the model's folder."""
    source = _resolve_url(ref) if ref.url else _resolve_repo(ref)
    check_names(f.name for f in source.files)
    return source


def _resolve_url(ref: Ref) -> Source:
    assert ref.url is not None
    leaf = ref.url.rsplit("/", 1)[-1].split("?", 1)[0]
    main = RemoteFile(name=leaf, url=ref.url, sha256=ref.sha256, size=_remote_size(ref.url))
    if leaf.endswith(".gguf"):
        return Source(kind="llm", files=[main], main=leaf)
    if leaf.endswith(".onnx"):
        config = RemoteFile(name=leaf + ".json", url=ref.url + ".json", size=_remote_size(ref.url + ".json"))
        return Source(kind="tts", files=[main, config], main=leaf)
    raise PullFailed(f"{ref.text}: a URL must name a .gguf file or a Piper voice's .onnx", reason="unsupported")


_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


def listing_problem(size: Any, sha256: Any, git_sha1: Any) -> str | None:
    """What is wrong with a hub's word on a file, or None: a size (what the disk check and the download's end are
    measured by) and the hash the bytes are checked against (an empty one would check nothing)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"with no usable size ({str(size)[:40]!r})"
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        return "with a sha256 that is not 64 hex digits"
    if sha256 is None and not (isinstance(git_sha1, str) and _GIT_SHA1.fullmatch(git_sha1)):
        return "with neither a sha256 nor a git blob id"
    return None


def _remote_size(url: str) -> int:
    """The file's size, as its server says it (a download with none would have nothing to stop it)."""

    def attempt() -> Any:
        headers = headers_for(RemoteFile(name="", url=url))
        try:
            response = session().head(url, headers=headers, follow_redirects=True, timeout=STALL_S)
        except transport_errors() as exc:
            raise dropped(exc, url) from None
        if response.status_code >= 400:
            raise refusal(response.status_code, response.headers, url, hub=False)
        return response

    length = retried(attempt).headers.get("Content-Length", "")
    if not (length.isascii() and length.isdigit()):
        raise PullFailed(f"{url} gives no size (Content-Length): refused", reason="bad_listing", file=url[:200])
    return int(length)


def _resolve_repo(ref: Ref) -> Source:
    from huggingface_hub import HfApi, constants, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    assert ref.repo is not None
    repo = ref.repo

    def listing() -> Any:
        try:
            return HfApi(endpoint=constants.ENDPOINT).model_info(repo, files_metadata=True, timeout=STALL_S)
        except GatedRepoError:
            raise denied(401, "GatedRepo", repo, hub=True) from None
        except RepositoryNotFoundError:
            private = "" if token_set() else " (or it is private, and no HF_TOKEN is set in the manager's environment)"
            where = f"{repo} is not a repository on {constants.ENDPOINT}"
            raise PullFailed(where + private, reason="not_found") from None
        except HfHubHTTPError as exc:
            if exc.response is None:
                raise PullFailed(f"{constants.ENDPOINT}: {exc}", reason="network") from None
            raise refusal(exc.response.status_code, exc.response.headers, constants.ENDPOINT, True, repo=repo) from None
        except transport_errors() as exc:
            raise dropped(exc, constants.ENDPOINT) from None

    info = retried(listing)
    revision = info.sha
    listed = {s.rfilename: s for s in info.siblings or []}

    def remote(name: str, as_name: str | None = None) -> RemoteFile:
        sibling = listed[name]
        size = sibling.lfs.size if sibling.lfs else sibling.size
        sha256 = sibling.lfs.sha256 if sibling.lfs else None
        git_sha1 = None if sibling.lfs else sibling.blob_id
        check_names([name])
        if problem := listing_problem(size, sha256, git_sha1):
            raise PullFailed(f"{repo} lists {name!r} {problem}: refused", reason="bad_listing", file=name[:200])
        return RemoteFile(
            name=as_name or name,
            url=hf_hub_url(ref.repo, name, revision=revision, endpoint=constants.ENDPOINT),
            size=size,
            sha256=sha256,
            git_sha1=git_sha1,
            hub=True,
            repo=ref.repo,
        )

    def source(kind: str, files: list[RemoteFile], main: str) -> Source:
        return Source(kind=kind, files=files, main=main, repo=ref.repo, revision=revision)

    if ref.path is not None:
        if ref.path not in listed:
            raise PullFailed(f"{ref.repo} has no file {ref.path!r}", reason="not_found", files=sorted(listed)[:50])
        leaf = ref.path.rsplit("/", 1)[-1]
        if ref.path.endswith(".gguf"):
            return source("llm", [remote(ref.path, leaf)], leaf)
        if ref.path.endswith(".onnx") and ref.path + ".json" in listed:
            return source("tts", [remote(ref.path, leaf), remote(ref.path + ".json", leaf + ".json")], leaf)
        raise PullFailed(
            f"{ref.text}: name a .gguf file, or a Piper voice's .onnx (with its .onnx.json beside it)",
            reason="unsupported",
        )
    ggufs = [n for n in listed if n.endswith(".gguf") and "mmproj" not in n.lower()]
    if ggufs:
        name = _choose_gguf(ref, ggufs)
        return source("llm", [remote(name, name.rsplit("/", 1)[-1])], name.rsplit("/", 1)[-1])
    if ref.quant:
        raise PullFailed(f"{ref.repo} has no GGUF file to take {ref.quant} from", reason="not_found")
    if "model.bin" in listed and "config.json" in listed:  # a CTranslate2 (faster-whisper) model, taken whole
        return source("stt", [remote(n) for n in sorted(listed) if not _SKIPPED.search(n)], "")
    voices = [n for n in listed if n.endswith(".onnx") and n + ".json" in listed]
    if len(voices) == 1:
        leaf = voices[0].rsplit("/", 1)[-1]
        return source("tts", [remote(voices[0], leaf), remote(voices[0] + ".json", leaf + ".json")], leaf)
    if voices:
        raise PullFailed(
            f"{ref.repo} holds {len(voices)} voices: name one, hf://{ref.repo}/<voice>.onnx",
            reason="ambiguous",
            choices=sorted(voices)[:50],
        )
    raise PullFailed(
        f"{ref.repo} holds no GGUF model, faster-whisper model or Piper voice",
        reason="unsupported",
        files=sorted(listed)[:50],
    )


def _quant_of(filename: str) -> str | None:
    """The quantization a GGUF file's name says (``...-Q4_K_M.gguf``, ``...q8_0.gguf``), upper-cased."""
    stem = filename.rsplit("/", 1)[-1].removesuffix(".gguf")
    match = re.search(r"(?:^|[._-])((?:I?Q\d[A-Z0-9_]*)|F16|BF16|F32)$", stem, re.IGNORECASE)
    return match[1].upper() if match else None


def _choose_gguf(ref: Ref, ggufs: list[str]) -> str:
    whole = [n for n in ggufs if not _SPLIT.search(n)]
    by_quant: dict[str, list[str]] = {}
    for name in whole:
        if quant := _quant_of(name):
            by_quant.setdefault(quant, []).append(name)
    wanted = (ref.quant or "").upper()
    if wanted:
        if wanted not in by_quant:
            raise PullFailed(
                f"{ref.repo} has no single-file GGUF of quantization {ref.quant}",
                reason="not_found",
                quantizations=sorted(by_quant),
            )
        return sorted(by_quant[wanted])[0]
    if len(whole) == 1:
        return whole[0]
    if DEFAULT_QUANT in by_quant:
        return sorted(by_quant[DEFAULT_QUANT])[0]
    raise PullFailed(
        f"{ref.repo} holds several GGUF files: name one, hf.co/{ref.repo}:QUANT",
        reason="ambiguous",
        quantizations=sorted(by_quant),
    )


class RangeFile(io.RawIOBase):
    """A remote file read through HTTP range requests, seekable, counting the bytes it fetched: a GGUF header is a
    few MB at the front of a file of many GB, and its long arrays are stepped over without fetching them. A range
    that fails for a while (a 5xx, a 429, a stall) is asked again (``transport``)."""

    def __init__(self, file: RemoteFile) -> None:
        super().__init__()
        self.file = file
        self.headers = headers_for(file)
        self.position = 0
        self.fetched = 0
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.position = offset
        elif whence == io.SEEK_CUR:
            self.position += offset
        else:
            if self.file.size is None:
                raise OSError("the remote file's size is unknown")
            self.position = self.file.size + offset
        return self.position

    def readinto(self, buffer: Any) -> int:
        wanted = len(buffer)
        if wanted == 0 or (self.file.size is not None and self.position >= self.file.size):
            return 0
        if self.fetched >= MAX_HEADER_BYTES:  # skipping ahead is free to the parser, each block fetched is not
            raise ValueError(f"its header takes more than {MAX_HEADER_BYTES} bytes to read")
        got = retried(lambda: self._fetch_into(buffer, wanted))
        self.position += got
        self.fetched += got
        return got

    def _fetch_into(self, buffer: Any, wanted: int) -> int:
        headers = {**self.headers, "Range": f"bytes={self.position}-{self.position + wanted - 1}"}
        self.requests += 1
        with streamed(self.file, headers, (200, 206, 416)) as response:
            if response.status_code == 416:
                return 0
            if response.status_code == 200:
                raise PullFailed(
                    f"{self.file.url} does not answer range requests (it sent the whole file): its header cannot "
                    "be read before the download",
                    reason="no_ranges",
                )
            got = 0
            for chunk in response.iter_bytes():
                take = chunk[: wanted - got]
                buffer[got : got + len(take)] = take
                got += len(take)
                if got >= wanted:
                    break
        return got


def remote_gguf_fields(file: RemoteFile) -> tuple[dict[str, Any], int, RangeFile]:
    """The header fields and tensor bytes of a remote GGUF, and the reader (its ``fetched`` bytes)."""
    from model_manager.footprint import read_gguf_fields

    raw = RangeFile(file)
    try:
        fields, tensor_bytes = read_gguf_fields(io.BufferedReader(raw, HEADER_BLOCK))
    except ValueError as exc:
        raise PullFailed(f"{file.url} is not a readable GGUF file: {exc}", reason="invalid_model") from None
    return fields, tensor_bytes, raw
