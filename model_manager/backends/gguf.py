"""GGUF LLMs through llama-cpp-python: chat (the GGUF's own chat template) and plain completion.

The token loop is ours rather than ``create_completion``'s so that time to first token, token counts and the
tokens reused from the context (``cached_tokens``) are exact, and stop strings never leak into a stream.

Conversations: the live context holds one conversation at a time. After each reply (once it is sent) the
conversation's KV state is saved with ``llama_state_seq_get_data`` into the ConversationStore; a request for
another conversation restores its state with ``llama_state_seq_set_data`` when that shares a longer prefix with
the new prompt than the live context does, then evaluates only the new tokens. Per-sequence state rather than
``Llama.save_state``: measured on SmolLM2 with a 1,100-token history, the sequence state is the KV cells alone
(about 25 MB) and saves and restores in a few milliseconds, while ``save_state`` also copies the logits array
(n_ctx x n_vocab floats, 400 MB at n_ctx 2048) on every save.

Exactness: with temperature 0 a reply with reuse must be token for token the reply without it. llama.cpp's CPU
attention is bit-identical however a prompt is split into batches, but not after runs of one-token decodes
(measured on SmolLM2: two replies' worth of decoded tokens in the cache flipped a greedy choice of the third turn;
batch evaluation split at any point was exact). So the cells of a reply's decoded tokens are dropped after the
reply and the tokens evaluated again as one batch: right away when the worker is idle, else in the
conversation's next turn. Cells are only ever dropped by reloading the kept ones into a cleared cache, so the
cache has the shape a fresh evaluation gives it.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from collections.abc import Callable
from typing import Any

import gguf
import llama_cpp
from llama_cpp import Llama, llama_chat_format
from llama_cpp.llama_chat_format import ChatFormatter, Jinja2ChatFormatter

from model_client.errors import BadRequest, ContextOverflow, ModelLoadFailed
from model_manager.backends import Emit, tools
from model_manager.backends.batch_engine import common_prefix as _common_prefix
from model_manager.backends.embedding import Embedder
from model_manager.config import MIB, KvCacheSettings, Limits, ModelSpec
from model_manager.kvcache import ConversationStore

# Used when a GGUF carries no chat template and the YAML names no ``chat_format`` (base models).
FALLBACK_CHAT_FORMAT = "chatml"


def quantization_label(file_type: int | None) -> str:
    """The GGUF ``general.file_type`` as llama.cpp names it (``Q4_1``, ``Q4_K_M``, ``F16``)."""
    if file_type is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type_{file_type}"


class GGUFBackend:
    batchable_ops: frozenset[str] = frozenset()  # one context, one request at a time
    batch_size = 1
    batch_wait_s = 0.0

    def __init__(self) -> None:
        self.should_stop: Callable[[], bool] = lambda: False  # the worker sets its own
        self.max_prompt_tokens = 32_768
        self.llm: Llama | None = None
        self.spec: ModelSpec | None = None
        self.formatter: ChatFormatter | None = None
        self.store: ConversationStore | None = None
        self.embedder: Embedder | None = None  # made on the first `embed`
        self.threads: int | None = None
        self.live_conversation: str | None = None  # the conversation whose tokens the context holds
        self.to_save: str | None = None  # saved after the reply is sent, off the request's critical path
        self.prompt_len = 0  # the last prompt: the context cells that batch evaluation computed

    def load(
        self,
        spec: ModelSpec,
        name: str = "model",
        kv: KvCacheSettings | None = None,
        limits: Limits | None = None,
    ) -> dict[str, Any]:
        if not os.path.isfile(spec.path):
            raise ModelLoadFailed(f"model file not found: {spec.path}", path=spec.path)
        started = time.perf_counter()
        try:
            llm = Llama(
                model_path=spec.path,
                n_ctx=spec.n_ctx,
                n_gpu_layers=spec.n_gpu_layers,
                main_gpu=spec.gpu or 0,
                split_mode=0 if spec.gpu is not None else 1,  # LLAMA_SPLIT_MODE_NONE pins to main_gpu
                tensor_split=spec.tensor_split,
                n_threads=spec.n_threads,
                n_threads_batch=spec.n_threads,
                n_batch=spec.n_batch,
                verbose=False,
            )
        except Exception as exc:  # llama.cpp reports every load problem as a plain ValueError
            raise ModelLoadFailed(f"llama.cpp could not load {spec.path}: {exc}", path=spec.path) from None
        self.llm, self.spec, self.threads = llm, spec, spec.n_threads
        if limits is not None:
            self.max_prompt_tokens = limits.max_prompt_tokens
        self.formatter = self._chat_formatter(llm, spec.chat_format)
        if kv is not None and kv.enabled:
            identity = f"{spec.path}|{os.path.getsize(spec.path)}|ctx={llm.n_ctx()}|layers={spec.n_gpu_layers}"
            self.store = ConversationStore(name, identity, kv.budget_mib * MIB, kv.ttl_s, kv.spill_dir, kv.disk_ttl_s)
        file_type = llm.metadata.get("general.file_type")
        return {
            "load_ms": round((time.perf_counter() - started) * 1000, 1),
            "quantization": quantization_label(int(file_type) if file_type is not None else None),
            "n_ctx": llm.n_ctx(),
            "n_ctx_train": llm._model.n_ctx_train(),
            "n_params": llm._model.n_params(),
            "size_bytes": llm._model.size(),
            "architecture": llm.metadata.get("general.architecture", ""),
        }

    def set_threads(self, n: int) -> None:
        """From the next evaluation on (llama.cpp reads its context's thread counts at each decode)."""
        assert self.llm is not None
        llama_cpp.llama_set_n_threads(self.llm.ctx, n, n)
        self.threads = n
        if self.embedder is not None:
            self.embedder.set_threads(n)

    def _embedder(self) -> Embedder:
        assert self.llm is not None
        if self.embedder is None:
            self.embedder = Embedder(self.llm._model, self.threads or self.llm.n_threads)
        return self.embedder

    @staticmethod
    def _chat_formatter(llm: Llama, chat_format: str | None) -> ChatFormatter:
        return chat_formatter(llm._model, llm.metadata, chat_format)

    def warm_up(self) -> None:
        assert self.llm is not None
        bos = self.llm.token_bos()
        next(iter(self.llm.generate([bos if bos >= 0 else 0], temp=0.0)))

    def run(self, op: str, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        assert self.llm is not None and self.formatter is not None and self.spec is not None
        if op == "conversation.drop":
            return self._drop(args["conversation_id"])
        if op == "embed":
            return self._embedder().embed(
                [args["input"]] if isinstance(args["input"], str) else args["input"], args["normalize"]
            )
        if op == "chat":
            args = tools.prepare(args)
        tokens, stops, context = prompt_for(op, args, self._chat_prompt, self.llm.tokenize, self.spec.context_overflow)
        result = self._generate(tokens, stops, args, emit)
        result["context"] = context
        return tools.finish(args, result)

    def _chat_prompt(self, args: dict[str, Any]) -> tuple[list[int], list[str], int]:
        assert self.llm is not None and self.formatter is not None and self.spec is not None
        return chat_prompt(self.formatter, self.llm.tokenize, self.llm.n_ctx(), self.spec.context_overflow, args)

    def _drop(self, conversation_id: str) -> dict[str, Any]:
        dropped = self.store.drop(conversation_id) if self.store else False
        if self.live_conversation == conversation_id:
            self.live_conversation = None
        return {"dropped": dropped, "conversation_id": conversation_id}

    def _prepare_context(self, conversation_id: str | None, prompt: list[int], reuse: bool) -> None:
        """Leave in the context the longest prefix of ``prompt`` that the live context or the conversation's
        saved state holds, in canonical cell layout, so that only the rest is evaluated."""
        llm = self.llm
        assert llm is not None
        live_tokens = llm.input_ids[: llm.n_tokens].tolist()
        live = _common_prefix(live_tokens, prompt) if reuse else 0
        saved = self.store.get(conversation_id) if reuse and self.store and conversation_id else None
        keep = min(max(live, _common_prefix(saved.tokens, prompt) if saved else 0), len(prompt) - 1)
        if keep <= 0:
            self._clear_cells()
        elif saved is not None and keep > live:
            self._load_cells(saved.tokens, saved.state)
        if 0 < keep < llm.n_tokens:
            self._truncate_cells(keep)
        self.live_conversation = conversation_id if reuse else None

    def _clear_cells(self) -> None:
        llm = self.llm
        assert llm is not None
        llm._ctx.kv_cache_clear()
        llm.n_tokens, llm._requires_eval = 0, True

    def _load_cells(self, tokens: list[int], state: bytes) -> None:
        llm = self.llm
        assert llm is not None
        self._clear_cells()
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buffer, len(state), 0):
            llm.input_ids[: len(tokens)] = tokens
            llm.n_tokens = len(tokens)
        else:
            self._clear_cells()

    def _cell_state(self) -> bytes:
        llm = self.llm
        assert llm is not None
        size = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(llm._ctx.ctx, buffer, size, 0)
        return ctypes.string_at(buffer, written)  # one memcpy (slicing a ctypes array builds a list of ints)

    def _truncate_cells(self, keep: int) -> None:
        """Keep the first ``keep`` tokens. Removing cells in place leaves llama.cpp's cache bookkeeping (its
        high-water mark) as it was, and attention over a differently shaped cache is not bit-identical; so the
        kept cells are reloaded into a cleared cache instead."""
        llm = self.llm
        assert llm is not None
        llm._ctx.kv_cache_seq_rm(-1, keep, -1)
        tokens = llm.input_ids[:keep].tolist()
        self._load_cells(tokens, self._cell_state())

    def after_reply(self, idle: bool = True) -> None:
        """Make the context exact again, save the conversation just served, let old states expire.

        The reply's tokens were decoded one at a time; they are dropped from the cache and, for a conversation
        when no request is waiting, evaluated again as one batch now. Under load that is left to the
        conversation's next turn.
        """
        llm, conversation_id, self.to_save = self.llm, self.to_save, None
        if llm is None:
            return
        if 0 < self.prompt_len < llm.n_tokens:
            reply = llm.input_ids[self.prompt_len : llm.n_tokens].tolist()
            self._truncate_cells(self.prompt_len)
            if idle and conversation_id is not None:  # only a conversation's next turn needs them
                llm.eval(reply)
        if self.store is None:
            return
        if conversation_id is not None and llm.n_tokens > 0:
            self.store.put(conversation_id, llm.input_ids[: llm.n_tokens].tolist(), self._cell_state())
        self.store.expire()

    def kv_stats(self) -> dict[str, int] | None:
        return self.store.stats() if self.store else None

    def unload(self) -> None:
        """Keep every conversation on disk (where configured) before the worker ends."""
        if self.store is not None:
            self.store.spill_all()

    def _generate(self, prompt: list[int], stops: list[str], args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        llm = self.llm
        assert llm is not None
        n_ctx = llm.n_ctx()
        check_prompt(prompt, self.max_prompt_tokens, n_ctx, self.spec.context_overflow if self.spec else None)
        max_new = min(args["max_tokens"], n_ctx - len(prompt))
        grammar = compile_grammar(llm._model.vocab, args)
        if args.get("seed") is not None:
            llm.set_seed(args["seed"])
        stream = args["stream"]
        started = time.perf_counter()  # restoring a conversation counts in the time to first token
        conversation_id = args.get("conversation_id")
        self._prepare_context(conversation_id, prompt, args.get("cache", True))
        # llama-cpp-python re-evaluates the last prompt token when the whole prompt is cached.
        cached = min(_common_prefix(llm.input_ids[: llm.n_tokens].tolist(), prompt), len(prompt) - 1)
        first_token_at: float | None = None
        text = _StopText(stops)
        completion_tokens = 0
        finish_reason = "length"
        stopped_by_string = False
        pending = bytearray()
        for token in llm.generate(
            prompt,
            grammar=grammar,
            temp=args["temperature"],
            top_p=args["top_p"],
            top_k=args["top_k"],
            min_p=args["min_p"],
            repeat_penalty=args["repeat_penalty"],
        ):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                finish_reason = "stop"
                break
            completion_tokens += 1
            pending += llm.detokenize([token], prev_tokens=None)
            piece = _decode_complete_utf8(pending)
            if piece:
                released, stopped = text.feed(piece)
                if released and stream:
                    emit({"text": released})
                if stopped:
                    finish_reason, stopped_by_string = "stop", True
                    break
            if completion_tokens >= max_new:
                break
            if self.should_stop():  # the client went away or gave up: stop within a token
                finish_reason = "cancelled"
                break
        if not stopped_by_string and (tail := text.flush()) and stream:
            emit({"text": tail})
        ended = time.perf_counter()
        first_token_at = first_token_at or ended
        self.prompt_len = len(prompt)
        if args.get("cache", True):
            self.live_conversation = self.to_save = conversation_id
        else:
            self.live_conversation = None
        decode_s = ended - first_token_at
        return {
            "text": text.released,
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens, "cached_tokens": cached},
            "timings": {
                "ttft_ms": round((first_token_at - started) * 1000, 2),
                "total_ms": round((ended - started) * 1000, 2),
                "tokens_per_s": round((completion_tokens - 1) / decode_s, 2)
                if completion_tokens > 1 and decode_s
                else 0.0,
            },
        }


def chat_formatter(model: Any, metadata: dict[str, str], chat_format: str | None) -> ChatFormatter:
    """The YAML's ``chat_format`` (a llama-cpp-python format name), else the GGUF's template, else ChatML."""
    template = metadata.get("tokenizer.chat_template")
    if chat_format is None and template:
        eos_id, bos_id = model.token_eos(), model.token_bos()
        eos = model.token_get_text(eos_id) if eos_id >= 0 else ""
        bos = model.token_get_text(bos_id) if bos_id >= 0 else ""
        return Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])
    name = chat_format or FALLBACK_CHAT_FORMAT
    formatter = getattr(llama_chat_format, "format_" + name.replace("-", "_"), None)
    if formatter is None:
        raise ModelLoadFailed(f"unknown chat_format {name!r}", chat_format=name)
    return formatter


def chat_prompt(
    formatter: ChatFormatter, tokenize: Callable[..., list[int]], n_ctx: int, policy: str | None, args: dict[str, Any]
) -> tuple[list[int], list[str], int]:
    """Tokens of the chat prompt, its stop strings, and how many old turns were dropped: under the ``truncate``
    policy, the oldest turns go until the prompt and the reply fit in ``n_ctx``."""
    messages = list(args["messages"])
    room = min(args["max_tokens"], n_ctx // 2)
    dropped = 0
    while True:
        formatted = formatter(messages=messages)
        stops = [*([formatted.stop] if isinstance(formatted.stop, str) else formatted.stop or []), *args["stop"]]
        tokens = tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
        if policy != "truncate" or len(tokens) + room <= n_ctx:
            return tokens, stops, dropped
        oldest = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
        if oldest is None:
            return tokens, stops, dropped  # only the system prompt and the last message are left
        del messages[oldest]
        dropped += 1


def prompt_for(
    op: str,
    args: dict[str, Any],
    chat: Callable[[dict[str, Any]], tuple[list[int], list[str], int]],
    tokenize: Callable[..., list[int]],
    policy: str | None,
) -> tuple[list[int], list[str], dict[str, Any]]:
    """The prompt's tokens, its stop strings, and the ``context`` report (overflow policy, turns dropped)."""
    context: dict[str, Any] = {"policy": policy, "dropped_messages": 0}
    if op == "chat":
        tokens, stops, context["dropped_messages"] = chat(args)
    elif op == "complete":
        stops = list(args["stop"])
        tokens = tokenize(args["prompt"].encode(), add_bos=True, special=False)
    else:
        raise BadRequest(f"op {op!r} is not served by an llm")
    return tokens, stops, context


def check_prompt(tokens: list[int], max_prompt_tokens: int, n_ctx: int, policy: str | None) -> None:
    """Refuse a prompt over the limit, or one that leaves the context no room for a single new token."""
    if len(tokens) > max_prompt_tokens:
        limit = max_prompt_tokens
        raise BadRequest(f"prompt is {len(tokens)} tokens, over the limit of {limit}", max_prompt_tokens=limit)
    if len(tokens) >= n_ctx:
        raise ContextOverflow(
            f"prompt is {len(tokens)} tokens, the context holds {n_ctx}",
            prompt_tokens=len(tokens),
            n_ctx=n_ctx,
            policy=policy or "error",
        )


def _decode_complete_utf8(buffer: bytearray) -> str:
    """Take the longest valid UTF-8 prefix out of ``buffer``; a multi-byte character split across tokens waits."""
    for cut in range(len(buffer), max(len(buffer) - 4, -1), -1):
        try:
            text = buffer[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        del buffer[:cut]
        return text
    text = buffer.decode("utf-8", errors="replace")
    buffer.clear()
    return text


class _StopText:
    """Accumulates generated text and releases only what cannot be the start of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.released = ""
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        self.pending += piece
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                out = self.pending[:at]
                self.released += out
                self.pending = ""
                return out, True
        keep = self._held_suffix()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        self.released += out
        return out, False

    def _held_suffix(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of some stop string."""
        for size in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.released += out
        return out


def compile_grammar(vocab: Any, args: dict[str, Any]) -> Any:
    """The request's ``grammar`` (GBNF) or ``json_schema`` as a llama.cpp grammar; None when it has neither.
    Raises BadRequest naming what does not compile (tried here: llama.cpp takes a broken grammar silently)."""
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    grammar, schema = args.get("grammar"), args.get("json_schema")
    if grammar is None and schema is None:
        return None
    what = "grammar" if grammar is not None else "json_schema"
    try:
        text = grammar if grammar is not None else json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # a schema the converter does not support
        raise BadRequest(f"the json_schema cannot be turned into a grammar: {exc}", field=what) from None
    trial = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
    if not trial:
        raise BadRequest(f"the {what} does not compile (llama.cpp's GBNF, with a `root` rule)", field=what)
    llama_cpp.llama_sampler_free(trial)
    return LlamaGrammar.from_string(text, verbose=False)
