"""One spoken turn through the whole loop, as a user would have it: ``mm talk question.wav``.

The clip goes to the STT service like a microphone's utterance; the transcript is routed to a persona agent,
whose streamed answer the TTS service speaks sentence by sentence. This module listens to all three (the
transcript, the agent's reply, the audio), puts the reply's audio together and measures the turn:

- ``stt_ms``: the STT service's time from receiving the clip to publishing its transcript;
- ``llm_ttft_ms`` / ``llm_first_piece_ms`` / ``llm_total_ms``: the agent's model, its first token, the first
  piece of text sent to be spoken (from the agent's start of the turn), the whole reply;
- ``tts_first_audio_ms``: the TTS service's time from the first piece of text to its first audio;
- ``first_audio_ms``: from the end of the utterance (the clip sent) to the first reply audio here;
- ``end_to_end_ms``: from the clip sent to the last reply audio here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from model_client import protocol
from model_client.audio import Audio
from model_client.errors import ModelManagerError, Timeout, error_from_wire
from personas.config import TOPIC_REPLY, load_agents_config
from personas.speech_services import TOPIC_AUDIO, TOPIC_TRANSCRIPT, load_services_config

SUBSCRIBE_SETTLE_S = 0.3  # a new SUB socket misses what is published before its subscription arrives


@dataclass
class Turn:
    session_id: str
    transcript: dict[str, Any] | None = None
    reply: dict[str, Any] | None = None
    audio_events: list[tuple[dict[str, Any], bytes, float]] = field(default_factory=list)
    first_audio_at: dict[str, float] = field(default_factory=dict)  # turn_id -> arrival (monotonic)
    finals: dict[str, dict[int, tuple[dict[str, Any], float]]] = field(default_factory=dict)

    def done(self) -> bool:
        if self.reply is None:
            return False
        if self.reply.get("error") or not self.reply.get("parts"):
            return True
        return len(self.finals.get(self.reply["turn_id"], {})) >= self.reply["parts"]

    def audio(self) -> Audio | None:
        """The reply's pieces in order, joined."""
        assert self.reply is not None
        mine = [(e, pcm) for e, pcm, _ in self.audio_events if e.get("turn_id") == self.reply["turn_id"]]
        if not mine:
            return None
        mine.sort(key=lambda item: (item[0]["part"], item[0]["seq"]))
        first = mine[0][0]
        pcm = b"".join(p for _, p in mine)
        return Audio(pcm, first["sample_rate"], first["sample_width"], first["channels"])


def talk(
    audio_file: bytes,
    persona: str | None = None,
    session_id: str | None = None,
    timeout: float = 120.0,
    config: Path | None = None,
) -> dict[str, Any]:
    """Put one utterance into the loop; return what was heard, the reply, its audio and the breakdown."""
    services = load_services_config(config)
    agents = load_agents_config(config)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in (TOPIC_TRANSCRIPT, TOPIC_REPLY, TOPIC_AUDIO):
        sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sub.connect(services.stt.events)
    sub.connect(services.tts.events)
    for name in agents.personas:
        sub.connect(agents.events_endpoint(name))
    stt = ctx.socket(zmq.DEALER)
    stt.setsockopt(zmq.LINGER, 0)
    stt.connect(services.stt.requests)
    turn = Turn(session_id or f"talk-{uuid.uuid4().hex[:8]}")
    try:
        time.sleep(SUBSCRIBE_SETTLE_S)
        args = {"session_id": turn.session_id, "source": "talk", "persona": persona}
        request = protocol.Request(op="stt.clip", args=args, payloads=(audio_file,))
        stt.send_multipart([b"", *protocol.encode_request(request)])
        sent = time.monotonic()
        deadline = sent + timeout
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(stt, zmq.POLLIN)
        while not turn.done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(_missing(turn), session_id=turn.session_id)
            ready = dict(poller.poll(left * 1000))
            if stt in ready:
                reply = protocol.decode_reply(stt.recv_multipart()[1:])
                if reply.type == protocol.REPLY_ERROR:
                    raise error_from_wire(reply.body)
                if not str(reply.body.get("text", "")).strip():
                    turn.transcript = reply.body
                    break  # nothing was heard, so nobody will answer
            if sub in ready:
                while sub.get(zmq.EVENTS) & zmq.POLLIN:
                    _on_event(turn, sub.recv_multipart(), time.monotonic())
        if turn.reply is not None and turn.reply.get("error"):
            raise error_from_wire(turn.reply["error"])
        return _summary(turn, sent)
    finally:
        sub.close(linger=0)
        stt.close(linger=0)


def _on_event(turn: Turn, frames: list[bytes], now: float) -> None:
    try:
        topic, event = protocol.decode_event(frames)
    except (ModelManagerError, IndexError):
        return
    if event.get("session_id") != turn.session_id:
        return
    if topic == TOPIC_TRANSCRIPT:
        turn.transcript = event
    elif topic == TOPIC_REPLY:
        turn.reply = event
    elif topic == TOPIC_AUDIO:
        turn_id = str(event.get("turn_id"))
        if event.get("final"):
            turn.finals.setdefault(turn_id, {})[int(event.get("part", 0))] = (event, now)
        elif len(frames) > 2:
            turn.first_audio_at.setdefault(turn_id, now)
            turn.audio_events.append((event, frames[2], now))


def _missing(turn: Turn) -> str:
    if turn.transcript is None:
        return "no transcript came back: is the STT service running?"
    if turn.reply is None:
        return "no persona answered: is an agent running for the persona this routes to?"
    return "the reply's audio did not all arrive: is the TTS service running?"


def _summary(turn: Turn, sent: float) -> dict[str, Any]:
    transcript, reply = turn.transcript or {}, turn.reply
    result: dict[str, Any] = {"session_id": turn.session_id, "heard": transcript.get("text", ""), "reply": None}
    if reply is None:
        return result
    turn_id = reply["turn_id"]
    finals = turn.finals.get(turn_id, {})
    first_final = finals.get(0, ({}, None))[0]
    last_at = max((at for _, at in finals.values()), default=None)
    first_at = turn.first_audio_at.get(turn_id)
    timings = reply.get("timings") or {}
    result.update(
        persona=reply["persona"],
        answered_by=reply["answered_by"],
        fallback=reply.get("fallback"),
        route=reply.get("route"),
        reply=reply["text"],
        usage=reply.get("usage"),
        audio=turn.audio(),
        stt_timings=transcript.get("timings"),
        breakdown={
            "stt_ms": (transcript.get("timings") or {}).get("service_ms"),
            "llm_ttft_ms": timings.get("llm_ttft_ms"),
            "llm_first_piece_ms": timings.get("first_say_ms"),
            "llm_total_ms": timings.get("llm_total_ms"),
            "tts_first_audio_ms": (first_final.get("timings") or {}).get("first_audio_ms"),
            "first_audio_ms": round((first_at - sent) * 1000, 1) if first_at else None,
            "end_to_end_ms": round((last_at - sent) * 1000, 1) if last_at else None,
        },
    )
    return result
