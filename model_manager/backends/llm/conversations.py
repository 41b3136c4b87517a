"""Conversations on sequences: the cells of a reply stay on its sequence, owned by the conversation, and the next
turn evaluates only its new tokens. When a request needs a sequence that another conversation holds, that
conversation's cells are saved to the ConversationStore first (RAM, then disk, across restarts); they come back
into a free sequence when it speaks again.
"""

from __future__ import annotations

import contextlib

from model_manager.backends.llm.engine import BatchEngine, common_prefix
from model_manager.backends.llm.state import Job, Sequence
from model_manager.kvcache import ConversationStore

MIN_PREFIX_COPY = 16  # tokens: a shorter shared prefix is cheaper to evaluate than a sequence to copy


class Conversations:
    def __init__(self, engine: BatchEngine, store: ConversationStore | None) -> None:
        self.engine = engine
        self.store = store

    def sequence_for(self, job: Job, conversation_id: str | None, reuse: bool) -> Sequence:
        """The conversation's own sequence; else a free one, the conversation's saved state put back into it;
        else the free one sharing most of the prompt. Cells of another conversation are saved before they go.
        A longer shared prefix on another sequence is then copied in."""
        engine = self.engine
        sequence = engine.choose(job.prompt, conversation_id, reuse)
        if sequence.owner is not None and sequence.owner != conversation_id:
            self.save(sequence)
            sequence.owner = None
        if reuse and conversation_id is not None and sequence.owner != conversation_id and self.store is not None:
            saved = self.store.get(conversation_id)
            held = common_prefix(engine.reusable(sequence), job.prompt)
            if saved is not None and common_prefix(saved.tokens, job.prompt) > held:
                engine.restore(sequence, saved.tokens, saved.state)
        if reuse:
            donor, shared = engine.donor(job.prompt, exclude=sequence)
            if donor is not None and shared >= common_prefix(engine.reusable(sequence), job.prompt) + MIN_PREFIX_COPY:
                engine.copy_prefix(donor, sequence, shared)
        return sequence

    def save(self, sequence: Sequence) -> None:
        """The sequence's conversation into the store (in exact mode settled first: only exact cells are kept)."""
        if self.store is None or sequence.owner is None or not sequence.cells:
            return
        self.engine.settle(sequence)
        if self.engine.exact:
            self.engine.truncate(sequence, sequence.batched)  # a request still runs on it: settle waited
        if sequence.cells:
            self.store.put(sequence.owner, list(sequence.cells), self.engine.executor.save(sequence.seq_id))

    def drop(self, conversation_id: str) -> bool:
        live = self.engine.forget(conversation_id)
        saved = self.store.drop(conversation_id) if self.store else False
        return live or saved

    def settle_idle(self) -> None:
        """Exact mode, nothing running: every conversation's reply is evaluated again in one batch now, so its
        next turn finds exact cells and evaluates only its new tokens."""
        for sequence in self.engine.sequences:
            if sequence.owner is not None:
                self.engine.settle(sequence)

    def save_all(self) -> None:
        for sequence in self.engine.sequences:
            with contextlib.suppress(Exception):
                self.save(sequence)
        if self.store is not None:
            self.store.spill_all()

    def stats(self) -> dict[str, int] | None:
        if self.store is None:
            return None
        sequences = self.engine.sequences
        stats = dict(self.store.stats())
        live = {s.owner for s in sequences if s.owner is not None}
        stats["saved"] = stats["conversations"]
        stats["conversations"] = len(live | set(self.store.states))  # every one the model can resume, live or saved
        stats["live"] = len(live)
        stats["sequences_busy"] = sum(1 for s in sequences if s.job is not None)
        stats["parallel"] = len(sequences)
        stats["prefix_copies"] = self.engine.prefix_copies
        return stats
