"""The step planner and the engine's step loop, on hand-made states and a fake executor (no model): every rule of
what a step carries, checked on many random states, and shown to catch planted mistakes."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from model_manager.backends.llm.engine import BatchEngine
from model_manager.backends.llm.planner import Plan, Row, plan_step
from model_manager.backends.llm.state import Job, Sequence

EOG = 0


class Script:
    """A sampler stand-in: returns its tokens in turn."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = list(tokens)
        self.closed = False

    def next(self) -> int:
        return self.tokens.pop(0) if self.tokens else 7

    def accept(self, token: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeExecutor:
    """Records each step's batch; answers decodes with ``statuses`` (0 once they run out)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.steps: list[Plan] = []
        self.statuses = list(statuses or [])

    def decode(self, plan: Plan) -> int:
        self.steps.append(Plan(list(plan.tokens), list(plan.positions), list(plan.seq_ids), list(plan.logits)))
        return self.statuses.pop(0) if self.statuses else 0

    def sample(self, sampler: Script, index: int) -> int:
        return sampler.next()

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def remove(self, seq_id: int, start: int, end: int) -> bool:
        return True

    def copy(self, source: int, target: int) -> None:
        pass

    def shift(self, seq_id: int, start: int, end: int, delta: int) -> None:
        pass

    def save(self, seq_id: int) -> bytes:
        return b"state"

    def restore(self, seq_id: int, state: bytes) -> bool:
        return True


def job(rid: str, prompt: list[int], max_new: int = 100, tokens: list[int] | None = None, started: float = 0.0) -> Job:
    return Job(rid, prompt, max_new, Script(tokens or []), lambda _t: True, started=started)


# ----- the rules, as a checker ----------------------------------------------------------------------------------


def violations(sequences: list[Sequence], plan: Plan, budget: int, after_prompts: bool = False) -> list[str]:
    """Every rule a plan breaks for ``sequences`` under ``budget``; empty when it keeps them all."""
    found = []
    n = len(plan.tokens)
    if not (len(plan.positions) == len(plan.seq_ids) == len(plan.logits) == n):
        found.append("columns of different lengths")
    if n > budget:
        found.append(f"{n} tokens over the budget of {budget}")
    covered = sorted((row.first, row.first + row.count) for row in plan.rows)
    if [i for start, end in covered for i in range(start, end)] != list(range(n)):
        found.append("the rows do not cover the batch exactly once")
    if len({row.prefill for row in plan.rows}) > 1:
        found.append("prompt chunks and decode tokens in one step")
    by_id = {s.seq_id: s for s in sequences}
    got = {}
    for row in plan.rows:
        sequence, current = row.sequence, row.sequence.job
        got[sequence.seq_id] = row.count
        span = range(row.first, row.first + row.count)
        if current is None or current.finish_reason is not None:
            found.append(f"sequence {sequence.seq_id} is decoded without a running job")
            continue
        if any(plan.seq_ids[i] != sequence.seq_id for i in span) or by_id.get(sequence.seq_id) is not sequence:
            found.append(f"row of sequence {sequence.seq_id} carries another sequence's tokens")
        if [plan.positions[i] for i in span] != list(range(len(sequence.cells), len(sequence.cells) + row.count)):
            found.append(f"sequence {sequence.seq_id}: positions do not continue its cells")
        if current.prefilling:
            expected = current.prompt[current.evaluated : current.evaluated + row.count]
            last = current.evaluated + row.count == len(current.prompt)
            wanted = [False] * (row.count - 1) + [last]
        else:
            expected, wanted = [current.pending_token], [True]
            if row.count != 1:
                found.append(f"sequence {sequence.seq_id} decodes {row.count} tokens in one step")
        if [plan.tokens[i] for i in span] != expected:
            found.append(f"sequence {sequence.seq_id}: the wrong tokens")
        if [plan.logits[i] for i in span] != wanted[: row.count]:
            found.append(f"sequence {sequence.seq_id}: logits asked for the wrong tokens")
    running = [s for s in sequences if s.job is not None and s.job.finish_reason is None]
    generating = [s for s in running if not s.job.prefilling and s.job.pending_token is not None]  # type: ignore[union-attr]
    prompts = sorted((s for s in running if s.job.prefilling), key=lambda s: (not s.job.voice, s.job.started))  # type: ignore[union-attr]
    prompt_turn = bool(prompts) and not (after_prompts and generating)
    if prompt_turn:
        left = sum(len(s.job.prompt) - s.job.evaluated for s in prompts)  # type: ignore[union-attr]
        if any(s.seq_id in got for s in generating) or n < min(budget, left):
            found.append("waiting prompts did not get their turn, filled to the budget")
    elif any(s.seq_id not in got for s in generating[:budget]):
        found.append("a generating sequence waits on its turn")
    for older, younger in zip(prompts, prompts[1:], strict=False):
        if younger.seq_id in got and got.get(older.seq_id, 0) < len(older.job.prompt) - older.job.evaluated:  # type: ignore[union-attr]
            found.append("a younger prompt, or a chat one, went ahead of an older one, or a voice one")
    return found


def random_state(rng: random.Random) -> tuple[list[Sequence], int]:
    sequences = []
    for seq_id in range(rng.randint(1, 12)):
        sequence = Sequence(seq_id)
        kind = rng.choice(["idle", "prefill", "generate", "ended"])
        if kind != "idle":
            prompt = [rng.randint(1, 99) for _ in range(rng.randint(1, 80))]
            current = job(f"r{seq_id}", prompt, started=rng.random())
            current.voice = rng.random() < 0.3
            current.evaluated = rng.randint(0, len(prompt) - 1) if kind == "prefill" else len(prompt)
            sequence.cells = prompt[: current.evaluated] + [
                rng.randint(1, 99) for _ in range(rng.randint(0, 5) * (kind != "prefill"))
            ]
            if kind in ("generate", "ended"):
                current.pending_token = rng.randint(1, 99)
            if kind == "ended":
                current.finish_reason = rng.choice(["cancelled", "stop", "deadline"])
            sequence.job = current
        sequences.append(sequence)
    return sequences, rng.randint(1, 64)


def test_every_plan_keeps_every_rule_on_random_states() -> None:
    rng = random.Random(7)
    for _ in range(500):
        sequences, budget = random_state(rng)
        after_prompts = rng.random() < 0.5
        plan = plan_step(sequences, budget, after_prompts)
        assert violations(sequences, plan, budget, after_prompts) == []


def over_budget(sequences: list[Sequence], budget: int) -> Plan:
    """A planted mistake: a waiting prompt goes in whole, whatever the budget."""
    plan = plan_step(sequences, budget)
    for sequence in sequences:
        current = sequence.job
        if current is not None and current.prefilling and current.finish_reason is None:
            first, rest = len(plan.tokens), current.prompt[current.evaluated :]
            plan.rows = [r for r in plan.rows if r.sequence is not sequence]
            plan.tokens += rest
            plan.positions += list(range(len(sequence.cells), len(sequence.cells) + len(rest)))
            plan.seq_ids += [sequence.seq_id] * len(rest)
            plan.logits += [False] * (len(rest) - 1) + [True]
            plan.rows.append(Row(sequence, first, len(rest), first + len(rest) - 1, True))
            break
    return plan


def decodes_cancelled(sequences: list[Sequence], budget: int) -> Plan:
    """A planted mistake: a cancelled sequence still gets its pending token."""
    plan = plan_step(sequences, budget)
    for sequence in sequences:
        if sequence.job is not None and sequence.job.finish_reason == "cancelled":
            plan.rows.append(Row(sequence, len(plan.tokens), 1, len(plan.tokens), False))
            plan.tokens.append(sequence.job.pending_token or 1)
            plan.positions.append(len(sequence.cells))
            plan.seq_ids.append(sequence.seq_id)
            plan.logits.append(True)
    return plan


def voice_waits(sequences: list[Sequence], budget: int) -> Plan:
    """A planted mistake: prompts in arrival order, a voice request's behind a chat one's."""
    chat, voice = sorted((s for s in sequences if s.job and s.job.prefilling), key=lambda s: s.job.started)  # type: ignore[union-attr]
    plan = Plan()
    for sequence in (chat, voice):
        job_ = sequence.job
        assert job_ is not None
        take = min(budget - len(plan.tokens), len(job_.prompt) - job_.evaluated)
        if take <= 0:
            break
        first = len(plan.tokens)
        plan.tokens.extend(job_.prompt[job_.evaluated : job_.evaluated + take])
        plan.positions.extend(range(len(sequence.cells), len(sequence.cells) + take))
        plan.seq_ids.extend([sequence.seq_id] * take)
        last = job_.evaluated + take == len(job_.prompt)
        plan.logits.extend([False] * (take - 1) + [last])
        plan.rows.append(Row(sequence, first, take, first + take - 1 if last else -1, True))
    return plan


@pytest.mark.parametrize("planted", [over_budget, decodes_cancelled, voice_waits])
def test_the_rules_catch_a_planted_mistake(planted: Callable[[list[Sequence], int], Plan]) -> None:
    running = Sequence(0, cells=[1, 2, 3], job=job("a", [1, 2, 3], started=0.0))
    running.job.evaluated, running.job.pending_token = 3, 9  # type: ignore[union-attr]
    waiting = Sequence(1, job=job("b", list(range(1, 41)), started=1.0))
    cancelled = Sequence(2, cells=[5, 6], job=job("c", [5, 6], started=0.5))
    cancelled.job.evaluated, cancelled.job.pending_token, cancelled.job.finish_reason = 2, 8, "cancelled"  # type: ignore[union-attr]
    spoken = Sequence(3, job=job("d", list(range(1, 9)), started=2.0))
    spoken.job.voice = True  # type: ignore[union-attr]
    sequences, budget = [running, waiting, cancelled, spoken], 16
    for after_prompts in (False, True):  # a prompt step, then a decode step
        assert violations(sequences, plan_step(sequences, budget, after_prompts), budget, after_prompts) == []
    assert violations(sequences, planted(sequences, budget), budget) != []


# ----- the engine's step loop on a fake executor ----------------------------------------------------------------


def engine_with(executor: FakeExecutor, parallel: int = 4, budget: int = 16, exact: bool = False) -> BatchEngine:
    return BatchEngine(executor, parallel, budget, seq_ctx=1000, exact=exact)


def test_a_long_prompt_goes_in_chunks_taking_turns_with_a_stream() -> None:
    executor = FakeExecutor()
    engine = engine_with(executor)
    stream = job("stream", [1, 2], tokens=[5] * 50, started=0.0)
    engine.start(stream, None, reuse=False)
    engine.step()  # its prompt, and its first token sampled
    long = job("long", list(range(1, 51)), tokens=[6], started=1.0)
    engine.start(long, None, reuse=False)
    while long.prefilling:
        engine.step()
    steps = [(plan.seq_ids.count(0), plan.seq_ids.count(1)) for plan in executor.steps[1:]]
    # the stream's own prompt step came last, so it decodes first; then the prompt's chunks and the stream take turns
    assert steps == [(1, 0), (0, 16), (1, 0), (0, 16), (1, 0), (0, 16), (1, 0), (0, 2)]
    assert long.first_token_at is not None and long.generated == [6]


def test_a_cancelled_request_is_out_of_the_next_step_and_its_sequence_free() -> None:
    executor = FakeExecutor()
    engine = engine_with(executor, parallel=2)
    a, b = job("a", [1, 2], started=0.0), job("b", [3, 4], started=1.0)
    engine.start(a, None, reuse=False)
    engine.start(b, None, reuse=False)
    engine.step()
    ended = engine.cancel("a", "cancelled")
    assert ended is a and a.finish_reason == "cancelled" and a.sampler.closed
    engine.step()
    assert executor.steps[-1].seq_ids == [1]
    assert engine.free == 1


def test_stop_and_length_end_requests() -> None:
    engine = engine_with(FakeExecutor())
    stops = job("s", [1], tokens=[4, EOG])
    limited = job("l", [1], max_new=3, tokens=[4, 4, 4, 4])
    engine.start(stops, None, reuse=False)
    engine.start(limited, None, reuse=False)
    ended = []
    while engine.busy:
        ended += engine.step()
    assert (stops.finish_reason, stops.generated) == ("stop", [4])
    assert (limited.finish_reason, limited.generated) == ("length", [4, 4, 4])
    assert set(ended) == {stops, limited}


def test_a_full_kv_memory_ends_the_youngest_request_and_the_others_go_on() -> None:
    executor = FakeExecutor(statuses=[0, 1])
    engine = engine_with(executor, parallel=2)
    old, young = job("old", [1, 2], started=0.0), job("young", [3, 4], started=1.0)
    engine.start(old, None, reuse=False)
    engine.start(young, None, reuse=False)
    engine.step()
    cells = [list(s.cells) for s in engine.sequences]
    assert engine.step() == [young] and young.finish_reason == "pool_full"
    assert [list(s.cells) for s in engine.sequences] == cells, "the failed step's cells are not booked"
    engine.step()
    assert executor.steps[-1].seq_ids == [0] and old.finish_reason is None


def test_exact_mode_evaluates_a_reply_again_in_one_batch_before_it_is_reused() -> None:
    for settled in (True, False):
        executor = FakeExecutor()
        engine = engine_with(executor, parallel=1, exact=True)
        first = job("t1", [1, 2, 3], tokens=[4, 5, 6, EOG])
        sequence = engine.start(first, "talk")
        while engine.busy:
            engine.step()
        assert sequence.cells == [1, 2, 3, 4, 5, 6] and sequence.batched == 3, "decoded one a step: not exact"
        if settled:
            engine.settle(sequence)
            redo = executor.steps[-1]
            assert (redo.tokens, redo.positions, redo.logits) == ([4, 5, 6], [3, 4, 5], [False] * 3)
            assert sequence.batched == 6
        second = job("t2", [1, 2, 3, 4, 5, 6, 9])
        engine.start_on(sequence, second, "talk")
        assert second.cached == (6 if settled else 3), "only cells evaluated in batches are reused"
        engine.cancel("t2", "cancelled")
