"""The lifecycle driven by fakes: a worker pool with no processes and an outbox that keeps what it was given.

The test plays each worker (``Ready``, ``Loaded``, ``Done``, an exit) and reads the answers the clients would get,
so every path of a model's life runs in milliseconds, without a model. The lifecycle does not care which engine a
worker runs; the models here are voices because their size comes from the file alone.
"""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from model_client import protocol
from model_client.errors import BadRequest, Busy
from model_manager import threads
from model_manager import worker_protocol as wire
from model_manager.config import MIB, Config, parse_config
from model_manager.kvcache import spill_path
from model_manager.lifecycle import Lifecycle
from model_manager.memory import MemoryAccounting
from model_manager.metrics import ManagerMetrics
from model_manager.pool import WorkerHandle
from model_manager.slots import Job, ModelState, Waiter
from model_manager.status import model_entry
from tests.conftest import SMOLLM2

VOICE_BYTES = MIB  # a voice needs 1.5 x its file + 80 MiB working + 64 MiB worker: about 146 MiB


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.returncode = -sig

    def terminate(self) -> None:
        self.returncode = -signal.SIGTERM

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


class FakeWorkers:
    """What the lifecycle asks of the pool, with no process behind it: the test says what each worker does."""

    def __init__(self) -> None:
        self.by_id: dict[str, WorkerHandle] = {}
        self.sent: list[tuple[WorkerHandle, wire.ToWorker]] = []
        self.count = 0

    def take(self, model: str, kind: str) -> WorkerHandle:
        self.count += 1
        handle = WorkerHandle(id=f"w{self.count}", proc=FakeProcess(10_000 + self.count), kind=kind)  # type: ignore[arg-type]
        handle.model = model
        self.by_id[handle.id] = handle
        return handle

    def send(self, handle: WorkerHandle, message: wire.ToWorker) -> None:
        self.sent.append((handle, message))

    def end(self, handle: WorkerHandle, grace_s: float) -> None:
        if handle.exit_deadline is None:
            handle.exit_deadline = time.monotonic() + grace_s
            self.send(handle, wire.Exit())

    def spares(self) -> list[WorkerHandle]:
        return []

    def refill(self) -> None:
        pass

    def reap(self) -> list[tuple[WorkerHandle, int]]:
        gone = [(h, h.proc.returncode) for h in self.by_id.values() if h.proc.returncode is not None]
        for handle, _ in gone:
            del self.by_id[handle.id]
        return gone  # type: ignore[return-value]

    def close(self, grace_s: float) -> None:
        for handle in self.by_id.values():
            handle.proc.returncode = 0  # type: ignore[misc]
        self.by_id.clear()

    def to(self, handle: WorkerHandle) -> list[wire.ToWorker]:
        return [message for h, message in self.sent if h is handle]


class FakeOutbox:
    def __init__(self) -> None:
        self.replies: dict[bytes, list[protocol.Reply]] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.gone: set[bytes] = set()

    def send(self, route: list[bytes], frames: list[bytes]) -> bool:
        if route[0] in self.gone:
            return False
        self.replies.setdefault(route[0], []).append(protocol.decode_reply(frames))
        return True

    def publish(self, topic: str, **body: Any) -> None:
        self.events.append((topic, body))

    def to(self, client: bytes) -> list[protocol.Reply]:
        return self.replies.get(client, [])


class Bench:
    """A lifecycle with its fakes, and the moves a test makes as client and as worker."""

    def __init__(
        self,
        tmp_path: Path,
        extra: str = "",
        voices: tuple[str, ...] = ("a",),
        llms: str = "",
        cpu_threads: str = "auto",
    ) -> None:
        for name in voices:
            (tmp_path / f"{name}.onnx").write_bytes(b"\0" * VOICE_BYTES)
        models = "".join(f"  {name}: {{kind: tts, path: {name}.onnx, idle_ttl_s: -1}}\n" for name in voices) + llms
        text = textwrap.dedent(
            f"""\
            manager: {{state_dir: state}}
            kv_cache: {{spill_dir: kv}}
            devices: {{mode: simulated, simulated: [{{total_mib: 1000}}], simulated_host_mib: 400,
                      host_headroom_mib: 0, cpu_threads: {cpu_threads}}}
            scheduler: {{hold_after_use_s: 0}}
            """
        )
        self.config: Config = parse_config(text + extra + "models:\n" + models, tmp_path)
        self.workers = FakeWorkers()
        self.outbox = FakeOutbox()
        self.memory = MemoryAccounting(self.config, self.workers)  # type: ignore[arg-type]
        self.life = Lifecycle(self.config, self.workers, self.memory, ManagerMetrics(self.config.metrics), self.outbox)
        self.requests = 0

    def slot(self, name: str = "a"):
        return self.life.slots[name]

    def ask(
        self, client: bytes, model: str = "a", request_id: str | None = None, priority: int = 50, **args: Any
    ) -> Job:
        self.requests += 1
        request_id = request_id or f"r{self.requests}"
        job = Job(
            route=[client, b""], request_id=request_id, op="synthesize", args=wire.SynthesizeRun(text="hi", **args)
        )
        job.priority = priority
        self.life.enqueue(self.slot(model), job)
        return job

    def worker(self, name: str = "a") -> WorkerHandle:
        handle = self.slot(name).worker
        assert handle is not None, f"{name} has no worker"
        return handle

    def say(self, handle: WorkerHandle, message: wire.FromWorker) -> None:
        self.life.on_worker_message(handle, message)

    def load(self, name: str = "a", rss: int = 146 * MIB) -> WorkerHandle:
        """Play the worker of a model that is loading: ready, then loaded, ``rss`` bytes resident."""
        handle = self.worker(name)
        self.say(handle, wire.Ready(pid=handle.pid, rss=64 * MIB))
        self.say(handle, wire.Loaded(info={"pid": handle.pid, "rss_bytes": rss}))
        return handle

    def exit(self, handle: WorkerHandle, code: int = 0) -> None:
        handle.proc.returncode = code  # type: ignore[misc]
        self.life.reap()


def runs(workers: FakeWorkers, handle: WorkerHandle) -> list[str]:
    return [m.rid for m in workers.to(handle) if isinstance(m, wire.Run)]


def test_a_request_loads_the_model_runs_on_its_worker_and_is_answered(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    job = bench.ask(b"c1")
    assert bench.slot().state is ModelState.LOADING
    handle = bench.worker()
    assert bench.workers.to(handle) == [], "a worker that is not ready yet is sent nothing"
    bench.say(handle, wire.Ready(pid=handle.pid, rss=64 * MIB))
    assert [type(m) for m in bench.workers.to(handle)] == [wire.Load]
    bench.say(handle, wire.Loaded(info={"pid": handle.pid, "rss_bytes": 146 * MIB}))
    assert bench.slot().state is ModelState.READY
    assert bench.outbox.events[-1][0] == protocol.EVENT_MODEL_LOADED
    assert runs(bench.workers, handle) == [job.key]
    bench.say(handle, wire.Done(rid=job.key, result={"sample_rate": 22050}, payload=b"RIFF"))
    [reply] = bench.outbox.to(b"c1")
    assert (reply.type, reply.body["model"], reply.payloads) == ("result", "a", (b"RIFF",))
    assert not bench.slot().busy and bench.slot().requests_served == 1


def test_one_request_at_a_time_the_next_starts_when_the_first_is_done(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    first, second = bench.ask(b"c1"), bench.ask(b"c2")
    handle = bench.load()
    assert runs(bench.workers, handle) == [first.key]
    bench.say(handle, wire.Done(rid=first.key, result={}))
    assert runs(bench.workers, handle) == [first.key, second.key]


def test_two_clients_with_one_request_id_each_get_their_own_answer(tmp_path: Path) -> None:
    """The worker knows a request by the manager's key, not the client's id: equal ids of two clients never meet."""
    bench = Bench(tmp_path, llms=chat_model(parallel=2))
    mine, theirs = bench.ask(b"c1", "chat", request_id="same"), bench.ask(b"c2", "chat", request_id="same")
    handle = load_with_facts(bench, "chat")
    assert runs(bench.workers, handle) == [mine.key, theirs.key] and mine.key != theirs.key
    bench.say(handle, wire.Done(rid=theirs.key, result={"who": "theirs"}))
    bench.say(handle, wire.Done(rid=mine.key, result={"who": "mine"}))
    [to_c1], [to_c2] = bench.outbox.to(b"c1"), bench.outbox.to(b"c2")
    assert (to_c1.id, to_c1.body["who"]) == ("same", "mine") and (to_c2.id, to_c2.body["who"]) == ("same", "theirs")


def test_a_duplicate_id_from_one_client_is_refused_while_the_first_is_in_flight(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    first = bench.ask(b"c1", request_id="dup")
    with pytest.raises(BadRequest, match="already in flight") as refused:
        bench.ask(b"c1", request_id="dup")
    assert refused.value.details == {"field": "id"}
    handle = bench.load()
    bench.say(handle, wire.Done(rid=first.key, result={}))
    assert [r.type for r in bench.outbox.to(b"c1")] == ["result"]
    again = bench.ask(b"c1", request_id="dup")  # answered: the id is free again
    assert runs(bench.workers, handle) == [first.key, again.key]


def test_a_failed_load_answers_every_waiter_and_the_next_request_loads_again(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.ask(b"c1")
    bench.ask(b"c2")
    bench.life.load(bench.slot(), Waiter([b"c3", b""], "load1"))
    handle = bench.worker()
    bench.say(handle, wire.Ready(pid=handle.pid, rss=64 * MIB))
    bench.say(handle, wire.LoadFailed(error={"code": "model_load_failed", "message": "bad file"}))
    assert bench.slot().state is ModelState.FAILED
    for client in (b"c1", b"c2", b"c3"):
        [reply] = bench.outbox.to(client)
        assert (reply.type, reply.body["code"]) == ("error", "model_load_failed")
    assert bench.outbox.events[-1][0] == protocol.EVENT_MODEL_FAILED
    bench.ask(b"c4")
    assert bench.slot().state is ModelState.LOADING and bench.worker() is not handle


def test_a_worker_dying_under_a_request_fails_it_and_the_queued_one_gets_a_fresh_worker(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.ask(b"c1")
    bench.ask(b"c2")
    handle = bench.load()
    bench.exit(handle, -signal.SIGSEGV)
    [reply] = bench.outbox.to(b"c1")
    assert (reply.type, reply.body["code"]) == ("error", "model_failed")
    assert bench.outbox.to(b"c2") == [], "the queued request is not failed with it"
    assert bench.slot().state is ModelState.LOADING and bench.worker() is not handle


def test_unload_waits_for_the_running_request_then_ends_the_worker(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    job = bench.ask(b"c1")
    handle = bench.load()
    bench.life.unload(bench.slot(), Waiter([b"u", b""], "unload1"))
    assert bench.slot().state is ModelState.READY and bench.outbox.to(b"u") == []
    bench.say(handle, wire.Done(rid=job.key, result={}))
    assert bench.slot().state is ModelState.UNLOADING and isinstance(bench.workers.to(handle)[-1], wire.Exit)
    bench.exit(handle)
    [reply] = bench.outbox.to(b"u")
    assert reply.body["state"] == "unloaded"
    assert bench.outbox.events[-1] == (protocol.EVENT_MODEL_UNLOADED, {"model": "a", "reason": "requested"})


def test_a_drop_while_the_worker_exits_waits_until_the_worker_has_written_its_states(tmp_path: Path) -> None:
    """An exiting worker writes every conversation state to disk: a drop answered before it is gone is undone."""
    bench = Bench(tmp_path)
    bench.life.load(bench.slot(), Waiter([b"l", b""], "load1"))
    handle = bench.load()
    bench.life.unload(bench.slot(), Waiter([b"u", b""], "unload1"))
    assert bench.slot().state is ModelState.UNLOADING
    drop = Job(
        route=[b"d", b""],
        request_id="drop1",
        op="conversation.drop",
        args=wire.DropRun(model="a", conversation_id="kitchen"),
    )
    bench.life.drop_conversation(bench.slot(), Waiter(drop.route, drop.request_id), drop)
    assert bench.outbox.to(b"d") == [], "answered while the worker still owns the files"
    spilled = spill_path(bench.config.kv_cache.spill_dir, "a", "kitchen")
    spilled.parent.mkdir(parents=True, exist_ok=True)
    spilled.write_bytes(b"state")  # what the exiting worker writes out
    bench.exit(handle)
    [reply] = bench.outbox.to(b"d")
    assert reply.body == {"dropped": True, "conversation_id": "kitchen"}
    assert not spilled.exists()


def test_a_request_past_its_time_limit_kills_the_worker_and_is_answered_timeout(tmp_path: Path) -> None:
    bench = Bench(tmp_path, extra="limits: {request_timeout_s: 5}\n")
    job = bench.ask(b"c1")
    handle = bench.load()
    bench.life.tick(time.monotonic())
    assert handle.proc.returncode is None, "killed before its time"
    bench.life.tick(job.started_at + 6)
    assert handle.proc.returncode == -signal.SIGKILL
    bench.life.reap()
    [reply] = bench.outbox.to(b"c1")
    assert (reply.type, reply.body["code"]) == ("error", "timeout")


def test_a_queued_request_whose_deadline_passed_is_answered_timeout_and_never_runs(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.ask(b"c1")
    late = bench.ask(b"c2")
    late.deadline = late.received_at + 1
    handle = bench.load()
    bench.life.tick(late.received_at + 2)
    [reply] = bench.outbox.to(b"c2")
    assert reply.body["code"] == "timeout"
    assert late.key not in runs(bench.workers, handle)


def test_a_streaming_client_gone_cancels_its_request_on_the_worker(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    job = bench.ask(b"c1", stream=True, format="pcm")
    handle = bench.load()
    bench.say(handle, wire.Chunk(rid=job.key, chunk={"seq": 0}, payload=b"\0\0"))
    assert [r.type for r in bench.outbox.to(b"c1")] == ["chunk"]
    bench.outbox.gone.add(b"c1")
    bench.say(handle, wire.Chunk(rid=job.key, chunk={"seq": 1}, payload=b"\0\0"))
    assert wire.Cancel(rid=job.key) in bench.workers.to(handle)


def test_memory_pressure_unloads_the_idle_model_for_the_one_asked_for(tmp_path: Path) -> None:
    """The 400 MiB host holds a voice measured at 300 MiB, or a 146 MiB one, not both."""
    bench = Bench(tmp_path, voices=("a", "b"))
    first = bench.ask(b"c1", "a")
    handle_a = bench.load("a", rss=300 * MIB)
    bench.say(handle_a, wire.Done(rid=first.key, result={}))
    bench.ask(b"c2", "b")
    assert bench.slot("a").state is ModelState.UNLOADING and bench.slot("a").unload_reason == "pressure"
    assert bench.slot("b").state is ModelState.UNLOADED, "b waits for a's memory"
    bench.exit(handle_a)
    assert bench.slot("b").state is ModelState.LOADING


def test_shutdown_answers_every_request_left_and_ends_the_workers(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.ask(b"c1")
    bench.ask(b"c2")
    bench.load()
    bench.life.shutdown()
    for client in (b"c1", b"c2"):
        [reply] = bench.outbox.to(client)
        assert reply.body["code"] == "model_failed"
    assert bench.workers.by_id == {}


@pytest.mark.parametrize(
    "message",
    [
        wire.Ready(pid=1, rss=1),
        wire.Loaded(info={"pid": 1}),
        wire.LoadFailed(error={"code": "internal", "message": "late"}),
        wire.Done(rid="nobody", result={}),
    ],
)
def test_a_message_from_a_worker_that_no_longer_serves_the_model_changes_nothing(
    tmp_path: Path, message: wire.FromWorker
) -> None:
    bench = Bench(tmp_path)
    bench.ask(b"c1")
    old = bench.load()
    bench.exit(old, -9)
    bench.ask(b"c2")
    bench.say(old, message)
    assert bench.slot().state is ModelState.LOADING and bench.worker() is not old


@pytest.mark.parametrize(
    "message",
    [
        wire.Ready(pid=1, rss=1),
        wire.Loaded(info={"pid": 1}),
        wire.LoadFailed(error={"code": "internal", "message": "twice"}),
        wire.Done(rid="nobody", result={}),
        wire.Failed(rid="nobody", error={"code": "internal", "message": "?"}),
    ],
)
def test_a_worker_saying_the_wrong_thing_for_its_state_changes_nothing(
    tmp_path: Path, message: wire.FromWorker
) -> None:
    """A worker runs engines on untrusted input: a message out of turn (loaded twice, a stranger's id) is ignored,
    never a state change the table forbids, which would stop the manager."""
    bench = Bench(tmp_path)
    job = bench.ask(b"c1")
    handle = bench.load()
    bench.say(handle, message)
    assert bench.slot().state is ModelState.READY and bench.slot().worker is handle
    bench.say(handle, wire.Done(rid=job.key, result={}))
    assert bench.outbox.to(b"c1")[-1].type == "result"


@pytest.mark.parametrize("info", [{}, {"pid": "me", "rss_bytes": "lots", "load_ms": None}])
def test_a_worker_loaded_message_with_odd_facts_still_serves(tmp_path: Path, info: dict) -> None:
    """The worker's facts are shown, not trusted: the manager knows its pid, and measures it when rss is odd."""
    bench = Bench(tmp_path)
    job = bench.ask(b"c1")
    handle = bench.worker()
    bench.say(handle, wire.Ready(pid=handle.pid, rss=64 * MIB))
    bench.say(handle, wire.Loaded(info=info))
    assert bench.slot().state is ModelState.READY
    bench.say(handle, wire.Done(rid=job.key, result={}))
    assert bench.outbox.to(b"c1")[-1].type == "result"


def test_a_request_that_would_start_after_its_deadline_is_refused_at_once(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    first = bench.ask(b"c1")
    handle = bench.load()
    bench.slot().service_s = 2.0  # as measured
    queued = bench.ask(b"c2")  # no deadline: queued behind the first
    late = Job(route=[b"c3", b""], request_id="late", op="synthesize", args=wire.SynthesizeRun(text="hi"))
    late.deadline = late.received_at + 1.0  # two requests ahead at 2 s each
    with pytest.raises(Busy) as refused:
        bench.life.enqueue(bench.slot(), late)
    assert 2000 <= refused.value.details["retry_after_ms"] <= 3100
    patient = Job(route=[b"c4", b""], request_id="patient", op="synthesize", args=wire.SynthesizeRun(text="hi"))
    patient.deadline = patient.received_at + 10.0
    bench.life.enqueue(bench.slot(), patient)
    bench.say(handle, wire.Done(rid=first.key, result={}))
    assert runs(bench.workers, handle) == [first.key, queued.key]


# ----- CPU threads: the models computing at once share the cores ---------------------------------------------------


def chat_model(**fields: Any) -> str:
    extra = "".join(f", {key}: {value}" for key, value in fields.items())
    return f"  chat: {{kind: llm, path: {SMOLLM2}, quantization: Q4_1, n_ctx: 256, idle_ttl_s: -1{extra}}}\n"


def load_with_facts(bench: Bench, name: str) -> WorkerHandle:
    """Load an LLM whose GGUF header the memory books read first (in the manager, a background read)."""
    bench.memory.store.read_now(bench.slot(name).spec.path)
    bench.life.schedule()
    return bench.load(name)


def threads_sent(bench: Bench, handle: WorkerHandle) -> list[int]:
    return [m.n for m in bench.workers.to(handle) if isinstance(m, wire.Threads)]


def test_an_llm_alone_gets_every_core_and_gives_half_to_a_voice_while_it_speaks(tmp_path: Path) -> None:
    bench = Bench(tmp_path, llms=chat_model(), cpu_threads="2")
    first = bench.ask(b"c1", "chat")
    chat = load_with_facts(bench, "chat")
    [load] = [m for m in bench.workers.to(chat) if isinstance(m, wire.Load)]
    assert load.spec.n_threads == 2, "alone, the LLM loads with the whole budget"
    spoken = bench.ask(b"c2", "a")
    voice = bench.load("a")
    [voice_load] = [m for m in bench.workers.to(voice) if isinstance(m, wire.Load)]
    assert voice_load.spec.n_threads == 1, "a speech engine cannot change its threads later: it gets half"
    assert threads_sent(bench, chat) == [1], "the voice started: the LLM steps on what it leaves"
    assert model_entry(bench.slot("chat"), time.time())["threads"] == 1
    bench.say(voice, wire.Done(rid=spoken.key, result={}))
    assert threads_sent(bench, chat) == [1, 2], "the voice is done: the LLM gets every core back"
    bench.say(chat, wire.Done(rid=first.key, result={}))
    third = bench.ask(b"c3", "chat")
    assert threads_sent(bench, chat) == [1, 2], "nothing changed for it: nothing is sent"
    assert runs(bench.workers, chat)[-1] == third.key


def test_the_new_share_reaches_the_worker_before_the_run_that_needs_it(tmp_path: Path) -> None:
    bench = Bench(tmp_path, llms=chat_model(), cpu_threads="2")
    speaking = bench.ask(b"c1", "a")
    bench.load("a")
    bench.ask(b"c2", "chat")
    chat = load_with_facts(bench, "chat")
    [load] = [m for m in bench.workers.to(chat) if isinstance(m, wire.Load)]
    assert load.spec.n_threads == 1, "loaded while the voice speaks: the share left beside it"
    bench.say(bench.worker("a"), wire.Done(rid=speaking.key, result={}))
    assert [type(m) for m in bench.workers.to(chat)] == [wire.Load, wire.Run, wire.Threads]
    assert threads_sent(bench, chat) == [2]


@pytest.mark.parametrize(("cpu_threads", "fields", "loaded_with"), [("0", {}, None), ("2", {"n_threads": 1}, 1)])
def test_threads_the_yaml_decides_are_never_handed_out(
    tmp_path: Path, cpu_threads: str, fields: dict, loaded_with: int | None
) -> None:
    bench = Bench(tmp_path, llms=chat_model(**fields), cpu_threads=cpu_threads)
    bench.ask(b"c1", "chat")
    chat = load_with_facts(bench, "chat")
    bench.ask(b"c2", "a")
    voice = bench.load("a")
    [load] = [m for m in bench.workers.to(chat) if isinstance(m, wire.Load)]
    [voice_load] = [m for m in bench.workers.to(voice) if isinstance(m, wire.Load)]
    assert load.spec.n_threads == loaded_with
    assert voice_load.spec.n_threads == (None if cpu_threads == "0" else 1)
    assert threads_sent(bench, chat) == []


@pytest.mark.parametrize(
    ("budget", "computing", "expected"),
    [
        (2, [("llm", 0)], {"llm": 2}),
        (2, [("llm", 0), ("whisper", 1)], {"llm": 1}),
        (3, [("b", 0), ("a", 0)], {"a": 2, "b": 1}),
        (16, [("a", 0), ("b", 0), ("whisper", 8)], {"a": 4, "b": 4}),
        (2, [("llm", 0), ("whisper", 1), ("voice", 1)], {"llm": 1}),  # never none, even past the budget
        (4, [("whisper", 2)], {}),
    ],
)
def test_the_cores_left_by_fixed_shares_are_split_among_the_computing_llms(
    budget: int, computing: list[tuple[str, int]], expected: dict[str, int]
) -> None:
    users = [threads.Computing(name, held or 1, adjustable=held == 0) for name, held in computing]
    assert threads.shares(budget, users) == expected


def test_a_voice_request_takes_a_kept_sequence_while_chat_streams_fill_the_others(tmp_path: Path) -> None:
    """parallel 2 and one voice sequence: two chats run, a third waits; a voice request starts at once beside them,
    a second voice request waits for a place; the waits per latency class are in status."""
    bench = Bench(tmp_path, llms=chat_model(parallel=2, voice_sequences=1), cpu_threads="2")
    chats = [bench.ask(b"c1", "chat"), bench.ask(b"c2", "chat")]
    chat = load_with_facts(bench, "chat")
    waiting = bench.ask(b"c3", "chat")
    spoken = bench.ask(b"v1", "chat", priority=protocol.PRIORITY_INTERACTIVE)
    assert runs(bench.workers, chat) == [chats[0].key, chats[1].key, spoken.key], "the voice request went ahead"
    second = bench.ask(b"v2", "chat", priority=90)
    assert runs(bench.workers, chat)[-1] == spoken.key, "three sequences, three requests: the next one waits"
    bench.say(chat, wire.Done(rid=chats[0].key, result={}))
    assert runs(bench.workers, chat)[-1] == second.key, "a freed sequence goes to the voice request first"
    assert len(bench.slot("chat").running) == 3 and len(bench.slot("chat").queue) == 1, "the chat still waits"
    bench.say(chat, wire.Done(rid=spoken.key, result={}))
    assert runs(bench.workers, chat)[-1] == waiting.key, "one chat and one voice running: a chat may start"
    entry = model_entry(bench.slot("chat"), time.time())
    assert (entry["parallel"], entry["voice_sequences"]) == (2, 1)
    assert entry["waits"]["voice"]["count"] == 1 and entry["waits"]["chat"]["count"] == 1, "the requests answered"


def test_without_voice_sequences_a_voice_request_waits_like_any_other(tmp_path: Path) -> None:
    bench = Bench(tmp_path, llms=chat_model(parallel=2, voice_sequences=0), cpu_threads="2")
    chats = [bench.ask(b"c1", "chat"), bench.ask(b"c2", "chat")]
    chat = load_with_facts(bench, "chat")
    spoken = bench.ask(b"v1", "chat", priority=protocol.PRIORITY_INTERACTIVE)
    assert runs(bench.workers, chat) == [c.key for c in chats]
    bench.say(chat, wire.Done(rid=chats[0].key, result={}))
    assert runs(bench.workers, chat)[-1] == spoken.key
