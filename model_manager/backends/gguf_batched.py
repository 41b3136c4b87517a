"""A GGUF LLM serving up to ``parallel`` requests at once (continuous batching, see ``batch_engine``).

The worker hands requests in with ``submit`` as they arrive and calls ``step`` while any runs; each step decodes
one token of every running request together, so a short request no longer waits behind a long one.

Conversations live as sequences: after a reply, its cells stay on the sequence, owned by the conversation, and the
next turn evaluates only its new tokens. When a request needs a sequence held by another conversation, that
conversation's cells are saved to the ConversationStore first (RAM, then disk, across restarts) and come back into
a free sequence when it speaks again. Results are not bit-identical to one request alone: llama.cpp's arithmetic
depends on how a batch is composed (see its server's documentation of ``cache_prompt``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel
from llama_cpp._logger import set_verbose
from llama_cpp._utils import suppress_stdout_stderr

from model_client.errors import ContextOverflow, ModelLoadFailed, ModelManagerError
from model_manager.backends import Emit, tools
from model_manager.backends.batch_engine import BatchEngine, Job, Sampling, Sequence, make_sampler
from model_manager.backends.batch_engine import common_prefix as _common_prefix
from model_manager.backends.embedding import Embedder
from model_manager.backends.gguf import (
    _decode_complete_utf8,
    _StopText,
    chat_formatter,
    chat_prompt,
    check_prompt,
    compile_grammar,
    prompt_for,
    quantization_label,
)
from model_manager.config import MIB, KvCacheSettings, Limits, ModelSpec
from model_manager.kvcache import ConversationStore

MIN_PREFIX_COPY = 16  # tokens: a shorter shared prefix is cheaper to evaluate than a sequence to copy
STEP_TOKENS = 512  # tokens one step may decode: every running request's next token, then prompt chunks


@dataclass
class _Request:
    rid: str
    args: dict[str, Any]
    emit: Emit
    text: _StopText
    context: dict[str, Any]
    conversation_id: str | None
    pending: bytearray
    job: Job | None = None
    stopped_by_string: bool = False


class BatchedGGUFBackend:
    batchable_ops: frozenset[str] = frozenset()
    batch_size = 1
    batch_wait_s = 0.0

    def __init__(self) -> None:
        self.should_stop: Callable[[], bool] = lambda: False
        self.max_prompt_tokens = 32_768
        self.model: LlamaModel | None = None
        self.ctx: LlamaContext | None = None
        self.engine: BatchEngine | None = None
        self.spec: ModelSpec | None = None
        self.formatter: Any = None
        self.store: ConversationStore | None = None
        self.embedder: Embedder | None = None  # made on the first `embed`
        self.threads: int | None = None
        self.requests: dict[str, _Request] = {}
        self.n_ctx = 0  # one sequence's context: the YAML's n_ctx
        self.parallel = 1
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._stats_at = (time.monotonic(), 0, 0, 0)

    # ----- loading --------------------------------------------------------------------------------------------

    def load(
        self, spec: ModelSpec, name: str = "model", kv: KvCacheSettings | None = None, limits: Limits | None = None
    ) -> dict[str, Any]:
        if not os.path.isfile(spec.path):
            raise ModelLoadFailed(f"model file not found: {spec.path}", path=spec.path)
        started = time.perf_counter()
        self.parallel, self.n_ctx = spec.parallel or 4, spec.n_ctx or 2048
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = spec.n_gpu_layers if spec.n_gpu_layers is not None else 0
        model_params.main_gpu = spec.gpu or 0
        model_params.split_mode = 0 if spec.gpu is not None else 1
        if spec.tensor_split:
            split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*spec.tensor_split)
            model_params.tensor_split = split
        threads = spec.n_threads or max(1, (os.cpu_count() or 2) // 2)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = self.n_ctx * self.parallel
        ctx_params.n_batch = ctx_params.n_ubatch = STEP_TOKENS
        ctx_params.n_seq_max = self.parallel
        # One KV stream a sequence, n_ctx each, rather than one pool shared by all: measured on SmolLM2, a
        # sequence's results then do not depend on what the others hold (with a shared pool, another
        # conversation's cells moved a reply's log-probabilities by up to 0.19), and no sequence can crowd out
        # the others.
        ctx_params.kv_unified = False
        # Flash attention: a conversation's later turns attend over a long history; measured with bench/kv_cache.py
        # (8 live conversations, SmolLM2, 2 cores), turn 10's time to first token 695 -> 572 ms, turn 1's 431 -> 407.
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx_params.n_threads = ctx_params.n_threads_batch = self.threads = threads
        set_verbose(False)  # llama.cpp's own log lines (each state restore, ...) only for errors
        try:
            with suppress_stdout_stderr(disable=False):
                self.model = LlamaModel(path_model=spec.path, params=model_params, verbose=False)
                self.ctx = LlamaContext(model=self.model, params=ctx_params, verbose=False)
        except Exception as exc:
            raise ModelLoadFailed(f"llama.cpp could not load {spec.path}: {exc}", path=spec.path) from None
        self.engine = BatchEngine(self.model, self.ctx, self.parallel, STEP_TOKENS)
        self.spec = spec
        if limits is not None:
            self.max_prompt_tokens = limits.max_prompt_tokens
        metadata = self.model.metadata()
        self.formatter = chat_formatter(self.model, metadata, spec.chat_format)
        if kv is not None and kv.enabled:
            identity = f"{spec.path}|{os.path.getsize(spec.path)}|ctx={self.n_ctx}|layers={spec.n_gpu_layers}|batched"
            self.store = ConversationStore(name, identity, kv.budget_mib * MIB, kv.ttl_s, kv.spill_dir, kv.disk_ttl_s)
        file_type = metadata.get("general.file_type")
        return {
            "load_ms": round((time.perf_counter() - started) * 1000, 1),
            "quantization": quantization_label(int(file_type) if file_type is not None else None),
            "n_ctx": self.n_ctx,
            "parallel": self.parallel,
            "n_ctx_train": self.model.n_ctx_train(),
            "n_params": self.model.n_params(),
            "size_bytes": self.model.size(),
            "architecture": metadata.get("general.architecture", ""),
        }

    def warm_up(self) -> None:
        assert self.engine is not None and self.model is not None
        bos = self.model.token_bos()
        sampler = make_sampler(self.model, Sampling(temperature=0.0))
        self.engine.start(Job("warm-up", [bos if bos >= 0 else 0], 1, sampler, lambda _t: True), None)
        while self.engine.busy:
            self.engine.step()

    # ----- requests -------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.requests)

    @property
    def free(self) -> int:
        return self.engine.free if self.engine else 0

    def run(self, op: str, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """One request alone (conversation.drop, and callers that do not step): submit, step until it ends."""
        if op == "conversation.drop":
            return self._drop(args["conversation_id"])
        if op == "embed":
            return self._embedder().embed(
                [args["input"]] if isinstance(args["input"], str) else args["input"], args["normalize"]
            )
        rid = f"run-{time.monotonic_ns()}"
        self.submit(rid, op, args, emit)
        while True:
            for ended_rid, outcome in self.step():
                if ended_rid == rid:
                    if isinstance(outcome, Exception):
                        raise outcome
                    return outcome

    def submit(self, rid: str, op: str, args: dict[str, Any], emit: Emit) -> None:
        """Start ``rid`` on a free sequence; raises the typed error that refuses it at once."""
        assert self.engine is not None and self.model is not None and self.spec is not None
        policy = self.spec.context_overflow
        if op == "chat":
            args = tools.prepare(args)
        tokens, stops, context = prompt_for(op, args, self._chat_prompt, self.model.tokenize, policy)
        check_prompt(tokens, self.max_prompt_tokens, self.n_ctx, policy)
        if not self.engine.free:
            raise ModelManagerError(f"all {self.parallel} sequences are busy")  # the manager sends at most parallel
        reuse = args.get("cache", True)
        conversation_id = args.get("conversation_id") if reuse else None
        request = _Request(rid, args, emit, _StopText(stops), context, conversation_id, bytearray())
        sampling = Sampling(
            temperature=args["temperature"],
            top_p=args["top_p"],
            top_k=args["top_k"],
            min_p=args["min_p"],
            repeat_penalty=args["repeat_penalty"],
            seed=args.get("seed"),
        )
        grammar = compile_grammar(self.model.vocab, args)
        job = Job(
            rid=rid,
            prompt=tokens,
            max_new=min(args["max_tokens"], self.n_ctx - len(tokens)),
            sampler=make_sampler(self.model, sampling, grammar),
            on_token=lambda token: self._on_token(request, token),
            prompt_into_sampler=grammar is None,
        )
        request.job = job
        sequence = self._sequence_for(job, conversation_id, reuse)
        self.engine.start_on(sequence, job, conversation_id, reuse)
        self.requests[rid] = request

    def _chat_prompt(self, args: dict[str, Any]) -> tuple[list[int], list[str], int]:
        assert self.model is not None and self.spec is not None
        return chat_prompt(self.formatter, self.model.tokenize, self.n_ctx, self.spec.context_overflow, args)

    def _chat_tokens(self, args: dict[str, Any]) -> list[int]:
        return self._chat_prompt(args)[0]

    def _sequence_for(self, job: Job, conversation_id: str | None, reuse: bool) -> Sequence:
        """The conversation's own sequence; else a free one, the conversation's saved state put back into it;
        else the free one sharing most of the prompt. Cells of another conversation are saved before they go."""
        assert self.engine is not None
        sequence = self.engine.choose(job.prompt, conversation_id, reuse)
        if sequence.owner is not None and sequence.owner != conversation_id:
            self._save(sequence)
            sequence.owner = None
        if reuse and conversation_id is not None and sequence.owner != conversation_id and self.store is not None:
            saved = self.store.get(conversation_id)
            if saved is not None and _common_prefix(saved.tokens, job.prompt) > _common_prefix(
                sequence.cells, job.prompt
            ):
                self._restore(sequence, saved.tokens, saved.state)
        if reuse:
            donor, shared = self.engine.donor(job.prompt, exclude=sequence)
            if donor is not None and shared >= _common_prefix(sequence.cells, job.prompt) + MIN_PREFIX_COPY:
                self.engine.copy_prefix(donor, sequence, shared)
        return sequence

    def _save(self, sequence: Sequence) -> None:
        assert self.ctx is not None
        if self.store is None or sequence.owner is None or not sequence.cells:
            return
        size = llama_cpp.llama_state_seq_get_size(self.ctx.ctx, sequence.seq_id)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx.ctx, buffer, size, sequence.seq_id)
        self.store.put(sequence.owner, list(sequence.cells), ctypes.string_at(buffer, written))

    def _restore(self, sequence: Sequence, tokens: list[int], state: bytes) -> None:
        assert self.ctx is not None and self.engine is not None
        self.engine.clear(sequence)
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self.ctx.ctx, buffer, len(state), sequence.seq_id):
            sequence.cells = list(tokens)
        else:
            self.engine.clear(sequence)

    def cancel(self, rid: str, reason: str) -> tuple[str, dict[str, Any]] | None:
        """End ``rid`` now (its client went away or gave up); its partial result, or None if it is not here."""
        assert self.engine is not None
        request = self.requests.get(rid)
        if request is None or request.job is None:
            return None
        self.engine.cancel(rid, reason)
        result = self._result(request)
        result["stopped"] = reason
        return rid, result

    def step(self) -> list[tuple[str, dict[str, Any] | Exception]]:
        """One decode for every running request; the (rid, result or error) of those that ended in it."""
        assert self.engine is not None
        outcomes: list[tuple[str, dict[str, Any] | Exception]] = []
        for job in self.engine.step():
            request = self.requests.get(job.rid)
            if request is None:
                continue
            if job.finish_reason == "pool_full":
                self.requests.pop(job.rid, None)
                outcomes.append(
                    (
                        job.rid,
                        ContextOverflow(
                            "the model's KV pool is full: every sequence holds long contexts",
                            n_ctx=self.n_ctx,
                            parallel=self.parallel,
                            policy=self.spec.context_overflow if self.spec else "error",
                        ),
                    )
                )
                continue
            outcomes.append((job.rid, self._result(request)))
        return outcomes

    def _on_token(self, request: _Request, token: int) -> bool:
        """Text of ``token`` out to the client, held back while it may be the start of a stop string."""
        assert self.model is not None
        request.pending += self._piece(token)
        piece = _decode_complete_utf8(request.pending)
        if piece:
            released, stopped = request.text.feed(piece)
            if released and request.args["stream"]:
                request.emit({"text": released})
            if stopped:
                request.stopped_by_string = True
                return False
        return True

    def _piece(self, token: int) -> bytes:
        """The token's bytes (``LlamaModel.token_to_piece`` returns its whole buffer, NUL padding included)."""
        assert self.model is not None
        size = llama_cpp.llama_token_to_piece(self.model.vocab, token, self._piece_buffer, 256, 0, False)
        if size < 0:  # a longer piece than the buffer: llama.cpp says how long
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.model.vocab, token, buffer, -size, 0, False)
            return buffer.raw[:size]
        return self._piece_buffer.raw[:size]

    def _result(self, request: _Request) -> dict[str, Any]:
        job = request.job
        assert job is not None
        self.requests.pop(request.rid, None)
        if not request.stopped_by_string and (tail := request.text.flush()) and request.args["stream"]:
            request.emit({"text": tail})
        ended = job.ended_at or time.perf_counter()
        first = job.first_token_at or ended
        decode_s = ended - first
        completion = len(job.generated)
        finish = job.finish_reason if job.finish_reason in ("stop", "length") else "cancelled"
        return tools.finish(
            request.args,
            {
                "text": request.text.released,
                "finish_reason": finish,
                "usage": {
                    "prompt_tokens": len(job.prompt),
                    "completion_tokens": completion,
                    "cached_tokens": job.cached,
                },
                "timings": {
                    "ttft_ms": round((first - job.started) * 1000, 2),
                    "total_ms": round((ended - job.started) * 1000, 2),
                    "tokens_per_s": round((completion - 1) / decode_s, 2) if completion > 1 and decode_s else 0.0,
                },
                "context": request.context,
            },
        )

    def _drop(self, conversation_id: str) -> dict[str, Any]:
        assert self.engine is not None
        live = self.engine.forget(conversation_id)
        saved = self.store.drop(conversation_id) if self.store else False
        return {"dropped": live or saved, "conversation_id": conversation_id}

    # ----- between requests -----------------------------------------------------------------------------------

    def set_threads(self, n: int) -> None:
        """From the next step on (llama.cpp reads its context's thread counts at each decode)."""
        assert self.ctx is not None
        llama_cpp.llama_set_n_threads(self.ctx.ctx, n, n)
        self.threads = n
        if self.embedder is not None:
            self.embedder.set_threads(n)

    def _embedder(self) -> Embedder:
        assert self.model is not None
        if self.embedder is None:
            self.embedder = Embedder(self.model, self.threads)
        return self.embedder

    def after_reply(self, idle: bool = True) -> None:
        if self.store is not None:
            self.store.expire()

    def kv_stats(self) -> dict[str, int] | None:
        if self.store is None or self.engine is None:
            return None
        stats = dict(self.store.stats())
        live = {s.owner for s in self.engine.sequences if s.owner is not None}
        stats["saved"] = stats["conversations"]
        stats["conversations"] = len(live | set(self.store.states))  # every one the model can resume, live or saved
        stats["live"] = len(live)
        stats["sequences_busy"] = sum(1 for s in self.engine.sequences if s.job is not None)
        stats["parallel"] = self.parallel
        stats["prefix_copies"] = self.engine.prefix_copies
        return stats

    def batching_stats(self) -> dict[str, float]:
        """Since the last call: tokens generated per second, and sequences decoded per step on average."""
        assert self.engine is not None
        engine, now = self.engine, time.monotonic()
        steps, tokens = engine.steps - self._stats_at[1], engine.generated - self._stats_at[2]
        sequences = engine.sequence_steps - self._stats_at[3]
        elapsed = max(1e-3, now - self._stats_at[0])
        self._stats_at = (now, engine.steps, engine.generated, engine.sequence_steps)
        return {
            "tokens_per_s": round(tokens / elapsed, 1),
            "mean_batch": round(sequences / steps, 2) if steps else 0.0,
            "sequences_busy": sum(1 for s in engine.sequences if s.job is not None),
        }

    def unload(self) -> None:
        """Every live conversation is saved, then kept on disk (where configured), before the worker ends."""
        if self.engine is not None:
            for sequence in self.engine.sequences:
                with contextlib.suppress(Exception):
                    self._save(sequence)
        if self.store is not None:
            self.store.spill_all()
