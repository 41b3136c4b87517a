"""The Wyoming service, real end to end: the manager and the service as processes, the real models, and the
``wyoming`` package's own client replaying what Home Assistant sends (its stt, tts and conversation integrations)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped
from zeroconf import Zeroconf

from daemonkit.process import DaemonProcess
from daemonkit.settings import ConfigError
from model_client.audio import Audio
from services.wyoming.config import load_wyoming_config
from tests.conftest import REPO, SHIPPED_CONFIG, ManagerProcess, json_values, rss_bytes, stack_config, wait_for
from tests.test_speech import wer

QUESTION = "What is the weather forecast for tomorrow morning?"
SATELLITE_RATE = 16000
CHUNK_MS = 20


class Service:
    def __init__(self, manager: ManagerProcess, daemon: DaemonProcess, ports: dict[str, int]) -> None:
        self.manager, self.daemon, self.ports = manager, daemon, ports
        assert daemon.proc is not None and daemon.log_path is not None
        self.proc, self.log = daemon.proc, daemon.log_path

    def client(self, port: str) -> AsyncTcpClient:
        return AsyncTcpClient("127.0.0.1", self.ports[port])

    def log_events(self, name: str) -> list[dict]:
        lines = [json.loads(x) for x in self.log.read_text().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("event") == name]

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def start_service(config_path: Path, log_path: Path, endpoint: str) -> tuple[DaemonProcess, dict[str, int]]:
    """The Wyoming service on ``config_path`` (``endpoint``: the manager's), once it listens: it and its ports."""
    ports_file = log_path.with_suffix(".ports.json")
    service = DaemonProcess("services.wyoming", config_path, endpoint, log_path, "--ports-file", str(ports_file))
    service.start(wait=False)
    return service, service.wait_ports(ports_file)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    run_dir = Path(tempfile.mkdtemp(prefix="mm-"))
    config = stack_config(run_dir)
    for persona in config["personas"].values():
        persona["generation"]["max_tokens"] = 24
    # A persona on a model that queues two requests at most: the third waiting gets `busy`.
    config["personas"]["hasty"] = {**config["personas"]["jarvis"], "model": "smollm2-short-queue", "wake_words": []}
    config["personas"]["hasty"]["fallback"] = None
    config["wyoming"].update(max_event_bytes=256 * 1024, max_audio_bytes=256 * 1024)
    config["wyoming"]["handle_ports"]["hasty"] = 0
    manager = ManagerProcess(run_dir, config)
    daemon: DaemonProcess | None = None
    try:
        manager.start()
        daemon, ports = start_service(manager.config_path, run_dir / "wyoming.log", manager.endpoint)
        yield Service(manager, daemon, ports)
    finally:
        if daemon is not None:
            daemon.stop(timeout=10)
        manager.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


async def exchange(
    client: AsyncTcpClient, *events: Event, until: tuple[str, ...], timeout: float = 60, past_errors: bool = False
) -> list[Event]:
    """Send ``events``, then read until an event of a type in ``until`` (or an error, unless ``past_errors``)."""
    for event in events:
        await client.write_event(event)
    received = []
    async with asyncio.timeout(timeout):
        while True:
            event = await client.read_event()
            assert event is not None, f"the connection closed after {[e.type for e in received]}"
            received.append(event)
            if event.type in until or (Error.is_type(event.type) and not past_errors):
                return received


def speech(service: Service, text: str, rate: int) -> bytes:
    """The manager's Piper voice saying ``text``, as s16 mono PCM at ``rate`` (a satellite's microphone)."""
    with service.manager.client(timeout=60) as client:
        audio = client.synthesize(text, format="pcm").audio
    samples = np.frombuffer(audio.pcm, dtype=np.int16).astype(np.float32)
    if rate != audio.sample_rate:
        times = np.arange(len(samples) * rate // audio.sample_rate) * (audio.sample_rate / rate)
        samples = np.interp(times, np.arange(len(samples)), samples)
    return samples.astype(np.int16).tobytes()


def satellite_events(pcm: bytes, rate: int, language: str | None = "en") -> list[Event]:
    """What Home Assistant sends an STT service: transcribe, audio-start, 20 ms chunks, audio-stop."""
    step = rate * 2 * CHUNK_MS // 1000
    chunks = [AudioChunk(rate=rate, width=2, channels=1, audio=pcm[i : i + step]) for i in range(0, len(pcm), step)]
    start = AudioStart(rate=rate, width=2, channels=1)
    return [Transcribe(language=language).event(), start.event(), *(c.event() for c in chunks), AudioStop().event()]


async def describe(service: Service, port: str) -> tuple[Info, float]:
    async with service.client(port) as client:
        started = time.monotonic()
        (event,) = await exchange(client, Describe().event(), until=("info",), timeout=5)
        return Info.from_event(event), time.monotonic() - started


# ----- describe -----------------------------------------------------------------------------------------------


def test_info_lists_every_model_and_persona_within_a_second_while_the_manager_is_busy(service: Service) -> None:
    async def run() -> dict[str, tuple[Info, float]]:
        async with service.client("jarvis") as busy:  # the manager generates meanwhile
            await busy.write_event(
                Transcript("Tell me a long story about the sea.", context={"conversation_id": "busy"}).event()
            )
            await busy.read_event()  # handled-start: the model is loaded and decoding
            infos = {port: await describe(service, port) for port in service.ports}
            await exchange(busy, until=("handled",))
        return infos

    infos = asyncio.run(run())
    assert all(seconds < 1.0 for _, seconds in infos.values()), {p: s for p, (_, s) in infos.items()}
    (asr,) = infos["asr"][0].asr
    assert [(m.name, m.languages) for m in asr.models] == [("whisper", ["en"])]
    (tts,) = infos["tts"][0].tts
    assert tts.supports_synthesize_streaming and [(v.name, v.languages) for v in tts.voices] == [("joe", ["en_US"])]
    assert not infos["asr"][0].tts and not infos["tts"][0].asr and not infos["asr"][0].handle
    for persona, display, model in (("jarvis", "Jarvis", "smollm2"), ("leonardo", "Leonardo", "gemma3-270m")):
        (handle,) = infos[persona][0].handle
        assert handle.name == display and handle.supports_handled_streaming
        assert [m.name for m in handle.models] == [model] and handle.models[0].installed


# ----- speech to text -------------------------------------------------------------------------------------------


def test_a_satellites_question_comes_back_as_a_transcript(service: Service) -> None:
    async def run(rate: int) -> str:
        async with service.client("asr") as client:
            events = await exchange(
                client, *satellite_events(speech(service, QUESTION, rate), rate), until=("transcript",)
            )
        return Transcript.from_event(events[-1]).text

    assert wer(QUESTION, asyncio.run(run(SATELLITE_RATE))) < 0.2
    assert wer(QUESTION, asyncio.run(run(22050))) < 0.2  # any rate: the manager resamples


# ----- text to speech -------------------------------------------------------------------------------------------


def transcribe(service: Service, pcm: bytes, rate: int) -> str:
    with service.manager.client(timeout=60) as client:
        return client.transcribe_pcm(Audio(pcm, rate, 2, 1), "whisper").text


def test_synthesize_gives_one_start_its_chunks_one_stop_and_whisper_hears_the_text(service: Service) -> None:
    text = "The kitchen lights are off. Good night."

    async def run() -> list[Event]:
        async with service.client("tts") as client:
            return await exchange(client, Synthesize(text=text).event(), until=("audio-stop",))

    events = asyncio.run(run())
    kinds = [e.type for e in events]
    assert kinds[0] == "audio-start" and kinds[-1] == "audio-stop" and kinds.count("audio-start") == 1
    assert set(kinds[1:-1]) == {"audio-chunk"} and len(kinds) > 3
    chunks = [AudioChunk.from_event(e) for e in events[1:-1]]
    rate = AudioStart.from_event(events[0]).rate
    assert {c.rate for c in chunks} == {rate}
    assert wer(text, transcribe(service, b"".join(c.audio for c in chunks), rate)) < 0.2


def test_streaming_synthesis_speaks_the_first_sentence_before_the_text_is_complete(service: Service) -> None:
    first, second = "Sure, the front door is locked now.", "Is there anything else I can do?"

    async def run() -> tuple[list[Event], list[Event]]:
        async with service.client("tts") as client:
            await client.write_event(SynthesizeStart().event())
            for word in first.split(" "):  # as an agent writes it, a few characters at a time
                await client.write_event(SynthesizeChunk(text=word + " ").event())
            before = await exchange(client, until=("audio-chunk",))  # heard before the rest of the text is sent
            await client.write_event(SynthesizeChunk(text=second).event())
            await client.write_event(
                Synthesize(text=f"{first} {second}").event()
            )  # Home Assistant's copy for old servers
            after = await exchange(client, SynthesizeStop().event(), until=("synthesize-stopped",))
            return before, after

    before, after = asyncio.run(run())
    kinds = [e.type for e in before + after]
    assert kinds[-1] == SynthesizeStopped().event().type and "error" not in kinds
    assert kinds.count("audio-start") == kinds.count("audio-stop") >= 2  # a start and a stop per piece
    assert kinds.index("audio-chunk") < len(before)
    pcm = b"".join(AudioChunk.from_event(e).audio for e in before + after if e.type == "audio-chunk")
    rate = AudioStart.from_event(next(e for e in before if e.type == "audio-start")).rate
    assert wer(f"{first} {second}", transcribe(service, pcm, rate)) < 0.2  # spoken once, in order


# ----- conversation ---------------------------------------------------------------------------------------------


def test_two_turns_of_one_conversation_reuse_its_cache_and_a_wake_word_hands_over(service: Service) -> None:
    async def turn(port: str, text: str, conversation: str) -> list[Event]:
        async with service.client(port) as client:
            context = {"conversation_id": conversation, "device_id": "kitchen-satellite"}
            return await exchange(client, Transcript(text, context=context, language="en").event(), until=("handled",))

    first = asyncio.run(turn("jarvis", "What is the capital of France?", "ha-conversation-1"))
    second = asyncio.run(turn("jarvis", "And what is the capital of Italy?", "ha-conversation-1"))
    for events in (first, second):
        kinds = [e.type for e in events]
        assert kinds[0] == HandledStart().event().type and kinds[-2:] == [HandledStop().event().type, "handled"]
        handled = Handled.from_event(events[-1])
        assert handled.text == "".join(HandledChunk.from_event(e).text for e in events[1:-2]).strip()
        assert handled.text and handled.context["conversation_id"] == "ha-conversation-1"
    turns = wait_for(lambda: (t := service.log_events("turn")) and len(t) >= 3 and t, timeout=5)
    mine = [t for t in turns if t["conversation_id"] == "ha-conversation-1"]
    assert mine[1]["cached_tokens"] > max(mine[0]["cached_tokens"], mine[0]["prompt_tokens"] // 2)
    asyncio.run(turn("jarvis", "Hey Leonardo, why is the sky blue?", "ha-conversation-2"))
    handed = wait_for(lambda: [t for t in service.log_events("turn") if t["conversation_id"] == "ha-conversation-2"])
    assert handed[0]["port_persona"] == "jarvis" and handed[0]["answered_by"] == "leonardo"


def test_a_busy_model_answers_with_an_error_event_and_the_other_turns_are_served(service: Service) -> None:
    async def turn(i: int) -> list[Event]:
        async with service.client("hasty") as client:
            context = {"conversation_id": f"busy-{i}"}
            return await exchange(
                client, Transcript(f"Count to {i + 20}.", context=context).event(), until=("handled",)
            )

    async def run() -> list[list[Event]]:
        return await asyncio.gather(*(turn(i) for i in range(5)))

    outcomes = [events[-1] for events in asyncio.run(run())]
    busy = [Error.from_event(e) for e in outcomes if Error.is_type(e.type)]
    assert busy and all(e.code == "busy" and e.text for e in busy)
    handled = sum(Handled.is_type(e.type) for e in outcomes)
    assert handled >= 2 and handled + len(busy) == len(outcomes)  # the queue's two (at least) were served


# ----- hostile and broken peers -------------------------------------------------------------------------------


async def raw(service: Service, port: str, data: bytes, then_describe: bool = False) -> list[Event]:
    """Write raw bytes; the events that come back until the service closes the connection (or, with
    ``then_describe``, until it answers a describe sent after them)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", service.ports[port])
    client = AsyncTcpClient("127.0.0.1", service.ports[port])
    client._reader, client._writer = reader, writer  # noqa: SLF001 - the package's framing over our raw socket
    writer.write(data)
    if then_describe:
        await client.write_event(Describe().event())
    received = []
    try:
        async with asyncio.timeout(10):
            while (event := await client.read_event()) is not None:
                received.append(event)
                if event.type == "info":
                    break
    finally:
        writer.close()
    return received


def errors(events: list[Event]) -> list[str]:
    return [Error.from_event(e).code or "" for e in events if Error.is_type(e.type)]


def test_bad_input_gets_a_typed_error_event_and_the_service_keeps_serving(service: Service) -> None:
    async def run() -> None:
        chunk = AudioChunk(rate=16000, width=2, channels=1, audio=bytes(640)).event()
        async with service.client("asr") as client:  # a chunk before audio-start: dropped, the connection goes on
            events = await exchange(client, chunk, Describe().event(), until=("info",), past_errors=True)
            assert errors(events) == ["audio_not_started"] and events[-1].type == "info"
            # An utterance over the PCM limit (256 KiB here): dropped with its error, the next audio-stop has none.
            big = AudioChunk(rate=16000, width=2, channels=1, audio=bytes(100_000)).event()
            events = await exchange(
                client,
                AudioStart(rate=16000, width=2, channels=1).event(),
                *[big] * 3,
                AudioStop().event(),
                Describe().event(),
                until=("info",),
                past_errors=True,
            )
            assert errors(events) == ["audio_too_long", "audio_not_started"]
            start = AudioStart(rate=16000, width=3, channels=1).event()
            events = await exchange(client, start, Describe().event(), until=("info",), past_errors=True)
            assert errors(events) == ["bad_audio_format"]
        async with service.client("tts") as client:
            events = await exchange(
                client, SynthesizeChunk(text="hello").event(), Describe().event(), until=("info",), past_errors=True
            )
            assert errors(events) == ["stream_not_started"]
        async with service.client("jarvis") as client:  # a transcript without its text
            bad = Event(type="transcript", data={"context": {}})
            events = await exchange(client, bad, Describe().event(), until=("info",), past_errors=True)
            assert errors(events) == ["bad_event"]
        # Framing that cannot be read further: an error event, then the connection is closed.
        for data in (
            b"this is not json\n",
            b"[1, 2, 3]\n",
            b'{"type": 7}\n',
            b'{"type": "audio-chunk", "payload_length": 4000000000}\n',  # no 4 GB is read, or buffered
            b'{"type": "audio-chunk", "data_length": -5}\n',
            b'{"type": "transcribe", "data_length": 3}\n[1]',
            b'{"type": "describe", "data": "' + b"x" * 100_000 + b'"}\n',  # a header over the line limit
        ):
            events = await raw(service, "asr", data)
            assert errors(events) == ["bad_event"], (data[:60], events)
        # A satellite that drops the connection mid-utterance, and one that leaves mid-header.
        for data in (
            b"".join(_frame(e) for e in satellite_events(bytes(64000), 16000)[:-1]),
            b'{"type": "audio-chunk", "payload_length": 6400}\n' + bytes(100),
        ):
            _reader, writer = await asyncio.open_connection("127.0.0.1", service.ports["asr"])
            writer.write(data)
            await writer.drain()
            writer.close()

    fds, rss = service.open_fds(), rss_bytes(service.proc.pid)
    asyncio.run(run())
    info, seconds = asyncio.run(describe(service, "asr"))
    assert info.asr and seconds < 1.0 and service.proc.poll() is None
    wait_for(lambda: service.open_fds() <= fds, timeout=5)  # every connection's socket closed
    assert rss_bytes(service.proc.pid) - rss < 64 * 1024 * 1024


def test_strict_types_depth_and_unknown_models_get_errors_in_words(service: Service) -> None:
    """Numbers as strings, a fractional rate, a text that is a number: bad_event in words, the connection goes on;
    an unknown transcribe.name: model_not_found; a header nested 30,000 deep: bad_event, then the connection ends,
    and nothing of it reaches the log as a traceback."""

    async def run() -> None:
        async with service.client("asr") as client:
            for bad in (
                Event(type="audio-start", data={"rate": "16000", "width": 2, "channels": 1}),
                Event(type="audio-start", data={"rate": 16000.5, "width": 2, "channels": 1}),
                Event(type="transcribe", data={"name": 7}),
            ):
                events = await exchange(client, bad, Describe().event(), until=("info",), past_errors=True)
                assert errors(events) == ["bad_event"], bad
                text = Error.from_event(events[0]).text or ""
                assert bad.type in text and "Error(" not in text and "KeyError" not in text, text
            unknown = Transcribe(name="no-such-whisper").event()
            events = await exchange(client, unknown, Describe().event(), until=("info",), past_errors=True)
            assert errors(events) == ["model_not_found"] and "whisper" in (Error.from_event(events[0]).text or "")
        async with service.client("tts") as client:
            bad = Event(type="synthesize", data={"text": 42})
            events = await exchange(client, bad, Describe().event(), until=("info",), past_errors=True)
            assert errors(events) == ["bad_event"] and "text" in (Error.from_event(events[0]).text or "")
        deep = b'{"type": "describe", "data": {"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}\n"  # under 64 KiB
        events = await raw(service, "asr", deep)
        assert errors(events) == ["bad_event"] and "nested deeper" in (Error.from_event(events[0]).text or "")
        events = await raw(service, "asr", b'{"type": "describe", "data": {"n": ' + str(2**70).encode() + b"}}\n")
        assert errors(events) == ["bad_event"]

    asyncio.run(run())
    info, seconds = asyncio.run(describe(service, "asr"))
    assert info.asr and seconds < 2.0 and service.proc.poll() is None
    assert "Traceback" not in service.log.read_text() and "RecursionError" not in service.log.read_text()


def _frame(event: Event) -> bytes:
    header = {"type": event.type, "data": event.data}
    if event.payload:
        header["payload_length"] = len(event.payload)
    return json.dumps(header).encode() + b"\n" + (event.payload or b"")


def test_zeroconf_announces_the_port_to_home_assistant(service: Service) -> None:
    config = yaml.safe_load(service.manager.config_path.read_text())
    config["wyoming"] = {"host": "0.0.0.0", "allow_remote": True, "zeroconf": True, "asr_port": 0}
    config.update(wyoming={**config["wyoming"], "tts_port": None, "handle_ports": {}})
    path = service.manager.run_dir / "zeroconf.yaml"
    path.write_text(yaml.safe_dump(config))
    announcer, ports = start_service(path, service.manager.run_dir / "zeroconf.log", service.manager.endpoint)
    port = ports["asr"]  # any free port was asked for: the one announced is the one bound
    browser = Zeroconf()
    try:
        found = browser.get_service_info("_wyoming._tcp.local.", "model-manager-stt._wyoming._tcp.local.", 10_000)
        assert found is not None and found.port == port and found.parsed_addresses()
    finally:
        browser.close()
        announcer.stop(timeout=10)


def test_a_manager_that_is_down_gets_an_error_event_and_describe_still_answers(service: Service) -> None:
    service.manager.stop(signal.SIGKILL)
    try:

        async def run() -> tuple[list[Event], float]:
            started = time.monotonic()
            async with service.client("tts") as client:
                events = await exchange(client, Synthesize(text="Hello.").event(), until=("audio-stop",), timeout=20)
            return events, time.monotonic() - started

        events, seconds = asyncio.run(run())
        assert errors(events) == ["timeout"] and "not reachable" in Error.from_event(events[-1]).text
        assert seconds < 10
        info, describe_s = asyncio.run(describe(service, "tts"))
        assert info.tts and describe_s < 1.0
    finally:
        service.manager.start()


# ----- the YAML -------------------------------------------------------------------------------------------------


def test_the_shipped_wyoming_section_validates_and_unsafe_or_wrong_ones_are_refused(tmp_path: Path) -> None:
    config = load_wyoming_config(SHIPPED_CONFIG)
    assert config.settings.host == "127.0.0.1" and not config.settings.allow_remote
    assert set(config.settings.handle_ports) == set(config.agents.personas)
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    for change, message in (
        ({"host": "0.0.0.0"}, "no authentication"),
        ({"handle_ports": {"sherlock": 10700}}, "not a persona"),
        ({"tts_port": 10300}, "share a port"),
        ({"max_conections": 3}, "max_conections"),
        ({"zeroconf": True}, "zeroconf announces"),
    ):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({**shipped, "wyoming": {**shipped["wyoming"], **change}}))
        with pytest.raises(ConfigError, match=message):
            load_wyoming_config(path)
    path.write_text(
        yaml.safe_dump({**shipped, "wyoming": {**shipped["wyoming"], "host": "0.0.0.0", "allow_remote": True}})
    )
    assert load_wyoming_config(path).settings.allow_remote


def test_the_error_codes_docs_wyoming_md_lists_are_the_ones_the_service_sends() -> None:
    doc = (REPO / "docs" / "wyoming.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.MULTILINE))
    source = "".join(p.read_text(encoding="utf-8") for p in (REPO / "services" / "wyoming").glob("*.py"))
    # Each error's code is the call's last argument, a string literal.
    sent = set(re.findall(r'\.error\((?:[^()]|\([^()]*\))*?"([a-z_]+)",?\s*\)', source, re.DOTALL))
    assert "bad_event" in documented and sent - {"busy"} == documented, (sent, documented)


# ----- fuzz: whatever arrives on a port ---------------------------------------------------------------------------

EVENT_TYPES = ["transcribe", "audio-start", "audio-chunk", "audio-stop", "synthesize", "synthesize-start"]
EVENT_TYPES += ["synthesize-chunk", "synthesize-stop", "transcript", "describe", "ping", "x"]
DATA_VALUES = json_values(size=3, max_leaves=10)
DATA_KEYS = st.sampled_from(["rate", "width", "channels", "text", "name", "language", "voice", "timestamp"])
HEADERS = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(EVENT_TYPES), DATA_VALUES)},
    optional={
        "data": st.one_of(st.dictionaries(DATA_KEYS, DATA_VALUES, max_size=4), DATA_VALUES),
        "data_length": st.one_of(st.integers(min_value=-5, max_value=64), DATA_VALUES),
        "payload_length": st.one_of(st.integers(min_value=-5, max_value=2**40), DATA_VALUES),
    },
)
STREAMS = st.one_of(
    st.binary(max_size=400),
    st.lists(st.tuples(HEADERS, st.binary(max_size=80)), min_size=1, max_size=4).map(
        lambda events: b"".join(json.dumps(h).encode() + b"\n" + tail for h, tail in events)
    ),
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(port=st.sampled_from(["asr", "tts", "jarvis"]), data=STREAMS)
def test_arbitrary_bytes_on_a_port_leave_the_service_answering_within_2_s(
    service: Service, port: str, data: bytes
) -> None:
    async def send() -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", service.ports[port])
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    asyncio.run(send())
    info, seconds = asyncio.run(describe(service, port))
    assert seconds < 2.0 and service.proc.poll() is None
    log = service.log.read_text()
    assert "Traceback" not in log and "wyoming_connection_failed" not in log, log[-2000:]
