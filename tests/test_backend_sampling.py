"""The engine's numpy sampler picks what llama.cpp's sampler chain picks: the same filters (top-k, top-p, min-p,
temperature) and the same seeded draw, checked draw for draw on the same logits, peaked rows and flat ones."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

from model_manager.backends.llm.executor import make_sampler
from model_manager.backends.llm.sampling import RowSampler
from model_manager.backends.llm.state import Sampling

VOCAB = 49_152  # SmolLM2's


class _Vocab:
    """What make_sampler asks of a model: the vocabulary's size."""

    size = VOCAB

    def n_vocab(self) -> int:
        return self.size


def chain_pick(chain: object, row: np.ndarray) -> int:
    """llama.cpp's chain applied to ``row`` as llama_sampler_sample applies it to a context's logits."""
    data = (llama_cpp.llama_token_data * len(row))()
    view = np.ctypeslib.as_array(data)
    view["id"], view["logit"], view["p"] = np.arange(len(row)), row, 0.0
    candidates = llama_cpp.llama_token_data_array(data=data, size=len(row), selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(candidates))  # type: ignore[attr-defined]
    token = int(data[candidates.selected].id)
    llama_cpp.llama_sampler_accept(chain.sampler, token)  # type: ignore[attr-defined]
    return token


SETTINGS = [
    Sampling(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, seed=1),  # the defaults
    Sampling(temperature=1.0, top_k=40, top_p=0.95, min_p=0.05, seed=2),
    Sampling(temperature=0.3, top_k=5, top_p=0.5, min_p=0.0, seed=3),
    Sampling(temperature=1.5, top_k=200, top_p=1.0, min_p=0.2, seed=4),
    Sampling(temperature=0.8, top_k=1000, top_p=0.99, min_p=0.0, seed=5),
]


@pytest.mark.parametrize("sampling", SETTINGS, ids=lambda s: f"t{s.temperature}-k{s.top_k}-p{s.top_p}-m{s.min_p}")
@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0], ids=["flat", "spread", "peaked"])
def test_the_numpy_sampler_draws_what_llama_cpp_draws(sampling: Sampling, scale: float) -> None:
    rows = np.random.default_rng(int(scale * 10) + sampling.seed).normal(0, scale, (300, VOCAB)).astype(np.float32)
    chain = make_sampler(_Vocab(), sampling, rows=False)  # type: ignore[arg-type]
    ours = make_sampler(_Vocab(), sampling, rows=True)  # type: ignore[arg-type]
    assert isinstance(ours, RowSampler)
    theirs = [chain_pick(chain, row) for row in rows]
    mine = [ours.pick(row) for row in rows]
    chain.close()
    ours.close()
    assert mine == theirs
    assert len(set(mine)) > 1  # the draws vary: a sampler stuck on one token would pass the comparison too


def test_greedy_is_the_first_largest_logit() -> None:
    row = np.zeros(VOCAB, np.float32)
    row[[7, 9000]] = 3.0
    assert make_sampler(_Vocab(), Sampling(temperature=0.0)).pick(row) == 7  # type: ignore[arg-type,union-attr]


def test_make_sampler_takes_the_row_path_where_it_measured_faster() -> None:
    small, large = _Vocab(), _Vocab()
    large.size = 262_144  # Gemma 3's
    assert isinstance(make_sampler(large, Sampling()), RowSampler)  # type: ignore[arg-type]
    assert isinstance(make_sampler(small, Sampling(temperature=0.0)), RowSampler)  # type: ignore[arg-type]
    for model, sampling in [
        (small, Sampling()),  # a small vocabulary: llama.cpp's one pass is quicker
        (large, Sampling(repeat_penalty=1.1)),  # penalties look at the history
        (large, Sampling(top_k=0)),  # top-p over the whole vocabulary
    ]:
        chain = make_sampler(model, sampling)  # type: ignore[arg-type]
        assert not isinstance(chain, RowSampler)
        chain.close()
