"""What the engine knows between steps: the context's sequences, and the request (job) each one serves.

Plain data, so that the step planner is a pure function of it and its tests can build any state by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None


@dataclass(eq=False)
class Job:
    """One request on a sequence: its prompt still to evaluate, its sampler, and what it has produced."""

    rid: str
    prompt: list[int]
    max_new: int
    sampler: Any  # llama.cpp's chain (or a test's stand-in): accept(token), close(); the executor samples with it
    on_token: Callable[[int], bool]  # called with each sampled token; False ends the request
    evaluated: int = 0  # prompt tokens already in the cells
    cached: int = 0  # of which reused from an earlier request
    generated: list[int] = field(default_factory=list)
    pending_token: int | None = None  # sampled, not yet decoded
    voice: bool = False  # a person is listening (latency class voice): its prompt goes ahead of the others'
    prompt_into_sampler: bool = True  # the repeat penalty sees the prompt; not with a grammar, which is for the reply
    finish_reason: str | None = None  # set: the job ends; the planner gives it no more tokens
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.evaluated < len(self.prompt)


@dataclass(eq=False)
class Sequence:
    """One of the context's sequences: the tokens its cells hold, and the request it serves, if any."""

    seq_id: int
    cells: list[int] = field(default_factory=list)  # the tokens whose KV the context holds for this sequence
    owner: str | None = None  # the conversation whose state this is
    last_used: float = 0.0
    job: Job | None = None
    batched: int = 0  # exact mode: how many leading cells were evaluated in batches (not one token a step)
