"""Wire protocol between clients and the ModelManagerAgent (see docs/protocol.md).

A message is a ZeroMQ multipart message: an empty delimiter frame (REQ sockets add it themselves, DEALER
clients send it), one msgpack envelope, then zero or more binary payload frames (audio) that never travel
inside msgpack. Arguments of each op are typed structs, so the manager and the client validate with the same
code and the manager's errors name the field that was wrong.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgpack
import msgspec

from model_client.errors import BadRequest, ModelManagerError, UnknownOp, UnsupportedVersion

PROTOCOL_VERSION = 1
MIB = 1024 * 1024  # the one size unit: limits, the YAML, status and logs speak in bytes or MiB

REPLY_RESULT = "result"
REPLY_ERROR = "error"
REPLY_CHUNK = "chunk"


class OpArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of op arguments: unknown fields are errors, not silently ignored."""


class NoArgs(OpArgs):
    pass


class ModelArgs(OpArgs, kw_only=True):
    model: str


# How long the model stays loaded once idle after this request (Ollama's keep_alive): seconds, 0 unloads it after
# the request, below 0 keeps it until it is unloaded or evicted for memory. None: the catalogue's idle_ttl_s.
KeepAlive = Annotated[float, msgspec.Meta(ge=-1.0, le=10 * 365 * 86400.0)] | None


class LoadArgs(ModelArgs, kw_only=True):
    keep_alive_s: KeepAlive = None


class ToolFunction(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str = ""
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments; None: any JSON object
    strict: bool | None = None  # accepted: arguments always follow the schema (they are sampled under it)


class Tool(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["function"] = "function"
    function: ToolFunction


class ChosenFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class ToolChoice(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["function"] = "function"
    function: ChosenFunction


class CalledFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it


class ToolCall(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str = ""
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools (its content may be "")
    tool_call_id: str | None = None  # a tool turn: the call it answers...
    name: str | None = None  # ...and the function's name


class GenerationArgs(OpArgs, kw_only=True):
    """Sampling parameters, named as llama.cpp names them."""

    model: str
    conversation_id: str | None = None
    stream: bool = False
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] = 0.7
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.95
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 40
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.05
    repeat_penalty: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    seed: int | None = None
    stop: list[str] = []
    cache: bool = True  # reuse the KV cache (the conversation's, or the live context's); false: evaluate it all
    # Constrained output, at most one: a GBNF grammar (llama.cpp's format), or a JSON schema the reply must match.
    grammar: Annotated[str, msgspec.Meta(min_length=1, max_length=65536)] | None = None
    json_schema: dict[str, Any] | None = None
    keep_alive_s: KeepAlive = None


class ChatArgs(GenerationArgs, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    # Tool calling: the reply is sampled under a grammar made from the tools' schemas, so a call's arguments always
    # match its function's `parameters`. auto: a call or a message; required: a call; a ToolChoice: that one.
    tools: Annotated[list[Tool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoice | None = None


class CompleteArgs(GenerationArgs, kw_only=True):
    prompt: Annotated[str, msgspec.Meta(min_length=1)]


class EmbedArgs(OpArgs, kw_only=True):
    """Pooled embeddings of each input from an llm of the catalogue, L2-normalized unless ``normalize`` is false."""

    model: str
    input: Annotated[str, msgspec.Meta(min_length=1)] | Annotated[list[str], msgspec.Meta(min_length=1, max_length=256)]
    normalize: bool = True
    keep_alive_s: KeepAlive = None


class ConversationArgs(OpArgs, kw_only=True):
    model: str
    conversation_id: Annotated[str, msgspec.Meta(min_length=1)]


class TranscribeArgs(OpArgs, kw_only=True):
    """Audio travels in the one binary frame after the envelope: a WAV/FLAC/MP3/OGG file's bytes (``format:
    auto``), or raw little-endian integer PCM (``format: pcm``) described by the three ``pcm`` fields."""

    model: str | None = None  # a catalogue model of kind stt; None: the first one
    format: Literal["auto", "pcm"] = "auto"
    sample_rate: Annotated[int, msgspec.Meta(ge=1000, le=384_000)] = 16000
    sample_width: Literal[1, 2, 4] = 2  # bytes per sample (1: unsigned 8-bit, 2: s16, 4: s32)
    channels: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1
    language: Annotated[str, msgspec.Meta(min_length=2, max_length=8)] | None = None  # None: detect
    beam_size: Annotated[int, msgspec.Meta(ge=1, le=10)] = 1
    vad_filter: bool = False  # drop silence with the Silero VAD before transcribing
    word_timestamps: bool = False
    task: Literal["transcribe", "translate"] = "transcribe"  # translate: the speech's meaning in English


class SynthesizeArgs(OpArgs, kw_only=True):
    """Text to speech. ``format: wav``: one reply carrying a WAV file; ``format: pcm``: raw s16 PCM, streamed
    as one chunk per sentence when ``stream`` is true (DEALER clients), else in one reply."""

    text: str
    voice: str | None = None  # a catalogue model of kind tts; None: the first one
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0  # Piper's length scale is divided by this
    speaker: Annotated[int, msgspec.Meta(ge=0)] | None = None  # multi-speaker voices
    format: Literal["wav", "pcm"] = "wav"
    stream: bool = False


class PullArgs(OpArgs, kw_only=True):
    """Fetch a model by reference (``hf.co/ORG/REPO:QUANT``, ``hf://ORG/REPO/FILE``, an https URL) into the
    catalogue. Streamed (DEALER, ``stream``): progress chunks, the first real one the fit check; then the result."""

    ref: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    name: str | None = None  # the catalogue name; default: an hf.co reference as given, else the file's name
    check: bool = False  # only say where it would go (reads the GGUF header by range requests), download nothing
    allow_no_fit: bool = False  # download even when no device could hold it now
    stream: bool = False


class PinArgs(ModelArgs, kw_only=True):
    pinned: bool = True  # a pinned model is never evicted, nor unloaded when idle (until the manager restarts)


class CopyArgs(OpArgs, kw_only=True):
    source: str
    destination: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


OP_ARGS: dict[str, type[OpArgs]] = {
    "ping": NoArgs,
    "status": NoArgs,
    "models": NoArgs,
    "load": LoadArgs,
    "unload": ModelArgs,
    "chat": ChatArgs,
    "complete": CompleteArgs,
    "embed": EmbedArgs,
    "conversation.drop": ConversationArgs,
    "transcribe": TranscribeArgs,
    "synthesize": SynthesizeArgs,
    "pull": PullArgs,
    "remove": ModelArgs,
    "copy": CopyArgs,
    "show": ModelArgs,
    "reload": NoArgs,
    "pin": PinArgs,
}
OPS: tuple[str, ...] = tuple(OP_ARGS)
# Ops a client may send again after a timeout without changing anything twice (Lazy Pirate retries).
IDEMPOTENT_OPS = frozenset(
    {"ping", "status", "models", "load", "unload", "conversation.drop", "transcribe", "embed", "show", "reload", "pin"}
)


PRIORITY_BATCH = 10  # background work
PRIORITY_NORMAL = 50  # the default
PRIORITY_INTERACTIVE = 80  # a person is waiting: personas, voice turns


def latency_class(priority: int) -> str:
    """What a request's priority says of who waits: ``voice`` (80 and up: a person listening; an LLM keeps
    sequences for it beyond ``parallel``), ``batch`` (10 and below), else ``chat``."""
    if priority >= PRIORITY_INTERACTIVE:
        return "voice"
    return "batch" if priority <= PRIORITY_BATCH else "chat"


MAX_DEADLINE_MS = 86_400_000
MAX_FRAMES = 32  # in one message, routing frames included
DEFAULT_MAX_MESSAGE_BYTES = 16 * MIB  # the manager's limits.max_message_bytes unless the YAML says otherwise


@dataclass(frozen=True, slots=True)
class Request:
    op: str
    args: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    payloads: tuple[bytes, ...] = ()
    # How long the client will wait for the answer, from sending: work still queued after that is dropped.
    deadline_ms: float | None = None
    # 0..100: requests to one model run highest first, in arrival order within a priority.
    priority: int | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply message: a final ``result``, a typed ``error``, or a streamed ``chunk``."""

    id: str | None
    type: str
    body: Any
    payloads: tuple[bytes, ...] = ()

    @property
    def is_final(self) -> bool:
        return self.type != REPLY_CHUNK


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(frame: bytes) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadRequest(f"envelope is not valid msgpack: {exc}") from None


def encode_request(request: Request) -> list[bytes]:
    """Frames after the empty delimiter: the envelope, then the binary payloads."""
    envelope: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request.id, "op": request.op, "args": request.args}
    if request.deadline_ms is not None:
        envelope["deadline_ms"] = request.deadline_ms
    if request.priority is not None:
        envelope["priority"] = request.priority
    return [_pack(envelope), *request.payloads]


def decode_request(frames: list[bytes], ops: dict[str, type[OpArgs]] | None = None) -> Request:
    """Parse the envelope; errors carry the request id when the envelope had a usable one. ``ops``: the op
    table of the daemon that reads it (the manager's by default)."""
    if not frames:
        raise BadRequest("message has no envelope frame")
    envelope = _unpack(frames[0])
    if not isinstance(envelope, dict):
        raise BadRequest(f"envelope must be a map, got {type(envelope).__name__}")
    request_id = envelope.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise BadRequest("envelope field 'id' must be a non-empty string")
    try:
        return _checked_request(envelope, request_id, frames[1:], OP_ARGS if ops is None else ops)
    except ModelManagerError as exc:
        exc.request_id = request_id
        raise


def _checked_request(
    envelope: dict[Any, Any], request_id: str, payloads: list[bytes], ops: dict[str, type[OpArgs]]
) -> Request:
    unknown = set(envelope) - {"v", "id", "op", "args", "deadline_ms", "priority"}
    if unknown:
        raise BadRequest(f"unknown envelope fields: {sorted(map(str, unknown))}")
    version = envelope.get("v")
    if type(version) is not int:  # not isinstance: True == 1 in Python, and is no version
        raise BadRequest("envelope field 'v' must be an integer, the protocol version")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version!r} is not supported", supported=PROTOCOL_VERSION)
    op = envelope.get("op")
    if not isinstance(op, str):
        raise BadRequest("envelope field 'op' must be a string")
    if op not in ops:
        raise UnknownOp(f"unknown op {op!r}", ops=list(ops))
    args = envelope.get("args", {})
    if not isinstance(args, dict):
        raise BadRequest("envelope field 'args' must be a map")
    deadline_ms = envelope.get("deadline_ms")
    if deadline_ms is not None and (
        isinstance(deadline_ms, bool)
        or not isinstance(deadline_ms, int | float)
        or not 0 < deadline_ms <= MAX_DEADLINE_MS
    ):
        raise BadRequest(f"envelope field 'deadline_ms' must be a number of milliseconds in (0, {MAX_DEADLINE_MS}]")
    priority = envelope.get("priority")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 100
    ):
        raise BadRequest("envelope field 'priority' must be an integer from 0 to 100")
    return Request(
        op=op, args=args, id=request_id, payloads=tuple(payloads), deadline_ms=deadline_ms, priority=priority
    )


def oversized(frames: list[bytes], max_bytes: int) -> BadRequest | None:
    """The error for a message whose frames add up to more than ``max_bytes`` or number over ``MAX_FRAMES``
    (ZeroMQ's own limit holds per frame only); None when it is within both."""
    size = sum(map(len, frames))
    if size <= max_bytes and len(frames) <= MAX_FRAMES:
        return None
    return BadRequest(
        f"message of {len(frames)} frames and {size} bytes is over the limit of {MAX_FRAMES} frames and "
        f"{max_bytes} bytes",
        message_bytes=size,
        max_message_bytes=max_bytes,
        frames=len(frames),
        max_frames=MAX_FRAMES,
    )


def parse_args(op: str, args: dict[str, Any], ops: dict[str, type[OpArgs]] | None = None) -> Any:
    """Validate an op's arguments into its typed struct; the error names the offending field. Strict: a string is
    not a number nor a bool (only an integer may stand for a float)."""
    ops = OP_ARGS if ops is None else ops
    try:
        return msgspec.convert(args, ops[op], strict=True)
    except KeyError:
        raise UnknownOp(f"unknown op {op!r}", ops=list(ops)) from None
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid arguments for {op!r}: {exc}") from None


def encode_result(request_id: str | None, result: Any, payloads: tuple[bytes, ...] = ()) -> list[bytes]:
    """``result``: a map, or a typed result (``model_client.results``), which goes as the same map."""
    envelope = {"v": PROTOCOL_VERSION, "id": request_id, "type": REPLY_RESULT, "result": result}
    return [_raw_encoder.encode(envelope), *payloads]


def encode_chunk(request_id: str, chunk: Any, payloads: tuple[bytes, ...] = ()) -> list[bytes]:
    """``chunk``: a map, a typed chunk, or a ``msgspec.Raw`` already encoded (a worker's streamed text, which the
    manager puts into the envelope as it is)."""
    return [
        _raw_encoder.encode({"v": PROTOCOL_VERSION, "id": request_id, "type": REPLY_CHUNK, "chunk": chunk}),
        *payloads,
    ]


_raw_encoder = msgspec.msgpack.Encoder()


def encode_error(request_id: str | None, error: ModelManagerError) -> list[bytes]:
    return [_pack({"v": PROTOCOL_VERSION, "id": request_id, "type": REPLY_ERROR, "error": error.to_wire()})]


def decode_reply(frames: list[bytes]) -> Reply:
    envelope = _unpack(frames[0])
    if not isinstance(envelope, dict) or envelope.get("type") not in (REPLY_RESULT, REPLY_ERROR, REPLY_CHUNK):
        raise BadRequest(f"malformed reply envelope: {envelope!r:.200}")
    kind = envelope["type"]
    return Reply(id=envelope.get("id"), type=kind, body=envelope.get(kind), payloads=tuple(frames[1:]))


# Events on the manager's PUB socket: frame 0 is the topic, frame 1 a msgpack map with ``event`` and ``time``.
EVENT_MODEL_LOADED = "model.loaded"
EVENT_MODEL_UNLOADED = "model.unloaded"
EVENT_MODEL_FAILED = "model.failed"
EVENT_HEARTBEAT = "manager.heartbeat"
EVENT_MODEL_ADDED = "model.added"
EVENT_MODEL_REMOVED = "model.removed"
EVENT_MODEL_PULL = "model.pull"
EVENT_MODEL_PINNED = "model.pinned"
EVENT_REQUEST_SHED = "request.shed"


def encode_event(topic: str, body: dict[str, Any], now: float, payloads: tuple[bytes, ...] = ()) -> list[bytes]:
    """Frame 0 the topic, frame 1 the msgpack body, then binary payloads (the services' audio)."""
    return [topic.encode(), _pack({"v": PROTOCOL_VERSION, "event": topic, "time": now, **body}), *payloads]


def decode_event(frames: list[bytes]) -> tuple[str, dict[str, Any]]:
    return frames[0].decode(), _unpack(frames[1])
