"""The STT and TTS services as separate processes beside the real manager: audio and text in on their
sockets, transcripts and audio out on their PUB sockets."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from model_client import ModelClient, protocol
from model_client.audio import Audio, read_wav
from model_client.errors import BadRequest, InvalidAudio
from personas.speech_services import TOPIC_AUDIO, TOPIC_SAY, TOPIC_STT_HEARTBEAT, TOPIC_TRANSCRIPT, TOPIC_TTS_HEARTBEAT
from tests.conftest import DaemonProcess, ManagerProcess, base_config, next_event, subscriber, wait_for
from tests.test_speech import wer

QUESTION = "What is the capital of France?"
REQUEST = "Please turn off the lights in the kitchen."


@dataclass
class Stack:
    manager: ManagerProcess
    stt: DaemonProcess
    tts: DaemonProcess
    services: dict
    watch_dir: Path
    output_dir: Path


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    run = Path(tempfile.mkdtemp(prefix="mm-"))
    config = base_config(run)
    watch_dir, output_dir = run / "inbox", run / "spoken"
    watch_dir.mkdir()
    config["services"] = {
        "stt": {
            "requests": f"ipc://{run}/stt.sock",
            "events": f"ipc://{run}/stt-events.sock",
            "model": "whisper",
            "watch_dir": str(watch_dir),
            "watch_interval_s": 0.2,
        },
        "tts": {
            "requests": f"ipc://{run}/tts.sock",
            "say": f"ipc://{run}/tts-say.sock",
            "events": f"ipc://{run}/tts-events.sock",
            "voice": "joe",
            "output_dir": str(output_dir),
        },
    }
    manager = ManagerProcess(run, config)
    services = config["services"]
    stt = DaemonProcess("services.stt", manager.config_path, services["stt"]["requests"], run / "stt.log")
    tts = DaemonProcess("services.tts", manager.config_path, services["tts"]["requests"], run / "tts.log")
    try:  # whatever started is stopped, also when a start fails
        for daemon in (manager, stt, tts):
            daemon.start()
        yield Stack(manager, stt, tts, services, watch_dir, output_dir)
    finally:
        for daemon in (stt, tts, manager):
            daemon.stop()
        shutil.rmtree(run, ignore_errors=True)


def speak(stack: Stack, text: str) -> Audio:
    with stack.manager.client(timeout=60) as client:
        return client.synthesize(text, voice="joe").audio


def test_a_clip_comes_back_as_a_published_transcript(stack: Stack) -> None:
    transcripts = subscriber(stack.services["stt"]["events"], TOPIC_TRANSCRIPT, heartbeat=TOPIC_STT_HEARTBEAT)
    wav = speak(stack, QUESTION).to_wav()
    with ModelClient(stack.stt.endpoint, timeout=60) as stt:
        reply = stt.request("stt.clip", {"session_id": "kitchen"}, payloads=(wav,))
    topic, event, _ = next_event(transcripts)
    transcripts.close()
    assert topic == TOPIC_TRANSCRIPT
    assert event["session_id"] == "kitchen" and event["source"] == "clip" and event["utterance"] == 1
    assert wer(QUESTION, event["text"]) < 0.2, event["text"]
    assert event["timings"]["service_ms"] >= event["timings"]["total_ms"] > 0
    assert reply["text"] == event["text"]


def test_a_live_stream_is_cut_into_utterances(stack: Stack) -> None:
    first, second = speak(stack, QUESTION), speak(stack, REQUEST)
    rate = first.sample_rate
    silence = bytes(2 * rate)  # one second
    stream = silence + first.pcm + silence + second.pcm + silence[:rate]  # the last pause is short: stop flushes
    transcripts = subscriber(stack.services["stt"]["events"], TOPIC_TRANSCRIPT, heartbeat=TOPIC_STT_HEARTBEAT)
    chunk = 2 * rate // 10  # 100 ms, like a microphone callback
    with ModelClient(stack.stt.endpoint, timeout=60) as stt:
        stt.request("stt.start", {"session_id": "mic-1", "sample_rate": rate})
        for start in range(0, len(stream), chunk):
            stt.request("stt.audio", {"session_id": "mic-1"}, payloads=(stream[start : start + chunk],))
        assert stt.request("stt.stop", {"session_id": "mic-1"})["utterances"] == 2
    events = sorted((next_event(transcripts)[1] for _ in range(2)), key=lambda e: e["utterance"])
    transcripts.close()
    assert [e["session_id"] for e in events] == ["mic-1", "mic-1"]
    assert wer(QUESTION, events[0]["text"]) < 0.2, events[0]["text"]
    assert wer(REQUEST, events[1]["text"]) < 0.2, events[1]["text"]


def test_files_dropped_in_the_watch_dir_are_transcribed(stack: Stack) -> None:
    (stack.watch_dir / "note.wav").write_bytes(speak(stack, REQUEST).to_wav())
    result = stack.watch_dir / "note.wav.transcript.json"
    wait_for(result.exists, timeout=60)
    event = json.loads(result.read_text())
    assert event["source"] == "file" and event["session_id"] == "note"
    assert wer(REQUEST, event["text"]) < 0.2, event["text"]


def test_bad_input_to_the_stt_service_gets_typed_errors(stack: Stack) -> None:
    with ModelClient(stack.stt.endpoint, timeout=60) as stt:
        with pytest.raises(InvalidAudio):
            stt.request("stt.clip", {"session_id": "x"}, payloads=(b"not audio" * 50,))
        with pytest.raises(BadRequest, match="stt.start first"):
            stt.request("stt.audio", {"session_id": "never-started"}, payloads=(b"\x00\x00",))
        with pytest.raises(BadRequest, match="one non-empty binary frame"):
            stt.request("stt.clip", {"session_id": "x"})
        with pytest.raises(BadRequest, match="sample_rate"):
            stt.request("stt.start", {"session_id": "x", "sample_rate": "fast"})
        assert stt.request("ping")["pong"] is True


def test_published_say_comes_out_as_audio_chunks_and_a_wav(stack: Stack) -> None:
    audio = subscriber(stack.services["tts"]["events"], TOPIC_AUDIO, heartbeat=TOPIC_TTS_HEARTBEAT)
    # An XPUB is a PUB that hears the subscriptions: the service's own tells it the one message will arrive.
    publisher = zmq.Context.instance().socket(zmq.XPUB)
    publisher.setsockopt(zmq.LINGER, 1000)
    publisher.connect(stack.services["tts"]["say"])
    assert publisher.poll(10_000) and publisher.recv() == b"\x01" + TOPIC_SAY.encode()
    text = "Paris is the capital of France. It is a beautiful city."
    publisher.send_multipart(protocol.encode_event(TOPIC_SAY, {"text": text, "session_id": "s-42"}, time.time()))
    chunks = []
    while True:
        topic, event, payloads = next_event(audio)
        assert topic == TOPIC_AUDIO and event["session_id"] == "s-42"
        if event["final"]:
            break
        assert event["sample_rate"] == 22050 and payloads and len(payloads[0]) > 1000
        chunks.append(payloads[0])
    publisher.close()
    audio.close()
    assert len(chunks) == 2, "one chunk per sentence"
    assert event["timings"]["first_audio_ms"] < event["timings"]["service_ms"]
    wav = read_wav(Path(event["wav"]).read_bytes())
    assert wav.pcm == b"".join(chunks)
    with stack.manager.client(timeout=60) as client:
        heard = client.transcribe(wav.to_wav(), model="whisper").text
    assert wer(text, heard) < 0.2, heard


def test_a_direct_say_request_returns_the_wav_and_bad_ones_get_errors(stack: Stack) -> None:
    with ModelClient(stack.tts.endpoint, timeout=60) as tts:
        reply = tts.call("tts.say", {"text": REQUEST, "session_id": "direct", "return_audio": True})
        assert reply.type == "result" and reply.body["final"] and reply.body["voice"] == "joe"
        assert read_wav(reply.payloads[0]).duration_s == pytest.approx(reply.body["duration_s"], abs=0.01)
        with pytest.raises(BadRequest, match="text is empty"):
            tts.request("tts.say", {"text": " "})
        with pytest.raises(Exception, match="voice 'nobody'"):
            tts.request("tts.say", {"text": "Hello.", "voice": "nobody"})
        assert tts.request("ping")["pong"] is True
