"""Which tokens the next ``llama_decode`` carries: a pure function of the sequences, no llama.cpp in sight.

Every generating sequence first, one token each (its last sampled token), so that a stream never waits for a
prompt; then chunks of waiting prompts, oldest request first, under the step's token budget (chunked prefill: a
long prompt never freezes the streams already running). A prompt asks for logits on its last token only. A job
whose ``finish_reason`` is set (ended, cancelled) gets nothing. This is the shape of llama.cpp's own server and of
vLLM's scheduler; keeping it apart from execution is what lets tests check every rule against hand-made states.
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


def plan_step(sequences: list[Sequence], budget: int) -> Plan:
    """The next step for ``sequences`` within ``budget`` tokens."""
    plan = Plan()
    tokens, positions, seq_ids, logits, rows = plan.tokens, plan.positions, plan.seq_ids, plan.logits, plan.rows
    prompts = []
    for sequence in sequences:
        job = sequence.job
        if job is None or job.finish_reason is not None:
            continue
        if job.prefilling:
            prompts.append(sequence)
        elif job.pending_token is not None and len(tokens) < budget:
            rows.append(Row(sequence, len(tokens), 1, len(tokens), False))
            tokens.append(job.pending_token)
            positions.append(len(sequence.cells))
            seq_ids.append(sequence.seq_id)
            logits.append(True)
    prompts.sort(key=lambda s: s.job.started if s.job else 0.0)
    for sequence in prompts:
        room = budget - len(tokens)
        if room <= 0:
            break
        job = sequence.job
        assert job is not None
        take = min(room, len(job.prompt) - job.evaluated)
        last = job.evaluated + take == len(job.prompt)
        first = len(tokens)
        base = len(sequence.cells)  # == job.evaluated while the prompt goes in
        tokens.extend(job.prompt[job.evaluated : job.evaluated + take])
        positions.extend(range(base, base + take))
        seq_ids.extend([sequence.seq_id] * take)
        logits.extend([False] * take)
        if last:
            logits[-1] = True
        rows.append(Row(sequence, first, take, first + take - 1 if last else -1, True))
    return plan
