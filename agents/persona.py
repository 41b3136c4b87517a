"""A persona agent: hears transcripts, answers the ones routed to it, speaks the answer as it streams.

Per turn: ``stt.transcript`` arrives (or ``agent.ask`` on the agent's own socket) -> ``route`` says whether this
persona answers -> a streamed ``chat`` to the manager with the session's history and a stable
``conversation_id`` (``<persona>:<session>``, so the manager reuses the session's KV cache) -> each speakable
piece goes to the TTS service as ``tts.say`` while the rest is still being generated -> ``agent.reply`` with the
text, usage and timings. When the persona's model cannot be served, its ``fallback`` persona answers and the
reply says so. The agent also listens to ``tts.audio`` to log the whole latency breakdown of each turn.

Turns run one at a time per persona; messages that arrive meanwhile wait in the sockets' queues.
"""

from __future__ import annotations

import os
import signal
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq

from daemonkit.binding import Binder, CurveServer, prepare_ipc_dir, remove_ipc_file
from daemonkit.publisher import HEARTBEAT_S, EventPublisher, Heartbeat
from daemonkit.request_socket import MAX_TEXT_MESSAGE_BYTES, RequestSocket
from model_client import protocol
from model_client.client import ModelClient, Stream
from model_client.errors import ModelManagerError
from model_client.results import Completion
from personas.config import AGENT_OPS, TOPIC_HEARTBEAT, TOPIC_REPLY, AgentsConfig, AskArgs, Persona, route
from personas.history import SESSIONS_IN_MEMORY, Histories  # turn counters kept for as many sessions
from personas.speech_services import TOPIC_AUDIO, TOPIC_SAY, TOPIC_TRANSCRIPT, ServicesConfig
from personas.turn import PersonaTurn

TICK_S = 0.1
OPEN_TURNS = 64  # turns whose audio is still awaited for the breakdown log

log = structlog.get_logger("agents")


class PersonaAgent:
    def __init__(
        self,
        name: str,
        config: AgentsConfig,
        services: ServicesConfig,
        manager_endpoint: str,
        curve: CurveServer | None = None,
    ) -> None:
        if name not in config.personas:
            raise ValueError(f"unknown persona {name!r}; the YAML declares {sorted(config.personas)}")
        self.name = name
        self.persona = config.personas[name]
        self.config = config
        self.settings = config.agents
        self.client = ModelClient(
            manager_endpoint, timeout=self.settings.manager_timeout_s, priority=protocol.PRIORITY_INTERACTIVE
        )
        self.ctx = zmq.Context()
        self.requests_endpoint = config.requests_endpoint(name)
        self.events_endpoint = config.events_endpoint(name)
        for endpoint in (self.requests_endpoint, self.events_endpoint):
            prepare_ipc_dir(endpoint)
        self.binder = Binder(self.ctx, curve)
        self.requests = self._socket(zmq.ROUTER, bind=self.requests_endpoint)
        self.server = RequestSocket(self.requests, AGENT_OPS, MAX_TEXT_MESSAGE_BYTES)
        self.say = self._socket(zmq.PUB, connect=services.tts.say)
        self.transcripts = self._socket(zmq.SUB, connect=services.stt.events, topic=TOPIC_TRANSCRIPT)
        self.audio = self._socket(zmq.SUB, connect=services.tts.events, topic=TOPIC_AUDIO)
        self.poller = zmq.Poller()
        self.started_at = time.monotonic()
        self.events = EventPublisher(
            self.ctx,
            self.events_endpoint,
            lambda s, e: self.binder.bind(s, e, f"agents ({name})"),
            self.poller,
            heartbeat=Heartbeat(
                TOPIC_HEARTBEAT,
                lambda: {"persona": name, "pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started_at, 1)},
                HEARTBEAT_S,
            ),
        )
        for sock in (self.requests, self.transcripts, self.audio):
            self.poller.register(sock, zmq.POLLIN)
        self.turn_counts: OrderedDict[str, int] = OrderedDict()
        self.open_turns: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.devices_checked: set[str] = set()
        history_dir = Path(self.settings.history_dir) / name if self.settings.history_dir else None
        self.histories = Histories(history_dir, self.settings.max_history_messages, name)
        self.stopping = False

    def _socket(self, kind: int, bind: str | None = None, connect: str | None = None, topic: str = "") -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if bind:
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_TEXT_MESSAGE_BYTES)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        if bind:
            self.binder.bind(sock, bind, f"agents ({self.name})")
        if connect:
            sock.connect(connect)
        return sock

    # ----- the loop -------------------------------------------------------------------------------------------

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("agent_started", persona=self.name, model=self.persona.model, requests=self.requests_endpoint)
        while not self.stopping:
            ready = dict(self.poller.poll(TICK_S * 1000))
            if self.requests in ready:
                self.server.drain(self._on_request)
            if self.transcripts in ready:
                while self.transcripts.get(zmq.EVENTS) & zmq.POLLIN:
                    self._on_transcript(self.transcripts.recv_multipart())
            if self.audio in ready:
                while self.audio.get(zmq.EVENTS) & zmq.POLLIN:
                    self._on_audio(self.audio.recv_multipart())
            if self.events.sock in ready:
                self.events.on_readable()
            self.events.tick(time.monotonic())
        self.client.close()
        for sock in (self.requests, self.say, self.transcripts, self.audio):
            sock.close(linger=0)
        self.events.close()
        self.binder.close()
        self.ctx.term()
        for endpoint in (self.requests_endpoint, self.events_endpoint):
            remove_ipc_file(endpoint)
        log.info("agent_stopped", persona=self.name)

    def _stop(self, _signum: int, _frame: Any) -> None:
        self.stopping = True

    def _on_transcript(self, frames: list[bytes]) -> None:
        try:
            _topic, event = protocol.decode_event(frames)
            text = str(event.get("text") or "").strip()
            session_id = str(event.get("session_id") or "default")
            chosen = route(text, self.config.personas, self.config.routing, explicit=event.get("persona"))
        except (ModelManagerError, ValueError, IndexError) as exc:
            log.warning("transcript_rejected", error=str(exc))
            return
        if not text or chosen.persona != self.name:
            return
        try:
            self.turn(session_id, text, chosen.reason, chosen.detail, transcript=event)
        except ModelManagerError:
            pass  # logged and published as a failed agent.reply; the next turn starts afresh

    def _on_request(self, route: list[bytes], request: protocol.Request, args: Any) -> None:
        if request.op == "ping":
            self.server.reply(route, request.id, {"pong": True, "persona": self.name, "sessions": len(self.histories)})
            return
        assert isinstance(args, AskArgs)
        self.server.reply(route, request.id, self.turn(args.session_id, args.text, "explicit", "agent.ask"))

    # ----- one turn -------------------------------------------------------------------------------------------

    def turn(
        self, session_id: str, text: str, reason: str, detail: str, transcript: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        started = time.monotonic()
        count = self.turn_counts.pop(session_id, 0) + 1
        self.turn_counts[session_id] = count
        if len(self.turn_counts) > SESSIONS_IN_MEMORY:
            self.turn_counts.popitem(last=False)
        turn_id = f"{self.name}:{session_id}:{count}"
        turn = PersonaTurn(
            self.config.personas, self.histories, self.name, session_id, text, self.settings.first_piece_words
        )
        while True:
            try:
                completion, first_say_ms = self._answer(turn, turn_id, started)
                break
            except ModelManagerError as exc:
                if not turn.fall_back(exc):
                    raise self._failed(session_id, turn_id, text, exc) from None
                log.warning(
                    "persona_fallback", persona=self.name, to=turn.answering, code=exc.code, message=exc.message
                )
        answer = turn.finish(completion)
        answered_by, persona, fallback = answer.answered_by, turn.persona, answer.fallback
        stt_ms = None
        if transcript is not None:
            stt_ms = transcript.get("timings", {}).get("service_ms")
        timings = {
            "stt_ms": stt_ms,
            "llm_ttft_ms": completion.timings.ttft_ms,
            "llm_total_ms": round((time.monotonic() - started) * 1000, 2),
            "first_say_ms": first_say_ms,
            "queue_ms": completion.timings.queue_ms,
        }
        reply = {
            "persona": self.name,
            "answered_by": answered_by,
            "display_name": persona.display_name or answered_by,
            "fallback": fallback,
            "session_id": session_id,
            "turn_id": turn_id,
            "heard": text,
            "route": {"reason": reason, "detail": detail},
            "text": answer.text,
            "parts": answer.parts,
            "model": completion.model,
            "voice": persona.voice,
            "usage": msgspec.to_builtins(completion.usage),
            "timings": timings,
        }
        self.events.send_multipart(protocol.encode_event(TOPIC_REPLY, reply, time.time()))
        self._remember_turn(turn_id, reply, transcript)
        self._check_device(persona, answered_by)
        log.info(
            "turn",
            persona=self.name,
            answered_by=answered_by,
            session_id=session_id,
            turn_id=turn_id,
            route=reason,
            prompt_tokens=completion.usage.prompt_tokens,
            cached_tokens=completion.usage.cached_tokens,
            **timings,
        )
        return reply

    def _answer(self, turn: PersonaTurn, turn_id: str, started: float) -> tuple[Completion, float | None]:
        """Stream the reply from the answering persona's model, sending each speakable piece to the TTS service."""
        op, args = turn.request()
        stream = self.client.generate(op, args, stream=True)
        assert isinstance(stream, Stream)
        first_say_ms = None
        for text in stream:
            for piece in turn.feed(text):
                first_say_ms = first_say_ms or round((time.monotonic() - started) * 1000, 2)
                self._say(turn.persona, turn.session_id, turn_id, piece.number, piece.text)
        if (rest := turn.flush()) is not None:
            first_say_ms = first_say_ms or round((time.monotonic() - started) * 1000, 2)
            self._say(turn.persona, turn.session_id, turn_id, rest.number, rest.text)
        assert stream.result is not None
        return stream.result, first_say_ms

    def _say(self, persona: Persona, session_id: str, turn_id: str, part: int, text: str) -> None:
        body = {
            "text": text,
            "voice": persona.voice,
            "speed": persona.speed,
            "session_id": session_id,
            "turn_id": turn_id,
            "part": part,
        }
        self.say.send_multipart(protocol.encode_event(TOPIC_SAY, body, time.time()))

    def _failed(self, session_id: str, turn_id: str, text: str, error: ModelManagerError) -> ModelManagerError:
        """Publish the failed turn; return the error for the caller to raise."""
        log.error("turn_failed", persona=self.name, session_id=session_id, code=error.code, message=error.message)
        reply = {
            "persona": self.name,
            "answered_by": None,
            "session_id": session_id,
            "turn_id": turn_id,
            "heard": text,
            "text": "",
            "parts": 0,
            "error": error.to_wire(),
        }
        self.events.send_multipart(protocol.encode_event(TOPIC_REPLY, reply, time.time()))
        return error

    def _check_device(self, persona: Persona, name: str) -> None:
        """Once per persona: say so in the log if its model runs somewhere else than the persona prefers."""
        if not persona.device or name in self.devices_checked:
            return
        self.devices_checked.add(name)
        try:
            models = {m["name"]: m for m in self.client.status()["models"]}
        except ModelManagerError:
            return
        placed = (models.get(persona.model) or {}).get("device") or ""
        if not placed.startswith(persona.device):
            log.warning("persona_device_mismatch", persona=name, preferred=persona.device, placed=placed)

    # ----- the latency breakdown, completed when the first audio of a turn is out ----------------------------

    def _remember_turn(self, turn_id: str, reply: dict[str, Any], transcript: dict[str, Any] | None) -> None:
        utterance_end = None
        if transcript is not None and transcript.get("time"):
            utterance_end = transcript["time"] - (transcript.get("timings", {}).get("service_ms") or 0) / 1000
        self.open_turns[turn_id] = {"timings": reply["timings"], "utterance_end": utterance_end}
        while len(self.open_turns) > OPEN_TURNS:
            self.open_turns.popitem(last=False)

    def _on_audio(self, frames: list[bytes]) -> None:
        try:
            _topic, event = protocol.decode_event(frames)
        except (ModelManagerError, IndexError):
            return
        turn = self.open_turns.get(str(event.get("turn_id")))
        if turn is None or event.get("part") != 0:
            return
        if not event.get("final"):
            turn.setdefault("first_audio_at", event["time"])
            return
        self.open_turns.pop(str(event["turn_id"]))
        first_audio_at = turn.get("first_audio_at")
        e2e = None
        if first_audio_at and turn["utterance_end"]:
            e2e = round((first_audio_at - turn["utterance_end"]) * 1000, 2)
        log.info(
            "turn_breakdown",
            persona=self.name,
            turn_id=event["turn_id"],
            **turn["timings"],
            tts_first_audio_ms=(event.get("timings") or {}).get("first_audio_ms"),
            first_audio_ms=e2e,
        )
