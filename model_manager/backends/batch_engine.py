"""Continuous batching for a GGUF model: many requests decode together, one ``llama_decode`` a step.

llama.cpp keeps several sequences in one context (``n_seq_max``), each with its own KV stream. Each step puts one token
for every generating sequence into one batch, plus chunks of waiting prompts under a per-step token budget (chunked
prefill: a long prompt never freezes the streams already running), then samples every sequence that produced
logits with its own sampler chain. This is the shape of llama.cpp's own server (its "slots") and of Ollama's runner;
the code is ours, on llama-cpp-python's low-level API, because ``Llama`` holds a single sequence.

A sequence keeps its cells after its request ends: the next request that starts with the same tokens (the next
turn of a conversation, the same system prompt) evaluates only what differs. An idle sequence is taken over by the
request whose prompt shares the longest prefix with it, else by the one idle longest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaContext, LlamaModel, LlamaSampler

PENALTY_LAST_N = 64  # as llama-cpp-python's Llama: the tokens a repeat penalty looks back on


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None


@dataclass
class Sequence:
    """One of the context's sequences: the tokens its cells hold, and the request it serves, if any."""

    seq_id: int
    cells: list[int] = field(default_factory=list)  # the tokens whose KV the pool holds for this sequence
    owner: str | None = None  # the conversation whose state this is
    last_used: float = 0.0
    job: Job | None = None


@dataclass
class Job:
    """One request on a sequence: its prompt still to evaluate, its sampler, and what it has produced."""

    rid: str
    prompt: list[int]
    max_new: int
    sampler: LlamaSampler
    on_token: Callable[[int], bool]  # called with each sampled token; False ends the request
    evaluated: int = 0  # prompt tokens already in the cells
    cached: int = 0  # of which reused from an earlier request
    generated: list[int] = field(default_factory=list)
    pending_token: int | None = None  # sampled, not yet decoded
    prompt_into_sampler: bool = True  # the repeat penalty sees the prompt; not with a grammar, which is for the reply
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.evaluated < len(self.prompt)


class PoolExhausted(RuntimeError):
    """No room left in the KV pool for this sequence's next tokens."""


class BatchEngine:
    def __init__(self, model: LlamaModel, ctx: LlamaContext, parallel: int, step_tokens: int) -> None:
        self.model = model
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx.ctx)
        self.sequences = [Sequence(seq_id=i) for i in range(parallel)]
        self.step_tokens = step_tokens
        self.batch = llama_cpp.llama_batch_init(step_tokens, 0, 1)
        self.n_vocab = model.n_vocab()
        self.steps = 0
        self.sequence_steps = 0  # sequences decoded, summed over steps
        self.generated = 0
        self.prefix_copies = 0

    def close(self) -> None:
        for sequence in self.sequences:
            if sequence.job is not None:
                sequence.job.sampler.close()
        llama_cpp.llama_batch_free(self.batch)

    # ----- taking a sequence ----------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return sum(1 for s in self.sequences if s.job is None)

    @property
    def busy(self) -> bool:
        return any(s.job is not None for s in self.sequences)

    def choose(self, prompt: list[int], owner: str | None, reuse: bool = True) -> Sequence:
        """The idle sequence for a request: the conversation's own; else a free one (no conversation on it), the
        one sharing the longest prefix of ``prompt`` first; else the one whose conversation is idle longest (the
        caller saves that conversation first). A prefix another sequence holds can then be copied in."""
        idle = [s for s in self.sequences if s.job is None]
        assert idle, "no free sequence"
        mine = [s for s in idle if owner is not None and s.owner == owner]
        if mine:
            return mine[0]
        free = [s for s in idle if s.owner is None]
        if free:
            shared = (lambda s: common_prefix(s.cells, prompt)) if reuse else (lambda s: 0)
            return max(free, key=lambda s: (shared(s), -s.last_used))
        return min(idle, key=lambda s: s.last_used)

    def donor(self, prompt: list[int], exclude: Sequence) -> tuple[Sequence | None, int]:
        """The other sequence, busy or not, holding the longest prefix of ``prompt``, and its length."""
        best, length = None, 0
        for sequence in self.sequences:
            if sequence is not exclude:
                shared = common_prefix(sequence.cells, prompt)
                if shared > length:
                    best, length = sequence, shared
        return best, length

    def copy_prefix(self, source: Sequence, target: Sequence, length: int) -> None:
        """Give ``target`` the first ``length`` cells of ``source``, copied, not evaluated again. Between KV
        streams llama.cpp copies a whole sequence; the cells past ``length`` are dropped at once."""
        llama_cpp.llama_memory_seq_rm(self.memory, target.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.memory, source.seq_id, target.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_rm(self.memory, target.seq_id, length, -1)
        target.cells = list(source.cells[:length])
        self.prefix_copies += 1

    def start_on(self, sequence: Sequence, job: Job, owner: str | None, reuse: bool = True) -> None:
        """Run ``job`` on ``sequence``, keeping the cells it shares with the prompt (the rest are dropped)."""
        assert sequence.job is None
        keep = common_prefix(sequence.cells, job.prompt) if reuse else 0
        keep = min(keep, len(job.prompt) - 1)  # the last prompt token is evaluated again for its logits
        self._truncate(sequence, keep)
        job.evaluated = job.cached = keep
        if job.prompt_into_sampler:
            for token in job.prompt:
                job.sampler.accept(token)  # the repeat penalty sees the prompt, as in llama.cpp
        sequence.job, sequence.owner = job, owner

    def start(self, job: Job, owner: str | None, reuse: bool = True) -> Sequence:
        sequence = self.choose(job.prompt, owner, reuse)
        self.start_on(sequence, job, owner, reuse)
        return sequence

    def clear(self, sequence: Sequence) -> None:
        self._truncate(sequence, 0)

    def remove_cells(self, sequence: Sequence, start: int, end: int) -> None:
        """Drop the cells at positions [start, end) (-1: to the end); the books are the caller's to keep."""
        llama_cpp.llama_memory_seq_rm(self.memory, sequence.seq_id, start, end)

    def shift_cells(self, sequence: Sequence, start: int, end: int, delta: int) -> None:
        """Move the cells at positions [start, end) by ``delta`` positions."""
        llama_cpp.llama_memory_seq_add(self.memory, sequence.seq_id, start, end, delta)

    def logits(self, index: int) -> np.ndarray:
        """The last step's logits for its ``index``-th token (a view: copy it before the next step)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx.ctx, index), shape=(self.n_vocab,))

    def _truncate(self, sequence: Sequence, keep: int) -> None:
        if keep < len(sequence.cells):
            if not llama_cpp.llama_memory_seq_rm(self.memory, sequence.seq_id, keep, -1):
                llama_cpp.llama_memory_seq_rm(self.memory, sequence.seq_id, 0, -1)
                keep = 0
            del sequence.cells[keep:]

    def forget(self, owner: str) -> bool:
        """Drop the cells a conversation holds on an idle sequence."""
        found = False
        for sequence in self.sequences:
            if sequence.owner == owner and sequence.job is None:
                self._truncate(sequence, 0)
                sequence.owner = None
                found = True
        return found

    def cancel(self, rid: str, reason: str) -> Job | None:
        for sequence in self.sequences:
            if sequence.job is not None and sequence.job.rid == rid:
                return self._end(sequence, reason)
        return None

    # ----- one step -------------------------------------------------------------------------------------------

    def step(self) -> list[Job]:
        """One ``llama_decode`` for every running sequence; returns the jobs that ended in it."""
        entries: list[tuple[Sequence, int, int, bool]] = []  # sequence, token, position, wants logits
        budget = self.step_tokens
        running = [s for s in self.sequences if s.job is not None]
        for sequence in running:  # generating sequences first: one token each
            job = sequence.job
            assert job is not None
            if not job.prefilling and job.pending_token is not None and budget > 0:
                entries.append((sequence, job.pending_token, len(sequence.cells), True))
                budget -= 1
        for sequence in sorted(running, key=lambda s: s.job.started if s.job else 0):  # then prompts, oldest first
            job = sequence.job
            assert job is not None
            if not job.prefilling or budget <= 0:
                continue
            take = min(budget, len(job.prompt) - job.evaluated)
            base = len(sequence.cells)  # == job.evaluated while the prompt goes in
            for k in range(take):
                index = job.evaluated + k
                entries.append((sequence, job.prompt[index], base + k, index == len(job.prompt) - 1))
            budget -= take
        if not entries:
            return []
        batch = self.batch
        for i, (sequence, token, position, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = sequence.seq_id
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        status = llama_cpp.llama_decode(self.ctx.ctx, batch)
        self.steps += 1
        self.sequence_steps += len({e[0].seq_id for e in entries})
        if status != 0:
            return self._failed_step(entries, status)
        ended: list[Job] = []
        for i, (sequence, token, _position, logits) in enumerate(entries):
            job = sequence.job
            assert job is not None
            sequence.cells.append(token)
            if job.prefilling:
                job.evaluated += 1
            else:
                job.pending_token = None
            if logits and job.finish_reason is None:
                self._sample(sequence, job, i)
            if job.finish_reason is not None and sequence.job is job:
                ended.append(self._end(sequence, job.finish_reason))
        return ended

    def _sample(self, sequence: Sequence, job: Job, index: int) -> None:
        token = job.sampler.sample(self.ctx, index)  # samples and accepts
        now = time.perf_counter()
        job.first_token_at = job.first_token_at or now
        if llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
            job.finish_reason = "stop"
            return
        job.generated.append(token)
        self.generated += 1
        if not job.on_token(token):
            job.finish_reason = job.finish_reason or "stop"
        elif len(job.generated) >= job.max_new:
            job.finish_reason = "length"
        elif len(sequence.cells) + 1 >= self.ctx.n_ctx():
            job.finish_reason = "length"
        else:
            job.pending_token = token

    def _failed_step(self, entries: list[tuple[Sequence, int, int, bool]], status: int) -> list[Job]:
        """``llama_decode`` refused the batch (1: no room in the pool). The batch's sequences keep the cells they
        had; the youngest request is ended so the others can go on."""
        jobs = {id(e[0]): e[0] for e in entries}
        for sequence in jobs.values():  # whatever the failed step may have written is dropped
            llama_cpp.llama_memory_seq_rm(self.memory, sequence.seq_id, len(sequence.cells), -1)
        victim = max(jobs.values(), key=lambda s: s.job.started if s.job else 0)
        reason = "pool_full" if status == 1 else f"decode_error_{status}"
        return [self._end(victim, reason)]

    def _end(self, sequence: Sequence, reason: str) -> Job:
        job = sequence.job
        assert job is not None
        job.finish_reason = job.finish_reason or reason
        job.ended_at = time.perf_counter()
        if job.pending_token is not None:
            job.pending_token = None  # sampled but never decoded: not in the cells
        job.sampler.close()
        sequence.job = None
        sequence.last_used = time.monotonic()
        return job


def make_sampler(model: LlamaModel, sampling: Sampling, grammar: Any = None) -> LlamaSampler:
    """The sampler chain of llama-cpp-python's ``Llama``, so a request samples alike on either engine."""
    sampler = LlamaSampler()
    sampler.add_penalties(model.n_vocab(), PENALTY_LAST_N, sampling.repeat_penalty, 0.0, 0.0)
    if grammar is not None:
        sampler.add_grammar(model, grammar)
    if sampling.temperature == 0.0:
        sampler.add_greedy()
    else:
        sampler.add_top_k(sampling.top_k)
        sampler.add_typical(1.0, 1)
        sampler.add_top_p(sampling.top_p, 1)
        sampler.add_min_p(sampling.min_p, 1)
        sampler.add_temp(sampling.temperature)
        seed = sampling.seed if sampling.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        sampler.add_dist(seed)
    return sampler


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
