"""OpenAI's Realtime API through the gateway, real end to end: the `openai` package's realtime client against the
manager's models (Whisper, the persona's LLM, Piper), and raw WebSocket peers for what that client cannot send."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator

import jsonschema
import numpy as np
import openai
import pytest
from websockets.sync.client import connect

from gateway.audio_codecs import OPENAI_PCM_RATE, resample
from tests.conftest import stack_config, wait_for
from tests.test_gateway import WEATHER, Stack, running_stack

QUESTION = "What is the capital of France?"
SILENCE_S = 1.0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack({}, stack_config) as running:  # the shipped personas: Jarvis answers
        yield running


def until(conn, kind: str, limit: int = 5000) -> list:
    """Every event up to and including the first of type ``kind``."""
    events = []
    for _ in range(limit):
        event = conn.recv()
        events.append(event)
        if event.type == kind:
            return events
    raise AssertionError(f"no {kind} in {[e.type for e in events][-20:]}")


def spoken(stack: Stack, text: str) -> bytes:
    """``text`` in Piper's voice as 24 kHz pcm16, then a second of silence (the end of the utterance)."""
    with stack.client() as client:
        speech = client.synthesize(text, format="pcm")
    pcm = resample(speech.audio.pcm, speech.audio.sample_rate, OPENAI_PCM_RATE)
    return pcm + b"\0\0" * int(OPENAI_PCM_RATE * SILENCE_S)


def heard(stack: Stack, pcm: bytes) -> str:
    with stack.client() as client:
        return client.transcribe(pcm, format="pcm", sample_rate=OPENAI_PCM_RATE, language="en").text


def words(text: str) -> set[str]:
    """The words of three letters or more, punctuation aside ("(Spain's Peak)" and "spain's peak." share two)."""
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3}


def test_a_typed_question_is_answered_in_speech_and_the_next_turn_reuses_the_cache(stack: Stack) -> None:
    with stack.openai.realtime.connect(model="jarvis") as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        until(conn, "session.updated")
        usage = []
        for text in (QUESTION, "And the capital of Spain?"):
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
            conn.conversation.item.create(item=item)
            conn.response.create()
            events = until(conn, "response.done")
            kinds = [e.type for e in events]
            assert "response.created" in kinds and "response.output_audio.done" in kinds, kinds
            transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
            audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
            done = events[-1].response
            assert done.status == "completed" and transcript.strip(), kinds
            assert len(audio) > OPENAI_PCM_RATE, "at least half a second of speech"
            said = heard(stack, audio).lower()
            if transcript.isascii():  # an English Whisper cannot hear a reply the model sampled in French
                assert words(said) & words(transcript), (said, transcript)
            assert said.strip(), "the audio is speech"
            usage.append(done.usage)
        assert usage[1].input_token_details.cached_tokens >= usage[0].input_tokens, "turn 1 stayed in the cache"


def test_a_spoken_question_is_heard_transcribed_and_answered(stack: Stack) -> None:
    pcm = spoken(stack, QUESTION)
    chunk = OPENAI_PCM_RATE * 2 * 40 // 1000  # 40 ms
    with stack.openai.realtime.connect(model="jarvis") as conn:
        assert conn.recv().type == "session.created"
        for start in range(0, len(pcm), chunk):
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[start : start + chunk]).decode())
        events = until(conn, "response.done")
    kinds = [e.type for e in events]
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "response.created"):
        assert kind in kinds, kinds
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped")
    [transcript] = [e.transcript for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    assert "capital" in transcript.lower() and "france" in transcript.lower(), transcript
    assert any(e.type == "response.output_audio.delta" for e in events)


def test_bad_events_get_error_events_and_the_session_goes_on(stack: Stack) -> None:
    url = stack.url.replace("http://", "ws://") + "/v1/realtime?model=jarvis"
    with connect(url, max_size=None) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        big = base64.b64encode(b"\0" * 10_000_000).decode()
        sent = [
            "not json",
            json.dumps({"type": "no.such.event"}),
            json.dumps([1, 2]),
            json.dumps({"type": "input_audio_buffer.append", "audio": big}),
            json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}),
            json.dumps({"type": "response.create"}),
        ]
        codes = []
        for message in sent:
            ws.send(message)
            event = json.loads(ws.recv())
            assert event["type"] == "error", event
            codes.append(event["error"]["code"])
        assert codes == [
            "invalid_json",
            "unknown_event",
            "invalid_event",
            "audio_too_large",
            "invalid_value",
            "invalid_value",
        ]
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        assert json.loads(ws.recv())["type"] == "session.updated", "the session went on"
    with connect(stack.url.replace("http://", "ws://") + "/v1/realtime?model=nobody") as ws:
        event = json.loads(ws.recv())
        assert event["type"] == "error" and event["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        stack.openai.responses.retrieve("resp_" + "0" * 32)  # the gateway keeps serving HTTP


def test_speech_over_an_answer_stops_it(stack: Stack) -> None:
    """Barge-in: the person speaks while the answer plays; its audio stops and the response ends cancelled."""
    pcm = spoken(stack, "Stop, please.")
    chunk = OPENAI_PCM_RATE * 2 * 40 // 1000
    with stack.openai.realtime.connect(model="jarvis") as conn:
        assert conn.recv().type == "session.created"
        story = "Tell me a long story about a dragon who learns to cook, with many details."
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": story}]}
        conn.conversation.item.create(item=item)
        conn.response.create()
        until(conn, "response.output_audio.delta")
        for start in range(0, len(pcm) // 2, chunk):  # the first half: enough to be speech
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[start : start + chunk]).decode())
        events = until(conn, "response.done")
    kinds = [e.type for e in events]
    assert "input_audio_buffer.speech_started" in kinds, kinds
    after = kinds[kinds.index("input_audio_buffer.speech_started") :]
    assert after.count("response.output_audio.delta") <= 1, "the audio went on after the person spoke"
    assert events[-1].response.status == "cancelled"


def test_a_function_call_goes_out_and_its_output_comes_back(stack: Stack) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER}
    with stack.openai.realtime.connect(model="jarvis") as conn:
        assert conn.recv().type == "session.created"
        session = {"type": "realtime", "output_modalities": ["text"], "tools": [tool], "tool_choice": "required"}
        conn.session.update(session=session)
        until(conn, "session.updated")
        ask = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}
        conn.conversation.item.create(item=ask)
        conn.response.create()
        events = until(conn, "response.done")
        [call] = events[-1].response.output
        assert call.type == "function_call" and call.name == "get_weather", events[-1].response
        jsonschema.validate(json.loads(call.arguments), WEATHER)
        kinds = [e.type for e in events]
        assert "response.function_call_arguments.done" in kinds, kinds
        conn.session.update(session={"type": "realtime", "tool_choice": "none"})
        until(conn, "session.updated")
        output = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny", "celsius": 21}'}
        conn.conversation.item.create(item=output)
        conn.response.create()
        done = until(conn, "response.done")[-1].response
    assert done.status == "completed" and done.output[0].type == "message" and done.output[0].content[0].text
    assert done.usage.input_token_details.cached_tokens > 0, "the call's turn stayed in the cache"


def test_binary_frames_and_any_text_get_an_answer_and_the_session_stays(stack: Stack) -> None:
    url = stack.url.replace("http://", "ws://") + "/v1/realtime?model=jarvis"
    junk: list[str | bytes] = [
        b"\x00\xff" * 50,
        "",
        "{}",
        '{"type": 5}',
        '{"type": "session.update"}',
        '{"type": "conversation.item.create", "item": {"type": "function_call_output"}}',
        '{"type": "input_audio_buffer.commit"}',
        json.dumps({"type": "x" * 10_000}),
        '{"type": "event"}',  # names no client event, though a method of the session is called nearly that
        json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}),  # 3 bytes: not pcm16
    ]
    with connect(url, max_size=None) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        for message in junk:
            ws.send(message)
            assert json.loads(ws.recv())["type"] == "error", message[:80]
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        assert json.loads(ws.recv())["type"] == "session.updated"
    log = (stack.manager.run_dir / "gateway.log").read_text()
    assert "Traceback" not in log and "realtime_event_failed" not in log


def raw(stack: Stack, model: str = "jarvis"):
    """A WebSocket peer that sends what the ``openai`` client would not."""
    return connect(stack.url.replace("http://", "ws://") + f"/v1/realtime?model={model}", max_size=None)


def next_of(ws, kind: str) -> dict:
    """The next event of type ``kind`` (or an error, which ends the wait)."""
    for _ in range(5000):
        event = json.loads(ws.recv(timeout=120))
        if event["type"] in (kind, "error"):
            return event
    raise AssertionError(f"no {kind}")


def test_json_nested_at_any_depth_is_invalid_json_and_the_session_goes_on(stack: Stack) -> None:
    with raw(stack) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        for frame in (
            "[" * 100_000 + "]" * 100_000,
            '{"a":' * 100_000,
            '{"type": "session.update", "x": ' + "[" * 65 + "]" * 65 + "}",
        ):
            ws.send(frame)
            event = json.loads(ws.recv())
            assert event["type"] == "error" and event["error"]["code"] == "invalid_json", event
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        assert json.loads(ws.recv())["type"] == "session.updated", "the session went on"
    log = (stack.manager.run_dir / "gateway.log").read_text()
    assert "RecursionError" not in log and "realtime_event_failed" not in log


BAD_UPDATES = [
    (
        {"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": -500}}}},
        "session.audio.input.turn_detection.silence_duration_ms",
    ),
    (
        {"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 7}}}},
        "session.audio.input.turn_detection.threshold",
    ),
    (
        {"audio": {"input": {"turn_detection": {"type": "server_vad", "prefix_padding_ms": "300"}}}},
        "session.audio.input.turn_detection.prefix_padding_ms",
    ),
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}, "session.audio.input.turn_detection.type"),
    ({"tool_choice": {"type": "function", "name": "no_such_tool"}}, "session.tool_choice"),
    ({"tool_choice": "sometimes"}, "session.tool_choice"),
    ({"tools": {"type": "function", "name": "f"}}, "session.tools"),
    ({"tools": [{"type": "mcp", "name": "f"}]}, "session.tools[0].type"),
    ({"output_modalities": ["video"]}, "session.output_modalities"),
    ({"output_modalities": "audio"}, "session.output_modalities"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "session.audio.input.format.rate"),
    ({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "session.audio.input.format.type"),
    ({"audio": {"output": {"format": {"type": "audio/pcma"}}}}, "session.audio.output.format.type"),
    ({"audio": {"output": {"voice": 5}}}, "session.audio.output.voice"),
    ({"audio": {"output": {"speed": 9}}}, "session.audio.output.speed"),
    ({"max_output_tokens": 0}, "session.max_output_tokens"),
    ({"type": "transcription"}, "session.type"),
    ({"model": "someone-else"}, "session.model"),
    ({"instructions": 5}, "session.instructions"),
]


@pytest.mark.parametrize(("bad", "param"), BAD_UPDATES, ids=[p for _, p in BAD_UPDATES])
def test_a_session_update_with_a_bad_field_is_refused_whole(stack: Stack, bad: dict, param: str) -> None:
    """Each refusal names the field, and nothing of the update applies, not even its good fields."""
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER}
    with raw(stack) as ws:
        created = json.loads(ws.recv())["session"]
        update = {"type": "realtime", "instructions": "CHANGED", "output_modalities": ["text"], "tools": [tool]}
        ws.send(json.dumps({"type": "session.update", "session": {**update, **bad}}))
        event = json.loads(ws.recv())
        assert event["type"] == "error", event
        assert (event["error"]["code"], event["error"]["param"]) == ("invalid_value", param), event
        ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
        after = next_of(ws, "session.updated")
        assert after["type"] == "session.updated", after
        assert after["session"] == created, "the refused update changed the session"


def test_an_unknown_session_field_is_refused_and_a_good_update_applies(stack: Stack) -> None:
    with raw(stack) as ws:
        created = json.loads(ws.recv())["session"]
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": "X", "voices": "alloy"}}))
        event = json.loads(ws.recv())
        assert (event["error"]["code"], event["error"]["param"]) == ("unknown_parameter", "session.voices"), event
        vad = {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 400, "prefix_padding_ms": 200}
        ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": vad}}}}))
        session = next_of(ws, "session.updated")["session"]
    assert session["instructions"] == created["instructions"]
    detection = session["audio"]["input"]["turn_detection"]
    assert {k: detection[k] for k in vad} == vad


def test_cancel_with_nothing_running_is_an_error_and_the_session_goes_on(stack: Stack) -> None:
    with stack.openai.realtime.connect(model="jarvis") as conn:
        assert conn.recv().type == "session.created"
        conn.response.cancel()
        event = conn.recv()
        assert event.type == "error" and event.error.code == "response_cancel_not_active", event
        conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
        assert conn.recv().type == "session.updated"


def test_clients_that_go_away_mid_answer_leave_one_line_each_and_no_traceback(stack: Stack) -> None:
    log_path = stack.manager.run_dir / "gateway.log"
    gone_before = log_path.read_text().count('"client_gone"')
    ask = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}
    for n in range(4):  # each way of going: with a closing handshake or none, at a transcript or an audio delta
        with raw(stack) as ws:
            assert json.loads(ws.recv())["type"] == "session.created"
            ws.send(json.dumps({"type": "conversation.item.create", "item": ask}))
            ws.send(json.dumps({"type": "response.create"}))
            kind = "response.output_audio.delta" if n % 2 else "response.output_audio_transcript.delta"
            assert next_of(ws, kind)["type"] == kind
            if n % 3 == 0:
                ws.socket.close()  # no closing handshake: the connection is just gone
    wait_for(lambda: log_path.read_text().count('"client_gone"') >= gone_before + 4, timeout=300, interval=0.2)
    text = log_path.read_text()
    assert "Task exception was never retrieved" not in text and "Traceback" not in text, text[-3000:]
    with stack.openai.realtime.connect(model="jarvis") as conn:  # and the gateway serves on
        assert conn.recv().type == "session.created"


def test_an_item_is_kept_as_served_not_as_sent(stack: Stack) -> None:
    """A client's extra fields are neither kept for the session's life nor sent back (a megabyte each would grow the
    session by as much per item)."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}], "x": "y" * 100_000}
    with raw(stack) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        added = next_of(ws, "conversation.item.added")["item"]
        ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": added["id"]}))
        kept = next_of(ws, "conversation.item.retrieved")["item"]
    assert "x" not in added and kept == added and kept["content"] == item["content"], kept


def speech_bounds(pcm: bytes, rate: int = OPENAI_PCM_RATE) -> tuple[float, float]:
    """Where the speech is in ``pcm``: the first and last 10 ms louder than -40 dBFS, in ms."""
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float32)
    window = rate // 100
    rms = np.sqrt(np.mean(samples[: len(samples) // window * window].reshape(-1, window) ** 2, axis=1))
    loud = np.nonzero(rms > 32768 * 10 ** (-40 / 20))[0]
    return loud[0] * 10.0, (loud[-1] + 1) * 10.0


def test_speech_events_say_where_the_speech_is_in_the_sessions_audio(stack: Stack) -> None:
    lead = b"\0\0" * (OPENAI_PCM_RATE * 3 // 2)  # 1.5 s of silence before the question
    pcm = lead + spoken(stack, QUESTION)
    onset, end = speech_bounds(pcm)
    chunk = OPENAI_PCM_RATE * 2 * 50 // 1000
    with stack.openai.realtime.connect(model="jarvis") as conn:
        session = conn.recv().session
        vad = session.audio.input.turn_detection
        for start in range(0, len(pcm), chunk):
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[start : start + chunk]).decode())
        events = until(conn, "input_audio_buffer.committed")
    [started] = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    [stopped] = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    assert started.item_id == stopped.item_id == events[-1].item_id
    # The start includes prefix_padding_ms before the speech was detected; detection takes a few 30 ms frames.
    assert onset - vad.prefix_padding_ms - 60 <= started.audio_start_ms <= onset + 200, (started, onset)
    # The end includes silence_duration_ms after the speech.
    assert end - 30 <= stopped.audio_end_ms <= end + vad.silence_duration_ms + 250, (stopped, end)
    assert stopped.audio_end_ms <= len(pcm) * 1000 / (2 * OPENAI_PCM_RATE)
