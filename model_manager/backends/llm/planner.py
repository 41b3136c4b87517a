"""Which tokens the next ``llama_decode`` carries: a pure function of the sequences, no llama.cpp in sight.

A step carries either one token of every generating sequence (its last sampled token) or chunks of waiting
prompts, voice requests first, then the oldest first, under the step's token budget; never both. Each sequence
has its own KV stream, and llama.cpp splits a batch over separate streams into micro-batches of equal tokens per
sequence: a prompt beside decode tokens became two passes over the weights in one step (measured on Gemma 3 270M
with three streams: a 12-token prompt's first token after 68 ms mixed, 37 ms alone). So waiting prompts go first
(their first token is what a person waits for), and after a prompt step the streams get the next one: a long
prompt's chunks alternate with decode steps, and no stream stalls for more than one chunk (chunked prefill). A
prompt asks for logits on its last token only. A job whose ``finish_reason`` is set (ended, cancelled) gets
nothing. Keeping this apart from execution is what lets tests check every rule against hand-made states (as
vLLM's scheduler tests do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model_manager.backends.llm.state import Sequence


@dataclass(slots=True)
class Row:
    """One sequence's share of a step: ``count`` tokens from ``first`` in the step; sampled at ``sample_at`` (the
    step's index of its token with logits) or not at all (-1: a prompt chunk that is not the prompt's last)."""

    sequence: Sequence
    first: int
    count: int
    sample_at: int
    prefill: bool


@dataclass(slots=True)
class Plan:
    """The batch, column by column as ``llama_batch`` holds it, and who each token belongs to."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)
    logits: list[bool] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def plan_step(sequences: list[Sequence], budget: int, after_prompts: bool = False) -> Plan:
    """The next step for ``sequences`` within ``budget`` tokens; ``after_prompts``: the last step carried prompts."""
    generating, prompts = [], []
    for sequence in sequences:
        job = sequence.job
        if job is None or job.finish_reason is not None:
            continue
        if job.prefilling:
            prompts.append(sequence)
        elif job.pending_token is not None:
            generating.append(sequence)
    if prompts and not (after_prompts and generating):
        return _prompt_step(prompts, budget)
    return _decode_step(generating, budget)


def _decode_step(generating: list[Sequence], budget: int) -> Plan:
    plan = Plan()
    for sequence in generating[:budget]:
        job = sequence.job
        assert job is not None and job.pending_token is not None
        plan.rows.append(Row(sequence, len(plan.tokens), 1, len(plan.tokens), False))
        plan.tokens.append(job.pending_token)
        plan.positions.append(len(sequence.cells))
        plan.seq_ids.append(sequence.seq_id)
        plan.logits.append(True)
    return plan


def _turn_order(sequence: Sequence) -> tuple[bool, float]:
    job = sequence.job
    assert job is not None
    return not job.voice, job.started


def _prompt_step(prompts: list[Sequence], budget: int) -> Plan:
    plan = Plan()
    prompts.sort(key=_turn_order)
    for sequence in prompts:
        room = budget - len(plan.tokens)
        if room <= 0:
            break
        job = sequence.job
        assert job is not None
        take = min(room, len(job.prompt) - job.evaluated)
        last = job.evaluated + take == len(job.prompt)
        first = len(plan.tokens)
        base = len(sequence.cells)  # == job.evaluated while the prompt goes in
        plan.tokens.extend(job.prompt[job.evaluated : job.evaluated + take])
        plan.positions.extend(range(base, base + take))
        plan.seq_ids.extend([sequence.seq_id] * take)
        plan.logits.extend([False] * take)
        if last:
            plan.logits[-1] = True
        plan.rows.append(Row(sequence, first, take, first + take - 1 if last else -1, True))
    return plan
