"""What a person types after ``mm pull`` (or sends to ``/api/pull``), parsed into where the files are.

- ``hf.co/ORG/REPO:QUANT`` (Ollama's form; ``huggingface.co/...`` too): a Hugging Face repo, and of its GGUF files
  the one of that quantization; without ``:QUANT`` the repo's only GGUF, or its Q4_K_M; a repo without GGUF files is
  a faster-whisper (CTranslate2) model or a Piper voice, taken whole.
- ``hf://ORG/REPO/PATH``: one file of a repo (a ``.gguf``, or a Piper voice's ``.onnx`` with its ``.onnx.json``);
  ``hf://ORG/REPO`` is the repo taken whole, as above.
- ``https://...`` (or ``http://``): one file by URL; ``#sha256=HEX`` at the end is the hash it must have.

Pure: no network here, so the rules are tested on their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from model_client.errors import BadRequest

_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HF_CO = re.compile(
    rf"^(?:https?://)?(?:hf\.co|huggingface\.co)/(?P<repo>{_REPO})(?::(?P<quant>[A-Za-z0-9_.-]{{1,32}}))?$"
)
_HF_URI = re.compile(rf"^hf://(?P<repo>{_REPO})(?:/(?P<path>[A-Za-z0-9._/ -]{{1,255}}))?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_REF = 512


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a repo (``repo``, with ``quant`` or ``path`` or neither) or a ``url``."""

    text: str
    repo: str | None = None
    quant: str | None = None
    path: str | None = None
    url: str | None = None
    sha256: str | None = None  # a URL's expected hash, when the reference gives one

    @property
    def default_name(self) -> str:
        """The catalogue name a pull gives when none is asked for: an ``hf.co`` reference as typed (as Ollama names
        it, so the clients that pulled it find it by that name); a file, its name without the extension."""
        if self.repo and self.path is None:
            return f"hf.co/{self.repo}" + (f":{self.quant}" if self.quant else "")
        leaf = (self.path or urlsplit(self.url or "").path).rsplit("/", 1)[-1]
        for suffix in (".gguf", ".onnx"):
            leaf = leaf.removesuffix(suffix)
        return re.sub(r"[^A-Za-z0-9._:-]", "-", leaf).lower()[:64] or "model"


def parse_ref(text: str) -> Ref:
    """Parse ``text``; a form that is none of the above is ``bad_request`` naming the forms."""
    text = text.strip()
    if not text or len(text) > MAX_REF:
        raise BadRequest(f"a model reference is 1 to {MAX_REF} characters", field="model")
    if match := _HF_CO.match(text):
        return Ref(text, repo=match["repo"], quant=match["quant"])
    if match := _HF_URI.match(text):
        path = match["path"]
        if path is not None and (".." in path.split("/") or path.startswith("/") or path.endswith("/")):
            raise BadRequest(f"{text!r}: the file path inside the repo is not valid", field="model")
        return Ref(text, repo=match["repo"], path=path or None)
    if text.startswith(("https://", "http://")):
        url, _, fragment = text.partition("#")
        parts = urlsplit(url)
        if not parts.hostname or not parts.path.strip("/"):
            raise BadRequest(f"{text!r}: a URL needs a host and a file path", field="model")
        sha256 = None
        if fragment:
            sha256 = fragment.removeprefix("sha256=").lower()
            if not fragment.startswith("sha256=") or not _SHA256.match(sha256):
                raise BadRequest(f"{text!r}: a URL's fragment may only be #sha256=<64 hex digits>", field="model")
        return Ref(text, url=url, sha256=sha256)
    raise BadRequest(
        f"{text!r} is not a model reference: use hf.co/ORG/REPO:QUANT, hf://ORG/REPO/FILE or an https:// URL",
        field="model",
    )
