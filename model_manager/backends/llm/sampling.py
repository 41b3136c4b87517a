"""llama.cpp's sampler chain (top-k, top-p, min-p, temperature, a seeded draw) on the few tokens that can win.

``llama_sampler_sample`` starts by copying the whole vocabulary into a candidate array (id, logit, probability)
and sorting it down to top-k. Every token that top-k can keep is near the row's largest logit when enough tokens
are near it, so the chain can get only those (found in numpy: the row's maximum, then the tokens within ``NEAR``
of it), or, for a flat row with fewer than ``top_k`` near, the ``top_k`` largest (a partial sort). The chain
itself, its random generator and its draws stay llama.cpp's: the same tokens, seed for seed, as the chain over the
whole vocabulary (tests/test_backend_sampling.py checks it draw for draw).

Where it pays (measured in the engine, 2 cores, temperature 0.7, a token's sampling): Gemma 3's 262,144 tokens
0.59 ms instead of 0.89-0.95 with four streams (alike with one); SmolLM2's 49,152 tokens 0.40 ms instead of 0.21
with one stream (alike with four). Right after a decode has streamed the weights through the caches, each numpy
call costs several times what it costs warm, and the handful here cost more than llama.cpp's one pass over a small
vocabulary: so only vocabularies of ``LARGE_VOCABULARY`` tokens or more take this path. Greedy is an argmax over
the row for every vocabulary (the first largest, as llama.cpp's greedy sampler; one numpy call). Penalties and
grammars stay with ``llama_sampler_sample``: they look at every token.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from model_manager.backends.llama_cpp_api import LlamaSampler

LARGE_VOCABULARY = 131_072  # from this size on, the chain gets the near tokens only
NEAR = 10.0  # logits below the maximum: top-k's candidates when at least top_k tokens are this near
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class RowSampler:
    """Greedy, or llama.cpp's ``chain`` (top-k first) applied to a row's candidates."""

    def __init__(self, chain: LlamaSampler | None, top_k: int) -> None:
        self.chain = chain  # None: greedy
        self.top_k = top_k

    @staticmethod
    def serves(temperature: float, top_k: int, repeat_penalty: float, grammar: object, n_vocab: int) -> bool:
        """Whether this does what the whole chain would, faster: no penalty or grammar; greedy, or top-k first and
        on over a large vocabulary."""
        if repeat_penalty != 1.0 or grammar is not None:
            return False
        return temperature == 0.0 or (top_k > 0 and n_vocab >= LARGE_VOCABULARY)

    def accept(self, token: int) -> None:
        """Nothing to remember: no sampler of this chain looks back."""

    def close(self) -> None:
        if self.chain is not None:
            self.chain.close()

    def pick(self, row: np.ndarray) -> int:
        """The token for one row of float32 logits (a view into llama.cpp's output buffer: read, never kept)."""
        if self.chain is None:
            return int(row.argmax())
        k = min(self.top_k, len(row))
        ids = np.flatnonzero(row >= row.max() - NEAR)
        if len(ids) < k:  # a flat row: the k largest are not all near the top
            ids = np.argpartition(row, len(row) - k)[len(row) - k :]
        candidates = np.empty(len(ids), TOKEN_DATA)
        candidates["id"], candidates["logit"], candidates["p"] = ids, row[ids], 0.0
        array = llama_cpp.llama_token_data_array(
            data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(ids), selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(self.chain.sampler, ctypes.byref(array))
        return int(candidates["id"][array.selected])
