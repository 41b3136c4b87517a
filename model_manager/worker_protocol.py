"""The manager <-> worker protocol: typed messages, one msgpack frame each, on the manager's workers socket.

Manager -> worker (tag ``cmd``): ``Load`` one model, ``Run`` a request, ``Cancel`` one, ``Threads`` to use, ``Exit``.
Worker -> manager (tag ``evt``): ``Ready`` (started, engine imported), ``Loaded`` / ``LoadFailed``, then per request
zero or more ``Chunk`` (a stepping worker: ``Chunks``, every stream's text after a step) and one ``Done`` (a
generation: ``Generated``) or ``Failed``, and ``Idle`` when it has nothing left to do.
Binary data a backend makes (audio) travels as ``payload`` and reaches the client as a frame of its own.
See docs/workers.md.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from model_client import protocol
from model_client.results import Completion, TextChunk
from model_manager.config import KvCacheSettings, Limits, ModelSpec


class ToWorker(msgspec.Struct, tag_field="cmd", forbid_unknown_fields=True):
    pass


class Load(ToWorker, tag="load", kw_only=True):
    name: str  # the catalogue name
    spec: ModelSpec  # as placed: device, layers and threads already decided
    warm: bool = False  # run one token at load, so the first request does not pay for it
    kv: KvCacheSettings | None = None
    limits: Limits


# A request's arguments as the worker reads them: the client's op struct, validated by the manager, tagged with
# its op (so one decode gives the worker the right struct), and with what the manager adds (transcribe's audio).


class ChatRun(protocol.ChatArgs, tag="chat", tag_field="op"):
    pass


class CompleteRun(protocol.CompleteArgs, tag="complete", tag_field="op"):
    pass


class EmbedRun(protocol.EmbedArgs, tag="embed", tag_field="op"):
    pass


class DropRun(protocol.ConversationArgs, tag="conversation.drop", tag_field="op"):
    pass


class TranscribeRun(protocol.TranscribeArgs, tag="transcribe", tag_field="op"):
    audio: bytes = b""  # the request's binary frame


class SynthesizeRun(protocol.SynthesizeArgs, tag="synthesize", tag_field="op"):
    pass


RunArgs = ChatRun | CompleteRun | EmbedRun | DropRun | TranscribeRun | SynthesizeRun
GenerationRun = ChatRun | CompleteRun
_RUN_ARGS: dict[str, type[RunArgs]] = {cls.__struct_config__.tag: cls for cls in RunArgs.__args__}  # type: ignore


def run_args(op: str, args: protocol.OpArgs, **extra: Any) -> RunArgs:
    """``args`` (the op's struct, already validated) as the worker reads them, with ``extra`` fields added."""
    return _RUN_ARGS[op](**msgspec.structs.asdict(args), **extra)


class Run(ToWorker, tag="run", kw_only=True):
    rid: str
    args: RunArgs
    deadline_s: float | None = None  # the client stops waiting after this many seconds: stop generating
    voice: bool = False  # latency class voice: an LLM evaluates its prompt ahead of the others'

    @property
    def op(self) -> str:
        return op_of(self.args)


def op_of(args: RunArgs) -> str:
    return args.__struct_config__.tag  # type: ignore[return-value]


class Cancel(ToWorker, tag="cancel", kw_only=True):
    rid: str


class Threads(ToWorker, tag="threads", kw_only=True):
    """The CPU threads the model may use from its next step on (an LLM whose threads the manager hands out)."""

    n: Annotated[int, msgspec.Meta(ge=1, le=1024)]


class Exit(ToWorker, tag="exit"):
    pass


class FromWorker(msgspec.Struct, tag_field="evt", forbid_unknown_fields=True):
    pass


class Ready(FromWorker, tag="ready", kw_only=True):
    pid: int
    rss: int  # bytes resident with the engine imported and no model: a spare's cost


class Loaded(FromWorker, tag="loaded", kw_only=True):
    info: dict[str, Any]  # load_ms, quantization, n_ctx, pid, rss_bytes, ...


class LoadFailed(FromWorker, tag="load_failed", kw_only=True):
    error: dict[str, Any]  # a typed error's wire map


class Chunk(FromWorker, tag="chunk", kw_only=True):
    rid: str
    chunk: dict[str, Any]
    payload: bytes | None = None


class StreamItem(msgspec.Struct, array_like=True):
    rid: str
    chunk: msgspec.Raw  # the client's chunk, encoded once by the worker: the manager relays it untouched


class Chunks(FromWorker, tag="chunks", kw_only=True):
    """A stepping worker's streamed text after a step: one message for every stream that has text to send."""

    items: list[StreamItem]


class Done(FromWorker, tag="done", kw_only=True):
    rid: str
    result: dict[str, Any]
    payload: bytes | None = None


class Generated(FromWorker, tag="generated", kw_only=True):
    """A generation's end: its typed result (an LLM's chat or completion)."""

    rid: str
    result: Completion


class Failed(FromWorker, tag="failed", kw_only=True):
    rid: str
    error: dict[str, Any]


class Idle(FromWorker, tag="idle", kw_only=True):
    kv: dict[str, int] | None = None  # saved conversations: count, bytes, spilled


class Stats(FromWorker, tag="stats", kw_only=True):
    """Sent each second while a batching worker runs requests: what ``status`` shows of it."""

    kv: dict[str, int] | None = None
    batching: dict[str, float] | None = None  # tokens_per_s, mean_batch (sequences a step), sequences_busy


_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(Load | Run | Cancel | Threads | Exit)
_from_worker = msgspec.msgpack.Decoder(
    Ready | Loaded | LoadFailed | Chunk | Chunks | Done | Generated | Failed | Idle | Stats
)


def encode(message: ToWorker | FromWorker) -> bytes:
    return _encoder.encode(message)


def stream_item(rid: str, chunk: TextChunk) -> StreamItem:
    return StreamItem(rid, msgspec.Raw(_encoder.encode(chunk)))


def decode_to_worker(frame: bytes) -> ToWorker:
    return _to_worker.decode(frame)


def decode_from_worker(frame: bytes) -> FromWorker:
    """Raises ``msgspec.DecodeError`` (a ``ValidationError`` included) on anything that is not one of the above."""
    return _from_worker.decode(frame)
