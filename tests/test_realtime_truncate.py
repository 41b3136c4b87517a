"""What the Realtime API keeps of an answer the person did not hear to the end: ``conversation.item.truncate`` (the
client saying how much it played) and a barge-in without one (real-time playback from the first audio delta) cut the
answer and the session's history to the words that audio holds. The history is checked by the next turn's prompt
size against the manager's own count for the messages it should hold, not by what the model says."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest

from gateway.audio_codecs import OPENAI_PCM_RATE
from gateway.realtime_items import AssistantItem, cut_at_word
from personas.pieces import speakable
from tests.conftest import stack_config
from tests.test_gateway import Stack, running_stack
from tests.test_realtime import spoken, until

STORYTELLER = "You are a storyteller. Tell long stories, rich in detail, in plain English."
STORY = "Tell me a long story about a dragon who learns to cook."
THANKS = "Thank you."
WORDS_PER_S = 4.5  # faster than Piper speaks any English (about 2.5 to 3 words a second)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack({}, stack_config) as running:
        yield running


def audio_ms(events: list) -> float:
    pcm = sum(len(base64.b64decode(e.delta)) for e in events if e.type == "response.output_audio.delta")
    return pcm * 1000 / (2 * OPENAI_PCM_RATE)


def prompt_tokens(stack: Stack, messages: list[dict]) -> int:
    """The manager's count of Jarvis's prompt for ``messages`` after the system prompt."""
    with stack.client() as client:
        reply = client.chat("smollm2", [{"role": "system", "content": STORYTELLER}, *messages], max_tokens=1)
    return reply.usage.prompt_tokens


def storyteller(conn, vad: bool) -> None:
    assert conn.recv().type == "session.created"
    session = {"type": "realtime", "instructions": STORYTELLER}
    if not vad:
        session["audio"] = {"input": {"turn_detection": None}}
    conn.session.update(session=session)
    until(conn, "session.updated")


def say(conn, text: str) -> str:
    """A typed user message; its item id."""
    conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )
    return until(conn, "conversation.item.added")[-1].item.id


def next_prompt(conn) -> int:
    """The next turn's prompt size (text only: its words do not matter here)."""
    conn.session.update(
        session={"type": "realtime", "output_modalities": ["text"], "audio": {"input": {"turn_detection": None}}}
    )
    until(conn, "session.updated")
    say(conn, THANKS)
    conn.response.create()
    done = until(conn, "response.done")[-1].response
    assert done.status == "completed", done
    return done.usage.input_tokens


def words(text: str) -> list[str]:
    return speakable(text).split()


def test_truncate_cuts_the_answer_and_the_history_to_the_audio_played(stack: Stack) -> None:
    with stack.openai.realtime.connect(model="jarvis") as conn:
        storyteller(conn, vad=False)
        user_id = say(conn, STORY)
        conn.response.create()
        events = until(conn, "response.done")
        done = events[-1].response
        assert done.status == "completed", done
        [message] = done.output
        full, sent_ms = message.content[0].transcript, audio_ms(events)
        assert sent_ms > 3000, "a story of a few seconds at least"

        refused = []
        for item_id, end_ms in (("item_nobody", 0), (user_id, 0), (message.id, int(sent_ms) + 500)):
            conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=end_ms)
            event = conn.recv()
            assert event.type == "error", event
            refused.append((event.error.code, event.error.param))
        assert refused == [
            ("invalid_value", "item_id"),
            ("invalid_value", "item_id"),
            ("invalid_value", "audio_end_ms"),
        ]

        cut_ms = int(sent_ms * 0.4)
        conn.conversation.item.truncate(item_id=message.id, content_index=0, audio_end_ms=cut_ms)
        truncated = conn.recv()
        assert truncated.type == "conversation.item.truncated", truncated
        assert (truncated.item_id, truncated.content_index, truncated.audio_end_ms) == (message.id, 0, cut_ms)
        conn.conversation.item.retrieve(item_id=message.id)
        item = until(conn, "conversation.item.retrieved")[-1].item
        heard = item.content[0].transcript
        assert words(heard) == words(full)[: len(words(heard))], (heard, full)
        assert 0.15 <= len(words(heard)) / len(words(full)) <= 0.65, (heard, full)

        conn.conversation.item.truncate(item_id=message.id, content_index=0, audio_end_ms=cut_ms + 1000)
        assert conn.recv().error.param == "audio_end_ms", "the audio now ends where it was cut"

        prompt = next_prompt(conn)
    asked = [{"role": "user", "content": STORY}]
    thanks = [{"role": "user", "content": THANKS}]
    assert prompt == prompt_tokens(stack, [*asked, {"role": "assistant", "content": heard}, *thanks])
    assert prompt < prompt_tokens(stack, [*asked, {"role": "assistant", "content": full}, *thanks])


def barge_in(stack: Stack, conn) -> tuple[list, str, float, float]:
    """A story, spoken over once a second of it has played, or three seconds of it have arrived, or it has all gone
    out (a fast server sends it all long before it has played): its events, the item's id, the seconds from the
    question to the end of the barge-in, and from the first audio delta to the barge-in."""
    stop = spoken(stack, "Stop, please.")
    chunk = OPENAI_PCM_RATE * 2 * 40 // 1000
    say(conn, STORY)
    asked_at = time.monotonic()
    conn.response.create()
    events = until(conn, "response.output_audio.delta")
    first_at = time.monotonic()
    while time.monotonic() - first_at < 1.0 and audio_ms(events) < 3000 and events[-1].type != "response.done":
        events.append(conn.recv())
    barged_at = time.monotonic()
    for start in range(0, len(stop) // 2, chunk):  # the first half: enough to be speech
        conn.input_audio_buffer.append(audio=base64.b64encode(stop[start : start + chunk]).decode())
    events += until(
        conn, "response.done" if events[-1].type != "response.done" else "input_audio_buffer.speech_started"
    )
    [item_id] = {e.item.id for e in events if e.type == "response.output_item.added"}
    return events, item_id, time.monotonic() - asked_at, barged_at - first_at


def retrieved(conn, item_id: str):
    conn.conversation.item.retrieve(item_id=item_id)
    return until(conn, "conversation.item.retrieved")[-1].item


def test_speech_over_an_answer_keeps_what_real_time_playback_reached(stack: Stack) -> None:
    """Without a truncate, the history keeps what playing the audio from its first delta had reached when the person
    spoke, not every piece sent (the server sends far faster than real time), whether the answer was still being
    made (it is cancelled) or had all gone out."""
    with stack.openai.realtime.connect(model="jarvis") as conn:
        storyteller(conn, vad=True)
        events, item_id, asked_s, played_s = barge_in(stack, conn)
        done = next(e.response for e in events if e.type == "response.done")
        item = retrieved(conn, item_id)
        heard = item.content[0].transcript
        if done.status == "cancelled":
            assert done.status_details.reason == "turn_detected", done
            assert done.usage is not None and done.usage.output_tokens > 0, done.usage
            [message] = done.output
            assert message.status == "incomplete" and message.content[0].transcript == heard, message
        if audio_ms(events) > (asked_s + 1) * 1000:  # more was sent than could have played
            assert item.status == "incomplete", item
        written = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert words(heard) == words(written)[: len(words(heard))], (heard, written)
        assert len(words(heard)) <= WORDS_PER_S * asked_s + 3, (heard, asked_s, audio_ms(events))
        if played_s >= 0.8:  # a second had played: some words of it were heard
            assert words(heard), (played_s, audio_ms(events))
        prompt = next_prompt(conn)
    said = [{"role": "user", "content": STORY}, {"role": "assistant", "content": heard}] if heard else []
    assert prompt == prompt_tokens(stack, [*said, {"role": "user", "content": THANKS}])


def test_a_truncate_after_speech_over_an_answer_sets_what_the_history_keeps(stack: Stack) -> None:
    """The client's usual answer to speech_started: stop playing, then say how much played."""
    with stack.openai.realtime.connect(model="jarvis") as conn:
        storyteller(conn, vad=True)
        events, item_id, _, _ = barge_in(stack, conn)
        played = int(audio_ms(events) * 0.6)
        conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=played)
        assert until(conn, "conversation.item.truncated")[-1].audio_end_ms == played
        heard = retrieved(conn, item_id).content[0].transcript
        assert words(heard), "over a second of speech was played"
        prompt = next_prompt(conn)
    said = [{"role": "user", "content": STORY}, {"role": "assistant", "content": heard}]
    assert prompt == prompt_tokens(stack, [*said, {"role": "user", "content": THANKS}])


# ----- the mapping from audio to words, without a server ---------------------------------------------------------


def test_a_cut_keeps_whole_words_only() -> None:
    assert cut_at_word("Once upon a time", 1.0) == "Once upon a time"
    assert cut_at_word("Once upon a time", 0.6) == "Once upon"
    assert cut_at_word("Once upon a time", 0.5) == "Once"  # 8 characters: "Once upo", and "upo" was not heard
    assert cut_at_word("Once upon a time", 0.3) == "Once"
    assert cut_at_word("Once upon a time", 0.1) == ""


def test_heard_maps_milliseconds_onto_the_pieces() -> None:
    item = AssistantItem("item_1", 1, [])
    item.spoke("Once upon a time,", True, 1000.0)
    item.spoke("there was a dragon.", True, 1200.0)
    item.spoke("It cooked.", True, 500.0)
    assert item.audio_ms == 2700.0
    assert item.heard(0) == ""
    assert item.heard(1000) == "Once upon a time,"
    assert item.heard(1600) == "Once upon a time, there was"
    assert item.heard(2699.5) == "Once upon a time, there was a dragon. It cooked."


def test_playback_starts_at_the_first_delta_and_waits_for_late_ones() -> None:
    item = AssistantItem("item_1", 1, [])
    item.deltas = [(10.0, 1000.0), (10.1, 1000.0), (14.0, 500.0)]  # the third came after a 2 s gap in playback
    assert item.played_ms(10.0) == 0
    assert item.played_ms(10.5) == pytest.approx(500)
    assert item.played_ms(11.5) == pytest.approx(1500)
    assert item.played_ms(13.0) == pytest.approx(2000)
    assert item.played_ms(14.25) == pytest.approx(2250)
    assert item.played_ms(20.0) == pytest.approx(2500)
