"""Is batching correct? Teacher-forced log-probabilities of a fixed reply, against one fresh evaluation.

Under batching, llama.cpp's results depend on how a batch is composed, so replies are not bit-identical (its server
documents this for ``cache_prompt``). The test measures that noise first, as the difference between two fresh
evaluations that differ only in their batch company, then requires every path the engine takes (reuse of a
conversation's cells under co-batched traffic, a restore from RAM and from disk) to stay within a small multiple of
it; greedy replies with and without reuse must agree up to a divergence the noise explains (a near tie); and it
checks that it would notice a real mistake (a position off by one, a dropped token, another
conversation's state), each planted on purpose.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from model_client import protocol
from model_manager import worker_protocol as wire
from model_manager.backends.llm.backend import GGUFBackend
from model_manager.backends.llm.engine import BatchEngine
from model_manager.backends.llm.executor import make_sampler
from model_manager.backends.llm.state import Job, Sampling
from model_manager.config import KvCacheSettings, ModelSpec
from model_manager.kvcache import ConversationStore
from tests.conftest import SMOLLM2

TOP_K = 5  # the fresh run's most likely tokens, where a difference would change a reply
TRAFFIC = ["Tell me about the sea.", "List three fruits.", "What is two plus two?"]


class Forced:
    """A sampler that records the log-probabilities at each step and returns the reference token."""

    def __init__(self, reply: list[int], engine: BatchEngine) -> None:
        self.reply, self.engine = reply, engine
        self.logprobs: list[np.ndarray] = []

    def sample(self, _ctx, index: int) -> int:
        self.record(index)
        return self.reply[len(self.logprobs) - 1]

    def record(self, index: int) -> None:
        logits = self.engine.executor.logits_of(index)
        shifted = logits.astype(np.float64) - logits.max()
        self.logprobs.append(shifted - np.log(np.exp(shifted).sum()))

    def accept(self, token: int) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GGUFBackend]:
    spec = ModelSpec(kind="llm", path=str(SMOLLM2), quantization="Q4_1", n_ctx=1024, n_threads=2, parallel=4)
    kv = KvCacheSettings(spill_dir=str(tmp_path_factory.mktemp("kv")))
    engine = GGUFBackend()
    engine.load(spec, "smollm2", kv)
    yield engine
    engine.engine.close()


def chat_tokens(backend: GGUFBackend, *turns: str) -> list[int]:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    args = protocol.parse_args("chat", {"model": "m", "messages": messages, "max_tokens": 16})
    return backend._chat_prompt(wire.run_args("chat", args))[0]


def greedy(backend: GGUFBackend, prompt: list[int], n: int, owner: str | None = None) -> list[int]:
    engine = backend.engine
    job = Job("g", prompt, n, make_sampler(backend.model, Sampling(temperature=0.0)), lambda _t: True)
    engine.start(job, owner)
    while engine.busy:
        engine.step()
    return job.generated


class Greedy(Forced):
    """A sampler that records the log-probabilities at each step and returns the most likely token."""

    def sample(self, _ctx, index: int) -> int:
        self.record(index)
        return int(np.argmax(self.logprobs[-1]))


def forced(
    backend: GGUFBackend,
    prompt: list[int],
    reply: list[int],
    owner: str | None = None,
    traffic: int = 0,
    reuse: bool = True,
    before_start=None,
    step_tokens: int | None = None,
) -> tuple[np.ndarray, int]:
    """Teacher-forced log-probabilities of ``reply`` after ``prompt`` (one row a position), and the cached count;
    with ``traffic`` other requests decoding in the same steps."""
    sampler = Forced(reply, backend.engine)
    job = run(backend, prompt, sampler, len(reply), owner, traffic, reuse, before_start, step_tokens)
    return np.array(sampler.logprobs), job.cached


def greedy_recorded(
    backend: GGUFBackend, prompt: list[int], n: int, owner: str | None = None, traffic: int = 0, **how
) -> tuple[list[int], np.ndarray]:
    """A greedy reply of ``n`` tokens and the log-probabilities it was chosen from."""
    sampler = Greedy([], backend.engine)
    job = run(backend, prompt, sampler, n, owner, traffic, **how)
    return job.generated, np.array(sampler.logprobs)


def run(
    backend: GGUFBackend,
    prompt: list[int],
    sampler: Forced,
    n: int,
    owner: str | None = None,
    traffic: int = 0,
    reuse: bool = True,
    before_start=None,
    step_tokens: int | None = None,
) -> Job:
    engine = backend.engine
    others = []
    for i, text in enumerate(TRAFFIC[:traffic]):
        tokens = chat_tokens(backend, text)
        job = Job(f"t{i}", tokens, 64, make_sampler(backend.model, Sampling(temperature=0.0)), lambda _t: True)
        engine.start_on(engine.choose(tokens, None, reuse=False), job, None, reuse=False)
        others.append(job)
    job = Job("measured", prompt, n, sampler, lambda _t: True)  # type: ignore[arg-type]
    sequence = engine.choose(prompt, owner, reuse)
    if before_start is not None:
        sequence = before_start(sequence) or sequence
    engine.start_on(sequence, job, owner, reuse)
    budget, engine.step_tokens = engine.step_tokens, step_tokens or engine.step_tokens
    try:
        while job.ended_at is None:
            engine.step()
    finally:
        engine.step_tokens = budget
    for other in others:
        engine.cancel(other.rid, "done")
    return job


def difference(fresh: np.ndarray, other: np.ndarray) -> float:
    """The largest change of a log-probability among the fresh run's top tokens, over every position."""
    top = np.argsort(fresh, axis=1)[:, -TOP_K:]
    return float(np.abs(np.take_along_axis(fresh, top, 1) - np.take_along_axis(other, top, 1)).max())


def clear(backend: GGUFBackend) -> None:
    for sequence in backend.engine.sequences:
        backend.engine.clear(sequence)
        sequence.owner = None


@pytest.fixture(scope="module")
def case(backend: GGUFBackend) -> dict:
    """A two-turn conversation: turn 1's prompt, turn 2's prompt, a fixed reply to force after it, the reply's
    fresh log-probabilities (the prompt in one batch, on a clean sequence), and the noise floor: the same with the
    prompt fed one token a step, which differs only in batching."""
    clear(backend)
    question = "My name is Ann and I like apricots. What colour are they?"
    first = chat_tokens(backend, question)
    answer = backend.model.detokenize(greedy(backend, first, 12)).decode(errors="replace")
    second = chat_tokens(backend, question, answer, "Where do they grow?")
    reply = greedy(backend, second, 12)
    clear(backend)
    fresh, cached = forced(backend, second, reply, reuse=False)
    assert cached == 0
    clear(backend)
    one_by_one, _ = forced(backend, second, reply, reuse=False, step_tokens=1)
    noise = difference(fresh, one_by_one)
    return {
        "first": first,
        "second": second,
        "reply": reply,
        "fresh": fresh,
        "noise": noise,
        "tolerance": 2 * noise + 0.01,
    }


def caught(case: dict, got: np.ndarray) -> bool:
    """A planted mistake is caught when the engine refuses the step (no log-probabilities) or the reply's
    log-probabilities move past the tolerance."""
    return len(got) < len(case["reply"]) or difference(case["fresh"], got) > case["tolerance"]


def test_the_noise_floor_is_measured_and_small(case: dict) -> None:
    assert 0.0 <= case["noise"] < 1.0, case["noise"]


def test_a_reused_conversation_under_traffic_matches_a_fresh_evaluation(backend, case) -> None:
    clear(backend)
    greedy(backend, case["first"], 12, owner="ann")  # turn 1 leaves its cells on a sequence owned by ann
    got, cached = forced(backend, case["second"], case["reply"], owner="ann", traffic=3)
    assert cached >= len(case["first"]) - 1
    assert difference(case["fresh"], got) <= case["tolerance"]


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_a_restored_conversation_matches_a_fresh_evaluation(backend, case, tier: str) -> None:
    clear(backend)
    greedy(backend, case["first"], 12, owner="ann")
    sequence = next(s for s in backend.engine.sequences if s.owner == "ann")
    backend.conversations.save(sequence)
    clear(backend)
    store = backend.conversations.store
    if tier == "disk":
        store.spill_all()
        store = ConversationStore("smollm2", store.model_key, store.budget, 3600, str(store.spill_dir), 3600)
    saved = store.get("ann")
    assert saved is not None

    def restore(target):
        backend.engine.restore(target, saved.tokens, saved.state)

    got, cached = forced(backend, case["second"], case["reply"], owner="ann", traffic=1, before_start=restore)
    assert cached >= len(case["first"]) - 1
    assert difference(case["fresh"], got) <= case["tolerance"]


def test_a_position_off_by_one_is_caught(backend, case) -> None:
    clear(backend)
    greedy(backend, case["first"], 12, owner="ann")

    def one_later(target):  # every cell one position later than the books say (the last one makes room)
        backend.engine.executor.remove(target.seq_id, len(target.cells) - 1, -1)
        backend.engine.executor.shift(target.seq_id, 0, -1, 1)

    got, _ = forced(backend, case["second"], case["reply"], owner="ann", before_start=one_later)
    assert caught(case, got)


def test_a_dropped_token_is_caught(backend, case) -> None:
    clear(backend)
    greedy(backend, case["first"], 12, owner="ann")

    def drop_one(target):  # a cell in the middle goes, the later ones move up: the books do not notice
        middle = len(target.cells) // 2
        backend.engine.executor.remove(target.seq_id, middle, middle + 1)
        backend.engine.executor.shift(target.seq_id, middle + 1, -1, -1)
        del target.cells[-1]

    got, _ = forced(backend, case["second"], case["reply"], owner="ann", before_start=drop_one)
    assert caught(case, got)
    clear(backend)  # and in the prompt itself: the token where turn 1 ends
    boundary = len(case["first"]) - 1
    got, _ = forced(backend, case["second"][:boundary] + case["second"][boundary + 1 :], case["reply"], reuse=False)
    assert caught(case, got)


def test_another_conversations_state_is_caught(backend, case) -> None:
    clear(backend)
    other = chat_tokens(backend, "Tell me a long story about a dragon and a knight who live in the mountains.")
    greedy(backend, other, 12, owner="ann")  # the cells of another talk, booked as ann's first turn

    def pretend(target):
        n = min(len(target.cells), len(case["first"]))
        backend.engine.executor.remove(target.seq_id, n, -1)
        target.cells = list(case["first"][:n])

    got, cached = forced(backend, case["second"], case["reply"], owner="ann", before_start=pretend)
    assert cached > 0 and caught(case, got)


def test_a_prefix_copied_from_another_sequence_matches_a_fresh_evaluation(backend, case) -> None:
    clear(backend)
    greedy(backend, case["first"], 12, owner="ann")
    source = next(s for s in backend.engine.sequences if s.owner == "ann")

    def copy(target):  # bob's request starts like ann's conversation: the shared cells are copied, not evaluated
        backend.engine.copy_prefix(source, target, len(case["first"]))

    got, cached = forced(backend, case["second"], case["reply"], owner="bob", traffic=1, before_start=copy)
    assert cached >= len(case["first"]) - 1
    assert difference(case["fresh"], got) <= case["tolerance"]


# ----- greedy, end to end: replies agree, or part where the fresh run was nearly tied ------------------------------

GREEDY_TOKENS = 24


def unexplained_divergence(
    fresh: tuple[list[int], np.ndarray], got: tuple[list[int], np.ndarray], tolerance: float
) -> int | None:
    """The first position where ``got`` is not explained by batching noise, or None: up to where its greedy reply
    leaves the fresh one, both were chosen from log-probabilities within ``tolerance``; and where it leaves, the
    fresh run's two best tokens were nearly tied (within twice the tolerance: two values that each move by it can
    swap a gap that wide)."""
    (tokens, logprobs), (got_tokens, got_logprobs) = fresh, got
    same = next((i for i, (a, b) in enumerate(zip(tokens, got_tokens, strict=False)) if a != b), None)
    compared = min(len(tokens), len(got_tokens)) if same is None else same + 1
    for i in range(compared):
        if difference(logprobs[i : i + 1], got_logprobs[i : i + 1]) > tolerance:
            return i
    if same is not None:
        best, second = np.sort(logprobs[same])[-2:][::-1]
        return same if best - second > 2 * tolerance else None
    return None if len(got_tokens) == len(tokens) else compared


@pytest.fixture(scope="module")
def fresh_greedy(backend, case) -> tuple[list[int], np.ndarray]:
    clear(backend)
    return greedy_recorded(backend, case["second"], GREEDY_TOKENS, reuse=False)


def test_greedy_replies_with_and_without_reuse_agree_but_where_nearly_tied(backend, case, fresh_greedy) -> None:
    clear(backend)
    greedy(backend, case["first"], 12, owner="ann")
    reused = greedy_recorded(backend, case["second"], GREEDY_TOKENS, owner="ann", traffic=2)
    assert unexplained_divergence(fresh_greedy, reused, case["tolerance"]) is None
    clear(backend)
    greedy(backend, case["first"], 12, owner="ann")
    source = next(s for s in backend.engine.sequences if s.owner == "ann")

    def copy(target):
        backend.engine.copy_prefix(source, target, len(case["first"]))

    copied = greedy_recorded(backend, case["second"], GREEDY_TOKENS, owner="bob", traffic=1, before_start=copy)
    assert unexplained_divergence(fresh_greedy, copied, case["tolerance"]) is None


def test_a_greedy_reply_from_another_conversations_state_is_caught(backend, case, fresh_greedy) -> None:
    clear(backend)
    other = chat_tokens(backend, "Tell me a long story about a dragon and a knight who live in the mountains.")
    greedy(backend, other, 12, owner="ann")

    def pretend(target):
        n = min(len(target.cells), len(case["first"]))
        backend.engine.executor.remove(target.seq_id, n, -1)
        target.cells = list(case["first"][:n])

    wrong = greedy_recorded(backend, case["second"], GREEDY_TOKENS, owner="ann", before_start=pretend)
    assert unexplained_divergence(fresh_greedy, wrong, case["tolerance"]) == 0


def test_a_greedy_reply_that_leaves_a_confident_choice_is_caught(fresh_greedy) -> None:
    tokens, logprobs = fresh_greedy
    gaps = [float(np.diff(np.sort(row)[-2:])[0]) for row in logprobs]
    confident, tied = int(np.argmax(gaps)), int(np.argmin(gaps))
    for position, expected in ((confident, confident), (tied, None if gaps[tied] <= 0.2 else tied)):
        runner_up = int(np.argsort(logprobs[position])[-2])
        swapped = [*tokens[:position], runner_up, *tokens[position + 1 :]]
        assert unexplained_divergence(fresh_greedy, (swapped, logprobs), 0.1) == expected
