"""A GGUF LLM: chat (the GGUF's own chat template), plain completion and embeddings, up to ``parallel`` requests
at once on one batched engine; ``parallel: 1`` is the same engine in exact mode (see ``engine``).

The worker hands requests in with ``submit`` as they arrive and calls ``step`` while any runs; each step decodes
one token of every running request together, so a short request never waits behind a long one. A streamed
request's text leaves through ``take_chunks``: its first text as soon as it is sampled (the time to first token),
then every stream's new text together once per ``STREAM_INTERVAL_S``, in one message, and what is left before its
result. On a GPU a step takes 2-3 ms, and a message per token per stream was what the worker waited on.

With ``parallel`` > 1 results are not bit-identical to one request alone: llama.cpp's arithmetic depends on how
a batch is composed (see its server's documentation of ``cache_prompt``).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from model_client.errors import BadRequest, ContextOverflow, ModelLoadFailed, ModelManagerError
from model_client.results import Completion, ContextReport, TextChunk, Timings, Usage
from model_manager.backends import Emit, tools
from model_manager.backends.embedding import Embedder
from model_manager.backends.llama_cpp_api import LlamaContext, LlamaModel, set_verbose, suppress_stdout_stderr
from model_manager.backends.llm.conversations import Conversations
from model_manager.backends.llm.engine import BatchEngine
from model_manager.backends.llm.executor import LlamaExecutor, make_sampler
from model_manager.backends.llm.prompt import (
    chat_formatter,
    chat_prompt,
    check_prompt,
    compile_grammar,
    prompt_for,
)
from model_manager.backends.llm.state import Job, Sampling
from model_manager.backends.llm.text import Detokenizer, StopText, decode_complete_utf8
from model_manager.config import MIB, KvCacheSettings, Limits, ModelSpec, sequences
from model_manager.footprint import quantization_label
from model_manager.kvcache import ConversationStore
from model_manager.llama_version import WrongLlamaCpp, check_version
from model_manager.worker_protocol import ChatRun, CompleteRun, DropRun, EmbedRun, GenerationRun, RunArgs, op_of

STREAM_INTERVAL_S = 0.02  # a stream's chunks after its first: at most 50 a second, each with every token since
Chunk = tuple[str, TextChunk]  # (request id, chunk)


def flash_attention(exact: bool, setting: str | bool = "auto") -> int:
    """llama.cpp's flash attention setting: on, on a GPU and on a CPU alike (llama-server's own ``-fa auto`` turns it
    on wherever the device has the kernel). Measured with llama-cpp-python 0.3.36 (2 cores, a KV stream per
    sequence, 44-token prompts): a decode step of SmolLM2 takes 12.5 ms instead of 15.1 for one sequence, 27.6
    instead of 33.4 for four; of Gemma 3 270M 24.4 instead of 25.8, 38.5 instead of 41.7; and bench/peers.py's
    8 conversations x 10 turns gave turn 10 its first token after 490 ms with it, 492 without (older releases were
    slower with it on long histories' prompts, which made it off on a CPU until then). ``setting`` (the model's
    ``flash_attn``) ``off`` turns it off. Never in exact mode: with it, a greedy third turn with reuse differed from
    the same turn evaluated afresh."""
    if exact or setting in ("off", False):
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED


@dataclass(eq=False)
class _Request:
    rid: str
    args: GenerationRun
    text: StopText
    context: ContextReport
    job: Job | None = None
    stopped_by_string: bool = False
    undecoded: bytearray = field(default_factory=bytearray)  # a multi-byte character's first bytes
    outbox: list[str] = field(default_factory=list)  # released text not yet sent
    out_tokens: int = 0  # tokens since the last chunk
    sent_at: float | None = None  # when its last chunk went (None: none yet)


class GGUFBackend:
    batchable_ops: frozenset[str] = frozenset()
    batch_size = 1
    batch_wait_s = 0.0

    def __init__(self) -> None:
        self.should_stop: Callable[[], bool] = lambda: False
        self.max_prompt_tokens = 32_768
        self.model: LlamaModel | None = None
        self.ctx: LlamaContext | None = None
        self.engine: BatchEngine | None = None
        self.conversations: Conversations | None = None
        self.spec: ModelSpec | None = None
        self.formatter: Any = None
        self.detokenizer: Detokenizer | None = None
        self.embedder: Embedder | None = None  # made on the first `embed`
        self.threads: int | None = None
        self.requests: dict[str, _Request] = {}
        self.last_chunks: list[Chunk] = []  # ended requests' last text: out before their results
        self.flushed_at = 0.0  # when every stream's text last went out
        self.n_ctx = 0  # one sequence's context: the YAML's n_ctx
        self.parallel = 1
        self._stats_at = (time.monotonic(), 0, 0, 0)

    # ----- loading --------------------------------------------------------------------------------------------

    def load(
        self, spec: ModelSpec, name: str = "model", kv: KvCacheSettings | None = None, limits: Limits | None = None
    ) -> dict[str, Any]:
        try:
            check_version()
        except WrongLlamaCpp as exc:
            raise ModelLoadFailed(str(exc), path=spec.path) from None
        if not os.path.isfile(spec.path):
            raise ModelLoadFailed(f"model file not found: {spec.path}", path=spec.path)
        started = time.perf_counter()
        self.parallel, self.n_ctx = sequences(spec), spec.n_ctx or 2048  # the voice sequences included
        step_tokens = spec.n_batch or 512
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = spec.n_gpu_layers if spec.n_gpu_layers is not None else 0
        model_params.main_gpu = spec.gpu or 0
        model_params.split_mode = 0 if spec.gpu is not None else 1  # LLAMA_SPLIT_MODE_NONE pins to main_gpu
        if spec.tensor_split:
            model_params.tensor_split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*spec.tensor_split)
        threads = spec.n_threads or max(1, (os.cpu_count() or 2) // 2)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = self.n_ctx * self.parallel
        ctx_params.n_batch = ctx_params.n_ubatch = step_tokens
        ctx_params.n_seq_max = self.parallel
        # One KV stream a sequence, n_ctx each, rather than one pool shared by all: measured on SmolLM2, a
        # sequence's results then do not depend on what the others hold (with a shared pool, another
        # conversation's cells moved a reply's log-probabilities by up to 0.19), and no sequence can crowd out
        # the others.
        ctx_params.kv_unified = False
        exact = (spec.parallel or 1) == 1
        ctx_params.flash_attn_type = flash_attention(exact, spec.flash_attn)
        ctx_params.n_threads = ctx_params.n_threads_batch = self.threads = threads
        set_verbose(False)  # llama.cpp's own log lines (each state restore, ...) only for errors
        try:
            with suppress_stdout_stderr(disable=False):
                self.model = LlamaModel(path_model=spec.path, params=model_params, verbose=False)
                self.ctx = LlamaContext(model=self.model, params=ctx_params, verbose=False)
        except Exception as exc:  # llama.cpp reports every load problem as a plain ValueError
            raise ModelLoadFailed(f"llama.cpp could not load {spec.path}: {exc}", path=spec.path) from None
        executor = LlamaExecutor(self.model, self.ctx, step_tokens, self.parallel)
        self.engine = BatchEngine(executor, self.parallel, step_tokens, self.n_ctx, exact=exact)
        self.spec = spec
        if limits is not None:
            self.max_prompt_tokens = limits.max_prompt_tokens
        metadata = self.model.metadata()
        self.formatter = chat_formatter(self.model, metadata, spec.chat_format)
        self.detokenizer = Detokenizer(self.model.vocab)
        store = None
        if kv is not None and kv.enabled:
            identity = f"{spec.path}|{os.path.getsize(spec.path)}|ctx={self.n_ctx}|layers={spec.n_gpu_layers}|batched"
            store = ConversationStore(name, identity, kv.budget_mib * MIB, kv.ttl_s, kv.spill_dir, kv.disk_ttl_s)
        self.conversations = Conversations(self.engine, store)
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
        self.engine.start(Job("warm-up", [bos if bos >= 0 else 0], 1, sampler, lambda _t: True), None, reuse=False)
        while self.engine.busy:
            self.engine.step()

    # ----- requests -------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.requests)

    def run(self, op: str, args: RunArgs, emit: Emit) -> dict[str, Any]:
        """The ops served at once, between steps: conversation.drop and embed (generations are ``submit``ted)."""
        if isinstance(args, DropRun):
            assert self.conversations is not None
            dropped = self.conversations.drop(args.conversation_id)
            return {"dropped": dropped, "conversation_id": args.conversation_id}
        if isinstance(args, EmbedRun):
            texts = [args.input] if isinstance(args.input, str) else args.input
            return self._embedder().embed(texts, args.normalize)
        raise BadRequest(f"op {op!r} is served by submit and step, not run")

    def submit(self, rid: str, args: RunArgs, voice: bool = False) -> None:
        """Start ``rid`` on a free sequence; raises the typed error that refuses it at once."""
        assert self.engine is not None and self.model is not None and self.spec is not None
        assert self.conversations is not None
        policy = self.spec.context_overflow
        if isinstance(args, ChatRun):
            args = tools.prepare(args)
        elif not isinstance(args, CompleteRun):
            raise BadRequest(f"op {op_of(args)!r} is not a generation")
        tokens, stops, context = prompt_for(args, self._chat_prompt, self.model.tokenize, policy)
        check_prompt(tokens, self.max_prompt_tokens, self.n_ctx, policy)
        if not self.engine.free:
            raise ModelManagerError(f"all {self.parallel} sequences are busy")  # the manager sends at most parallel
        reuse = args.cache
        conversation_id = args.conversation_id if reuse else None
        request = _Request(rid, args, StopText(stops), context)
        sampling = Sampling(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repeat_penalty=args.repeat_penalty,
            seed=args.seed,
        )
        grammar = compile_grammar(self.model.vocab, args)
        job = Job(
            rid=rid,
            prompt=tokens,
            max_new=min(args.max_tokens, self.n_ctx - len(tokens)),
            sampler=make_sampler(self.model, sampling, grammar),
            on_token=lambda token: self._on_token(request, token),
            # only a repeat penalty looks back at the prompt (one ctypes call a token: 1-2 ms for a long history)
            prompt_into_sampler=grammar is None and sampling.repeat_penalty != 1.0,
            voice=voice,
        )
        request.job = job
        sequence = self.conversations.sequence_for(job, conversation_id, reuse)
        self.engine.start_on(sequence, job, conversation_id, reuse)
        self.requests[rid] = request

    def _chat_prompt(self, args: ChatRun) -> tuple[list[int], list[str], int]:
        assert self.model is not None and self.spec is not None
        return chat_prompt(self.formatter, self.model.tokenize, self.n_ctx, self.spec.context_overflow, args)

    def cancel(self, rid: str, reason: str) -> tuple[str, Completion] | None:
        """End ``rid`` now (its client went away or gave up); its partial result, or None if it is not here."""
        assert self.engine is not None
        request = self.requests.get(rid)
        if request is None or request.job is None:
            return None
        self.engine.cancel(rid, reason)
        result = self._result(request)
        result.stopped = reason
        return rid, result

    def step(self) -> list[tuple[str, Completion | Exception]]:
        """One decode for every running request; the (rid, result or error) of those that ended in it."""
        assert self.engine is not None
        outcomes: list[tuple[str, Completion | Exception]] = []
        for job in self.engine.step():
            request = self.requests.get(job.rid)
            if request is None:
                continue
            if job.finish_reason == "pool_full":
                self.requests.pop(job.rid, None)
                policy = self.spec.context_overflow if self.spec else "error"
                message = "the model's KV memory is full: every sequence holds long contexts"
                outcomes.append(
                    (job.rid, ContextOverflow(message, n_ctx=self.n_ctx, parallel=self.parallel, policy=policy))
                )
                continue
            outcomes.append((job.rid, self._result(request)))
        return outcomes

    def take_chunks(self, now: float) -> list[Chunk]:
        """The streamed text to send now: ended requests' last text, a stream's first text, and every stream's text
        once ``STREAM_INTERVAL_S`` have passed since the last time (all streams on one clock: one message then)."""
        chunks, self.last_chunks = self.last_chunks, []
        due = now - self.flushed_at >= STREAM_INTERVAL_S
        for request in self.requests.values():
            if request.outbox and (due or request.sent_at is None):
                chunks.append((request.rid, self._chunk(request, now)))
        if due:
            self.flushed_at = now
        return chunks

    @staticmethod
    def _chunk(request: _Request, now: float) -> TextChunk:
        chunk = TextChunk(text="".join(request.outbox), tokens=request.out_tokens)
        request.outbox.clear()
        request.out_tokens, request.sent_at = 0, now
        return chunk

    def _on_token(self, request: _Request, token: int) -> bool:
        """The token's text into the request's outbox, held back while it may be the start of a stop string."""
        assert self.detokenizer is not None
        request.undecoded += self.detokenizer.piece(token)
        request.out_tokens += 1
        piece = decode_complete_utf8(request.undecoded)
        if piece:
            released, stopped = request.text.feed(piece)
            if released and request.args.stream:
                request.outbox.append(released)
            if stopped:
                request.stopped_by_string = True
                return False
        return True

    def _result(self, request: _Request) -> Completion:
        job = request.job
        assert job is not None
        self.requests.pop(request.rid, None)
        if not request.stopped_by_string and (tail := request.text.flush()) and request.args.stream:
            request.outbox.append(tail)
        if request.outbox:
            self.last_chunks.append((request.rid, self._chunk(request, time.monotonic())))
        ended = job.ended_at or time.perf_counter()
        first = job.first_token_at or ended
        decode_s = ended - first
        completion = len(job.generated)
        finish = job.finish_reason if job.finish_reason in ("stop", "length") else "cancelled"
        result = Completion(
            text=request.text.released,
            finish_reason=finish,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=len(job.prompt), completion_tokens=completion, cached_tokens=job.cached),
            timings=Timings(
                ttft_ms=round((first - job.started) * 1000, 2),
                total_ms=round((ended - job.started) * 1000, 2),
                tokens_per_s=round((completion - 1) / decode_s, 2) if completion > 1 and decode_s else 0.0,
            ),
            context=request.context,
        )
        return tools.finish(request.args, result)

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
        """Nothing running: settle exact conversations (see ``engine``), let old saved states expire."""
        if self.conversations is None:
            return
        if idle:
            self.conversations.settle_idle()
        if self.conversations.store is not None:
            self.conversations.store.expire()

    def kv_stats(self) -> dict[str, int] | None:
        return self.conversations.stats() if self.conversations else None

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
        if self.conversations is not None:
            self.conversations.save_all()
