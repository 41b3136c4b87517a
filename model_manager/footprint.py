"""What a model costs in memory: estimated from its GGUF header before loading, measured after, kept on disk.

The estimate (MiB figures measured with llama.cpp's own buffer report on SmolLM2-135M and Gemma 3 270M):

- weights: the tensor bytes in the file, for the share of layers that go to the device;
- KV cache: ``n_layer * n_ctx * n_head_kv * (head_dim_k + head_dim_v) * 2`` bytes (f16 K and V; llama.cpp pads
  ``n_ctx`` to 256 and allocates the whole cache at load, sliding-window layers included);
- compute buffers: on a GPU the whole reservation is allocated, dominated by the logits of one micro-batch,
  ``n_vocab * n_ubatch * 4``; on the CPU the same buffer is reserved but only its small activation part is ever
  touched, so we count ``n_ubatch * (n_embd + n_ff) * 16`` plus one row of logits;
- overhead: the vocabulary and bookkeeping, ``8 MiB + 150 bytes per vocabulary entry``, plus, per worker process,
  its interpreter (measured on the spare worker) on the CPU or a CUDA context (``devices.cuda_context_mib``) on a GPU.

On this machine the CPU estimate lands within 10% of the worker's measured resident memory for both models; after
the first load the measured figure replaces the estimate, and is saved so that a restarted manager starts from it.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from model_manager.config import MIB

DEFAULT_WORKER_BASE = 64 * MIB
KV_BYTES_PER_VALUE = 2  # f16 cache
CTX_PADDING = 256

log = structlog.get_logger("model_manager.footprint")


@dataclass(frozen=True)
class GgufFacts:
    """The few header values the estimate needs, read without loading any tensor."""

    architecture: str
    tensor_bytes: int
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    file_type: int | None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 16 * MIB  # a chat template is a few KiB; more is a corrupt length
_KEPT_ARRAY_LEN = 4096  # per-layer arrays are kept; longer ones (the vocabulary) only counted
# Hard caps, far above any real model's header, so that a corrupt or hostile header (one that declares 2^60 keys,
# tensors or array items) is refused after a few bytes instead of being read to the end of the file: a header is
# also read from a remote file, a range request at a time.
MAX_KEYS = 1 << 16  # a model's header holds a few dozen
MAX_TENSORS = 1 << 16  # a few thousand in the largest mixtures of experts
MAX_ARRAY = 1 << 24  # the longest, a vocabulary's merges, hold a few hundred thousand
MAX_DIMS = 8  # ggml's tensors have at most 4
MAX_HEADER_BYTES = 64 * MIB  # a 256k-entry vocabulary with its merges takes about 10 MiB
_CHECK_EVERY = 4096  # array items between two looks at how far the header has gone


class _Header:
    """The GGUF header (spec: ggml's docs/gguf.md), read for the few facts a size estimate needs.

    ``gguf.GGUFReader`` builds an object per vocabulary entry: 17 s of CPU for Gemma 3's 262,144 tokens, in the
    manager's process. Here long arrays are stepped over and only counted; the quantization types' block sizes
    still come from the ``gguf`` package.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh

    def _unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.fh.read(size)
        if len(data) != size:
            raise ValueError("the file ends inside its GGUF header")
        return struct.unpack(fmt, data)[0]

    def _string(self) -> str:
        length = self._unpack("<Q")
        if length > _MAX_STRING:
            raise ValueError(f"a GGUF header string of {length} bytes: the file is corrupt")
        return self.fh.read(length).decode("utf-8", "replace")

    def _within(self) -> None:
        if (at := self.fh.tell()) > MAX_HEADER_BYTES:
            raise ValueError(f"the GGUF header runs past {at} bytes (at most {MAX_HEADER_BYTES} are read)")

    @staticmethod
    def _capped(count: int, cap: int, what: str) -> int:
        if count > cap:
            raise ValueError(f"the GGUF header declares {count} {what} (at most {cap} are read): the file is corrupt")
        return count

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("<I"), self._capped(self._unpack("<Q"), MAX_ARRAY, "array items")
            if item == _STRING:  # stepped over, not decoded
                for i in range(count):
                    self.fh.seek(self._unpack("<Q"), io.SEEK_CUR)
                    if i % _CHECK_EVERY == 0:
                        self._within()
                return _Counted(count)
            if item not in _SCALARS:
                raise ValueError(f"GGUF array of value type {item} is not supported")
            if count > _KEPT_ARRAY_LEN:
                self.fh.seek(struct.calcsize(_SCALARS[item]) * count, io.SEEK_CUR)
                return _Counted(count)
            return [self._value(item) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {kind}")

    def read(self) -> tuple[dict[str, Any], int]:
        """The key/value fields, and the bytes of all tensors (the tensors' own bytes are never read)."""
        if self.fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = self._unpack("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        n_tensors = self._capped(self._unpack("<Q"), MAX_TENSORS, "tensors")
        n_fields = self._capped(self._unpack("<Q"), MAX_KEYS, "keys")
        fields = {}
        for _ in range(n_fields):
            key = self._string()
            fields[key] = self._value(self._unpack("<I"))
            self._within()
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        tensor_bytes = 0
        for _ in range(n_tensors):
            self._string()
            dims = [self._unpack("<Q") for _ in range(self._capped(self._unpack("<I"), MAX_DIMS, "dimensions"))]
            kind = self._unpack("<I")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (KeyError, ValueError):
                raise ValueError(f"a GGUF tensor of unknown type {kind}") from None
            self._unpack("<Q")  # the tensor's offset in the data section
            tensor_bytes += math.prod(dims) // block * type_size
            self._within()
        return fields, tensor_bytes


@dataclass(frozen=True)
class _Counted:
    """A long array of the header, counted but not read."""

    length: int

    def __len__(self) -> int:
        return self.length


def read_gguf_fields(fh: BinaryIO) -> tuple[dict[str, Any], int]:
    """A GGUF header's key/value fields (long arrays only counted) and its tensors' bytes, from any seekable
    binary file: a local file, or a remote one read by HTTP ranges (``pulls.remote``)."""
    return _Header(fh).read()


def read_gguf_facts(path: str) -> GgufFacts:
    """The facts of a GGUF file's header that its memory estimate needs."""
    with open(path, "rb") as fh:
        return facts_from_fields(*read_gguf_fields(io.BufferedReader(fh, 1 << 16)))


def gguf_metadata(path: str) -> dict[str, Any]:
    """The header's scalar and string fields (the chat template among them), long arrays left out."""
    with open(path, "rb") as fh:
        fields, _ = read_gguf_fields(io.BufferedReader(fh, 1 << 16))
    return {key: value for key, value in fields.items() if not isinstance(value, _Counted | list)}


def quantization_label(file_type: int | None) -> str:
    """The GGUF ``general.file_type`` as llama.cpp names it (``Q4_1``, ``Q4_K_M``, ``F16``)."""
    if file_type is None:
        return "unknown"
    import gguf

    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type_{file_type}"


def facts_from_fields(fields: dict[str, Any], tensor_bytes: int) -> GgufFacts:
    """The estimate's facts out of a header's fields."""

    def field(name: str, default=None):
        return fields.get(name, default)

    arch = field("general.architecture", "llama")
    n_embd = int(field(f"{arch}.embedding_length", 0))
    n_head = int(field(f"{arch}.attention.head_count", 1) or 1)
    n_head_kv = field(f"{arch}.attention.head_count_kv", n_head)
    n_head_kv = int(max(n_head_kv) if isinstance(n_head_kv, list) else n_head_kv)
    n_ff = field(f"{arch}.feed_forward_length", 4 * n_embd)
    n_ff = int(max(n_ff) if isinstance(n_ff, list) else n_ff)
    tokens = fields.get("tokenizer.ggml.tokens")
    n_vocab = int(field(f"{arch}.vocab_size", len(tokens) if tokens is not None else 32000))
    return GgufFacts(
        architecture=arch,
        tensor_bytes=tensor_bytes,
        n_layer=int(field(f"{arch}.block_count", 1)),
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=int(field(f"{arch}.attention.key_length", n_embd // n_head)),
        head_dim_v=int(field(f"{arch}.attention.value_length", n_embd // n_head)),
        n_vocab=n_vocab,
        file_type=field("general.file_type"),
    )


@dataclass(frozen=True)
class Estimate:
    total: int
    weights: int
    kv_cache: int
    compute: int
    overhead: int


def estimate_gguf(
    facts: GgufFacts,
    n_ctx: int,
    n_batch: int,
    on_gpu: bool,
    n_gpu_layers: int,
    process_overhead: int,
) -> Estimate:
    """Bytes the model will hold on its device: on a GPU the offloaded share, on the CPU all of it."""
    n_ctx = -(-n_ctx // CTX_PADDING) * CTX_PADDING
    n_ubatch = min(n_batch, 512)
    share = 1.0
    if on_gpu and n_gpu_layers >= 0:
        share = min(1.0, n_gpu_layers / max(1, facts.n_layer))
    weights = int(facts.tensor_bytes * share)
    kv = int(
        facts.n_layer * share * n_ctx * facts.n_head_kv * (facts.head_dim_k + facts.head_dim_v) * KV_BYTES_PER_VALUE
    )
    activations = n_ubatch * (facts.n_embd + facts.n_ff) * 16
    logits = facts.n_vocab * 4 * (n_ubatch if on_gpu else 1)
    overhead = 8 * MIB + facts.n_vocab * 150 + process_overhead
    compute = activations + logits
    return Estimate(
        total=weights + kv + compute + overhead, weights=weights, kv_cache=kv, compute=compute, overhead=overhead
    )


# Speech models, measured on the CPU (worker RSS after one request, over the worker's own start-up): Whisper
# tiny.en 75 MB of float16 weights took 181 MiB as int8 and 342 MiB as float32; the Piper medium voice's 60 MiB
# ONNX file took 173 MiB. Weights scale with the compute type; the rest is the engine's working memory.
WEIGHT_FACTOR = {"int8": 0.6, "int8_float16": 0.6, "int8_float32": 0.6, "float16": 1.0, "bfloat16": 1.0}
STT_WORKING = 128 * MIB
TTS_WORKING = 80 * MIB


def files_bytes(path: str) -> int:
    """The size of a model file, or of every file in a model directory."""
    root = Path(path)
    if root.is_dir():
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return root.stat().st_size


def estimate_speech(kind: str, size: int, compute_type: str, on_gpu: bool, process_overhead: int) -> Estimate:
    """``size``: the bytes of the model's files."""
    if kind == "stt":
        # "default" keeps float16 on a GPU and becomes float32 on a CPU.
        factor = WEIGHT_FACTOR.get(compute_type, 1.0 if on_gpu else 2.0)
        weights, compute = int(size * factor), STT_WORKING
    else:
        weights, compute = int(size * 1.5), TTS_WORKING
    total = weights + compute + process_overhead
    return Estimate(total=total, weights=weights, kv_cache=0, compute=compute, overhead=process_overhead)


class FootprintStore:
    """GGUF facts by file identity and measured sizes by model set-up, in ``state_dir`` as JSON files.

    Header parsing runs on one background thread so the socket loop never waits on it.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.facts_path = self.dir / "gguf_facts.json"
        self.measured_path = self.dir / "footprints.json"
        self._facts: dict[str, dict] = _read_json(self.facts_path)
        self._measured: dict[str, dict] = _read_json(self.measured_path)
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-facts")

    @staticmethod
    def file_key(path: str) -> str | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"

    def facts(self, path: str) -> GgufFacts | None:
        """The file's facts if known; otherwise start reading them in the background and return None."""
        key = self.file_key(path)
        if key is None:
            return None
        with self._lock:
            if key in self._facts:
                return GgufFacts(**self._facts[key])
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._read, key, path)
        return None

    def facts_failed(self, path: str) -> str | None:
        """Why reading the header failed (a corrupt file), or None."""
        key = self.file_key(path)
        future = self._pending.get(key) if key else None
        if future is not None and future.done() and future.exception() is not None:
            return str(future.exception())
        return None

    def read_now(self, path: str) -> GgufFacts:
        """Read (or take from the cache) the file's facts, blocking: for tools and tests, not the socket loop."""
        key = self.file_key(path)
        assert key is not None, f"{path} does not exist"
        if key not in self._facts:
            self._read(key, path)
        return GgufFacts(**self._facts[key])

    def _read(self, key: str, path: str) -> None:
        facts = read_gguf_facts(path)
        with self._lock:
            self._facts[key] = asdict(facts)
            _write_json(self.facts_path, self._facts)
        log.info("gguf_facts_read", path=path, n_layer=facts.n_layer, tensor_mib=round(facts.tensor_bytes / MIB, 1))

    def measured(self, key: str) -> int | None:
        entry = self._measured.get(key)
        return int(entry["bytes"]) if entry else None

    def remember_measured(self, key: str, size: int, estimate: int | None) -> None:
        self._measured[key] = {"bytes": int(size), "estimate": estimate}
        _write_json(self.measured_path, self._measured)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    """Write atomically, so a crash mid-write never leaves a half file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
