"""What the engine asks of llama.cpp: decode a planned step, sample a sequence, move a sequence's cells.

The engine sees only this small interface (``Executor``), so its tests can run it on a fake that records each
step. ``LlamaExecutor`` fills the batch through numpy views of buffers it owns: a step's columns are copied in a
few vectorised writes rather than five ctypes writes per token.
"""

from __future__ import annotations

import ctypes
from typing import Any, Protocol

import llama_cpp
import numpy as np

from model_manager.backends.llama_cpp_api import LlamaContext, LlamaModel, LlamaSampler
from model_manager.backends.llm.planner import Plan
from model_manager.backends.llm.sampling import RowSampler
from model_manager.backends.llm.state import Sampling

PENALTY_LAST_N = 64  # as llama-cpp-python's Llama: the tokens a repeat penalty looks back on


class Executor(Protocol):
    def decode(self, plan: Plan) -> int:
        """``llama_decode`` of the plan's batch: 0 on success, 1 when the KV memory has no room, else an error."""

    def sample(self, sampler: Any, index: int) -> int:
        """Sample (and accept) a token from the last step's logits of its ``index``-th token."""

    def is_eog(self, token: int) -> bool: ...

    def remove(self, seq_id: int, start: int, end: int) -> bool:
        """Drop a sequence's cells at positions [start, end) (-1: to the end)."""

    def copy(self, source: int, target: int) -> None:
        """``target`` gets all of ``source``'s cells (between KV streams llama.cpp copies whole sequences)."""

    def shift(self, seq_id: int, start: int, end: int, delta: int) -> None:
        """Move the cells at positions [start, end) by ``delta`` positions."""

    def save(self, seq_id: int) -> bytes | bytearray:
        """The sequence's cells as bytes (``llama_state_seq_get_data``)."""

    def restore(self, seq_id: int, state: bytes | bytearray) -> bool:
        """Put saved cells into an empty sequence; False if llama.cpp refused them."""


class LlamaExecutor:
    def __init__(self, model: LlamaModel, ctx: LlamaContext, size: int, parallel: int) -> None:
        self.model, self.ctx = model, ctx
        self.memory = llama_cpp.llama_get_memory(ctx.ctx)
        self.token = np.zeros(size, np.int32)
        self.pos = np.zeros(size, np.int32)
        self.n_seq_id = np.ones(size, np.int32)
        self.logits = np.zeros(size, np.int8)
        self.ids = np.arange(parallel, dtype=np.int32)  # seq_id[i] points at one of these: the token's sequence
        self.id_address = self.ids.ctypes.data + self.ids.itemsize * np.arange(parallel, dtype=np.uint64)
        self.seq_id = np.zeros(size + 1, np.uint64)  # pointers, NULL-terminated as llama_batch_init makes them
        self.batch = llama_cpp.llama_batch()
        self.batch.token = self.token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.batch.embd = None
        self.batch.pos = self.pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.batch.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.batch.seq_id = ctypes.cast(self.seq_id.ctypes.data, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        self.batch.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.vocab = model.vocab
        self.n_vocab = model.n_vocab()
        self.row_type = ctypes.c_float * self.n_vocab
        self._eog: dict[int, bool] = {}

    def decode(self, plan: Plan) -> int:
        n = len(plan)
        self.token[:n] = plan.tokens
        self.pos[:n] = plan.positions
        self.logits[:n] = plan.logits
        self.seq_id[:n] = self.id_address[plan.seq_ids]
        self.batch.n_tokens = n
        return llama_cpp.llama_decode(self.ctx.ctx, self.batch)

    def sample(self, sampler: LlamaSampler | RowSampler, index: int) -> int:
        if isinstance(sampler, RowSampler):
            return sampler.pick(self.logits_of(index))
        return sampler.sample(self.ctx, index)

    def is_eog(self, token: int) -> bool:
        known = self._eog.get(token)
        if known is None:
            known = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return known

    def remove(self, seq_id: int, start: int, end: int) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, start, end))

    def copy(self, source: int, target: int) -> None:
        llama_cpp.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    def shift(self, seq_id: int, start: int, end: int, delta: int) -> None:
        llama_cpp.llama_memory_seq_add(self.memory, seq_id, start, end, delta)

    def save(self, seq_id: int) -> bytearray:
        """Written by llama.cpp straight into the bytes kept: measured on SmolLM2 with 1,183 cells (27 MB), 3.5 ms,
        where a ctypes array copied out into ``bytes`` took 158 ms (each copy touches fresh pages)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx.ctx, seq_id)
        state = bytearray(size)
        written = llama_cpp.llama_state_seq_get_data(
            self.ctx.ctx, (ctypes.c_uint8 * size).from_buffer(state), size, seq_id
        )
        del state[written:]
        return state

    def restore(self, seq_id: int, state: bytes | bytearray) -> bool:
        """Read in place, not copied first."""
        if isinstance(state, bytearray):
            pointer = ctypes.cast((ctypes.c_uint8 * len(state)).from_buffer(state), ctypes.POINTER(ctypes.c_uint8))
        else:
            pointer = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
        return bool(llama_cpp.llama_state_seq_set_data(self.ctx.ctx, pointer, len(state), seq_id))

    def logits_of(self, index: int) -> np.ndarray:
        """The last step's logits for its ``index``-th token (a view: copy it before the next step). Made from the
        row's address with one ctypes type made once: ``np.ctypeslib.as_array`` makes a new type a call."""
        address = ctypes.cast(llama_cpp.llama_get_logits_ith(self.ctx.ctx, index), ctypes.c_void_p).value
        return np.frombuffer(self.row_type.from_address(address), np.float32)  # type: ignore[arg-type]


def make_sampler(
    model: LlamaModel, sampling: Sampling, grammar: Any = None, rows: bool | None = None
) -> LlamaSampler | RowSampler:
    """The sampler chain of llama-cpp-python's ``Llama`` (its defaults are what users of it know), applied by
    ``RowSampler`` to the tokens that can win where that measured faster (sampling.py: the same tokens); else by
    llama.cpp to the whole vocabulary (a small vocabulary, a repeat penalty or a grammar, top-k off). ``rows``: that
    path or the other whatever the rule says (tests compare them)."""
    served = rows
    if served is None:
        served = RowSampler.serves(
            sampling.temperature, sampling.top_k, sampling.repeat_penalty, grammar, model.n_vocab()
        )
    if served and sampling.temperature == 0.0:
        return RowSampler(None, 0)
    sampler = LlamaSampler()
    if sampling.repeat_penalty != 1.0:  # 1.0 changes nothing, but would still see every prompt token
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
    return RowSampler(sampler, sampling.top_k) if served else sampler
