"""Continuous batching for a GGUF model: many requests decode together, one ``llama_decode`` a step.

llama.cpp keeps several sequences in one context (``n_seq_max``), each with its own KV stream. Each step carries
what the planner chose (``planner.plan_step``: waiting prompts or every stream's next token, taking turns), and then
every sequence that produced logits is sampled with its own sampler chain. The code is ours, on llama-cpp-python's
low-level API, because ``Llama`` holds one sequence.

A sequence keeps its cells after its request ends: the next request that starts with the same tokens (the next
turn of a conversation, the same system prompt) evaluates only what differs. An idle sequence is taken over by the
request whose prompt shares the longest prefix with it, else by the one idle longest.

Exact mode (a model served one request at a time): with temperature 0 a reply with reuse is token for token the
reply without it. llama.cpp's CPU attention is bit-identical however a prompt is split into batches, but not after
runs of one-token decodes (measured on SmolLM2: two replies' worth of decoded tokens in the cache flipped a greedy
choice of the third turn). So a reply's decoded cells are evaluated again as one batch before a later request
builds on them (``settle``), and cells are only dropped by reloading the kept ones into an emptied sequence: the
cache then has the shape a fresh evaluation gives it.
"""

from __future__ import annotations

import time

from model_manager.backends.llm.executor import Executor
from model_manager.backends.llm.planner import Plan, plan_step
from model_manager.backends.llm.state import Job, Sequence


class BatchEngine:
    def __init__(self, executor: Executor, parallel: int, step_tokens: int, seq_ctx: int, exact: bool) -> None:
        self.executor = executor
        self.sequences = [Sequence(seq_id=i) for i in range(parallel)]
        self.step_tokens = step_tokens
        self.seq_ctx = seq_ctx  # the cells one sequence may hold
        self.exact = exact
        self.steps = 0
        self.sequence_steps = 0  # sequences decoded, summed over steps
        self.generated = 0
        self.prefix_copies = 0
        self.after_prompts = False  # the last step carried prompt chunks: the streams get the next one

    def close(self) -> None:
        for sequence in self.sequences:
            if sequence.job is not None:
                sequence.job.sampler.close()

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
                shared = common_prefix(self.reusable(sequence), prompt)
                if shared > length:
                    best, length = sequence, shared
        return best, length

    def reusable(self, sequence: Sequence) -> list[int]:
        """The cells a later request may build on: in exact mode only those evaluated in batches."""
        return sequence.cells[: sequence.batched] if self.exact else sequence.cells

    def copy_prefix(self, source: Sequence, target: Sequence, length: int) -> None:
        """Give ``target`` the first ``length`` cells of ``source``, copied, not evaluated again. Between KV
        streams llama.cpp copies a whole sequence; the cells past ``length`` are dropped at once."""
        self.executor.remove(target.seq_id, -1, -1)
        self.executor.copy(source.seq_id, target.seq_id)
        target.cells = list(source.cells)
        target.batched = source.batched
        self.truncate(target, length)
        self.prefix_copies += 1

    def start_on(self, sequence: Sequence, job: Job, owner: str | None, reuse: bool = True) -> None:
        """Run ``job`` on ``sequence``, keeping the cells it shares with the prompt (the rest are dropped)."""
        assert sequence.job is None
        keep = common_prefix(self.reusable(sequence), job.prompt) if reuse else 0
        keep = min(keep, len(job.prompt) - 1)  # the last prompt token is evaluated again for its logits
        self.truncate(sequence, keep)
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
        self.truncate(sequence, 0)

    def restore(self, sequence: Sequence, tokens: list[int], state: bytes | bytearray) -> bool:
        """Put a conversation's saved cells into ``sequence`` (emptied first)."""
        self.clear(sequence)
        if self.executor.restore(sequence.seq_id, state):
            sequence.cells = list(tokens)
            sequence.batched = len(tokens)  # only settled cells are ever saved in exact mode
            return True
        self.clear(sequence)
        return False

    def truncate(self, sequence: Sequence, keep: int) -> None:
        if keep >= len(sequence.cells):
            return
        seq_id = sequence.seq_id
        if keep > 0 and self.exact:  # reloaded into an emptied sequence: the cells a fresh evaluation gives
            self.executor.remove(seq_id, keep, -1)
            state = self.executor.save(seq_id)
            self.executor.remove(seq_id, -1, -1)
            if not self.executor.restore(seq_id, state):
                keep = 0
        elif keep > 0 and not self.executor.remove(seq_id, keep, -1):
            keep = 0
        if keep == 0:
            self.executor.remove(seq_id, -1, -1)
        del sequence.cells[keep:]
        sequence.batched = min(sequence.batched, keep)

    def settle(self, sequence: Sequence) -> None:
        """Exact mode, between requests: the cells decoded one token a step are evaluated again as one batch."""
        if not self.exact or sequence.job is not None or sequence.batched >= len(sequence.cells):
            return
        redo = sequence.cells[sequence.batched :]
        self.truncate(sequence, sequence.batched)
        for start in range(0, len(redo), self.step_tokens):
            chunk = redo[start : start + self.step_tokens]
            base = len(sequence.cells)
            plan = Plan(
                tokens=chunk,
                positions=list(range(base, base + len(chunk))),
                seq_ids=[sequence.seq_id] * len(chunk),
                logits=[False] * len(chunk),
            )
            if self.executor.decode(plan) != 0:
                self.executor.remove(sequence.seq_id, base, -1)
                return
            sequence.cells.extend(chunk)
            sequence.batched = len(sequence.cells)

    def forget(self, owner: str) -> bool:
        """Drop the cells a conversation holds on an idle sequence."""
        found = False
        for sequence in self.sequences:
            if sequence.owner == owner and sequence.job is None:
                self.truncate(sequence, 0)
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
        plan = plan_step(self.sequences, self.step_tokens, self.after_prompts)
        if not plan.rows:
            return []
        self.after_prompts = plan.rows[0].prefill
        status = self.executor.decode(plan)
        self.steps += 1
        self.sequence_steps += len(plan.rows)
        if status != 0:
            return self._failed_step(plan, status)
        ended: list[Job] = []
        tokens = plan.tokens
        for row in plan.rows:
            sequence = row.sequence
            job = sequence.job
            assert job is not None
            if row.prefill:
                sequence.cells.extend(tokens[row.first : row.first + row.count])
                job.evaluated += row.count
                if self.exact:
                    sequence.batched = len(sequence.cells)
            else:
                sequence.cells.append(job.pending_token)  # type: ignore[arg-type]
                job.pending_token = None
            if row.sample_at >= 0:
                self._sample(sequence, job, row.sample_at)
            if job.finish_reason is not None:
                ended.append(self._end(sequence, job.finish_reason))
        return ended

    def _sample(self, sequence: Sequence, job: Job, index: int) -> None:
        token = self.executor.sample(job.sampler, index)  # samples and accepts
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        if self.executor.is_eog(token):
            job.finish_reason = "stop"
            return
        job.generated.append(token)
        self.generated += 1
        if not job.on_token(token):
            job.finish_reason = job.finish_reason or "stop"
        elif len(job.generated) >= job.max_new or len(sequence.cells) + 1 >= self.seq_ctx:
            job.finish_reason = "length"
        else:
            job.pending_token = token

    def _failed_step(self, plan: Plan, status: int) -> list[Job]:
        """``llama_decode`` refused the batch (1: no room in the KV memory). The batch's sequences keep the cells
        they had; the youngest request is ended so the others can go on."""
        sequences = [row.sequence for row in plan.rows]
        for sequence in sequences:  # whatever the failed step may have written is dropped
            self.executor.remove(sequence.seq_id, len(sequence.cells), -1)
        victim = max(sequences, key=lambda s: s.job.started if s.job else 0)
        reason = "pool_full" if status == 1 else f"decode_error_{status}"
        return [self._end(victim, reason)]

    def _end(self, sequence: Sequence, reason: str) -> Job:
        job = sequence.job
        assert job is not None
        job.finish_reason = job.finish_reason or reason
        job.ended_at = time.perf_counter()
        job.pending_token = None  # sampled but never decoded: not in the cells
        job.sampler.close()
        sequence.job = None
        sequence.last_used = time.monotonic()
        return job


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
