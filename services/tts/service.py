"""The TTS service: text in (``tts.say`` from any publisher, or a direct request), audio out on ``tts.audio``.

Its SUB socket is bound, so any number of agents connect their PUB sockets to it and publish ``tts.say``. Each
utterance is one streamed ``synthesize`` request to the manager; every sentence's PCM is published under
``tts.audio`` the moment it arrives (a player starts while the rest is still being made), then a last message
with ``final: true``. With ``output_dir`` set, the utterance is also written there as a WAV file.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq

from daemonkit.binding import Binder, CurveServer, prepare_ipc_dir, remove_ipc_file
from daemonkit.dispatcher import Dispatcher
from daemonkit.publisher import HEARTBEAT_S, EventPublisher, Heartbeat
from daemonkit.request_socket import MAX_TEXT_MESSAGE_BYTES, RequestSocket
from model_client import protocol
from model_client.audio import pcm_to_wav
from model_client.errors import BadRequest, ModelManagerError
from personas.speech_services import TOPIC_AUDIO, TOPIC_SAY, TOPIC_TTS_HEARTBEAT, TTS_OPS, SayArgs, TtsSettings

TICK_S = 0.1

log = structlog.get_logger("services.tts")


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:64] or "session"


class TtsService:
    def __init__(self, settings: TtsSettings, manager_endpoint: str, curve: CurveServer | None = None) -> None:
        self.settings = settings
        self.ctx = zmq.Context()
        for endpoint in (settings.requests, settings.say, settings.events):
            prepare_ipc_dir(endpoint)
        self.binder = Binder(self.ctx, curve)
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, MAX_TEXT_MESSAGE_BYTES)
        self.binder.bind(self.frontend, settings.requests, "services.tts.requests")
        self.requests = RequestSocket(self.frontend, TTS_OPS, MAX_TEXT_MESSAGE_BYTES)
        self.say = self.ctx.socket(zmq.SUB)
        self.say.setsockopt(zmq.LINGER, 0)
        self.say.setsockopt(zmq.MAXMSGSIZE, MAX_TEXT_MESSAGE_BYTES)  # any local process may publish to it
        self.say.setsockopt(zmq.SUBSCRIBE, TOPIC_SAY.encode())
        self.binder.bind(self.say, settings.say, "services.tts.say")
        self.poller = zmq.Poller()
        self.started_at = time.monotonic()
        self.events = EventPublisher(
            self.ctx,
            settings.events,
            lambda s, e: self.binder.bind(s, e, "services.tts.events"),
            self.poller,
            heartbeat=Heartbeat(
                TOPIC_TTS_HEARTBEAT,
                lambda: {"pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started_at, 1)},
                HEARTBEAT_S,
            ),
        )
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.say, zmq.POLLIN)
        self.manager = Dispatcher(manager_endpoint, self.poller, timeout=settings.manager_timeout_s, context=self.ctx)
        self.output_dir = Path(settings.output_dir) if settings.output_dir else None
        if self.output_dir:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.utterance_ids = itertools.count(1)
        self.stopping = False

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("tts_started", requests=self.settings.requests, say=self.settings.say, events=self.settings.events)
        while not self.stopping or self.manager.pending:
            ready = dict(self.poller.poll(TICK_S * 1000))
            if self.frontend in ready:
                self.requests.drain(self._on_request)
            if self.say in ready:
                while self.say.get(zmq.EVENTS) & zmq.POLLIN:
                    self._on_say(self.say.recv_multipart())
            if self.manager.sock in ready:
                self.manager.on_readable()
            if self.events.sock in ready:
                self.events.on_readable()
            self.manager.check()
            self.events.tick(time.monotonic())
        self.manager.close()
        for sock in (self.frontend, self.say):
            sock.close(linger=0)
        self.events.close()
        self.binder.close()
        self.ctx.term()
        for endpoint in (self.settings.requests, self.settings.say, self.settings.events):
            remove_ipc_file(endpoint)
        log.info("tts_stopped")

    def _stop(self, _signum: int, _frame: Any) -> None:
        self.stopping = True

    # ----- input ----------------------------------------------------------------------------------------------

    def _on_say(self, frames: list[bytes]) -> None:
        """A published ``tts.say``: nobody waits for an answer, so a bad one is logged and dropped."""
        try:
            _topic, body = protocol.decode_event(frames)
            if not isinstance(body, dict):
                raise BadRequest(f"a tts.say body is a map, got {type(body).__name__}")
            fields = {k: v for k, v in body.items() if k in SayArgs.__struct_fields__}
            args = msgspec.convert(fields, SayArgs)
            self._speak(args)
        except (ModelManagerError, msgspec.ValidationError, ValueError, IndexError) as exc:
            log.warning("say_rejected", error=str(exc))
        except Exception:  # anyone may publish here: nothing they send may end the service
            log.exception("say_crashed")

    def _on_request(self, route: list[bytes], request: protocol.Request, args: Any) -> None:
        if request.op == "ping":
            self.requests.reply(route, request.id, {"pong": True, "service": "tts"})
        else:
            self._speak(args, route, request.id)

    # ----- speaking -------------------------------------------------------------------------------------------

    def _speak(self, args: SayArgs, route: list[bytes] | None = None, request_id: str | None = None) -> None:
        if not args.text.strip():
            raise BadRequest("text is empty: there is nothing to say")
        utterance_id = f"{args.session_id}-{next(self.utterance_ids)}"
        received = time.monotonic()
        parts: list[bytes] = []
        first: dict[str, float] = {}
        meta = {"session_id": args.session_id, "utterance_id": utterance_id, "turn_id": args.turn_id, "part": args.part}

        def on_chunk(chunk: dict[str, Any], payloads: tuple[bytes, ...]) -> None:
            pcm = payloads[0] if payloads else b""
            first.setdefault("ms", (time.monotonic() - received) * 1000)
            parts.append(pcm)
            event = {
                **meta,
                "seq": chunk["seq"],
                "final": False,
                "sample_rate": chunk["sample_rate"],
                "sample_width": chunk["sample_width"],
                "channels": chunk["channels"],
            }
            self.events.send_multipart(protocol.encode_event(TOPIC_AUDIO, event, time.time(), (pcm,)))

        def on_result(result: dict[str, Any], _payloads: tuple[bytes, ...]) -> None:
            total_ms = (time.monotonic() - received) * 1000
            timings = {
                **result["timings"],
                "first_audio_ms": round(first.get("ms", total_ms), 2),
                "service_ms": round(total_ms, 2),
            }
            pcm = b"".join(parts)
            wav_path = None
            if self.output_dir is not None:
                wav_path = self.output_dir / f"{_file_safe(utterance_id)}.wav"
                wav_path.write_bytes(pcm_to_wav(pcm, result["sample_rate"], result["sample_width"], result["channels"]))
            final = {
                **meta,
                "seq": len(parts),
                "final": True,
                "text": args.text,
                "voice": result["model"],
                "sample_rate": result["sample_rate"],
                "sample_width": result["sample_width"],
                "channels": result["channels"],
                "duration_s": result["duration_s"],
                "timings": timings,
                "wav": str(wav_path) if wav_path else None,
            }
            self.events.send_multipart(protocol.encode_event(TOPIC_AUDIO, final, time.time()))
            log.info("spoken", utterance_id=utterance_id, audio_s=result["duration_s"], **timings)
            if route is not None:
                payloads = ()
                if args.return_audio:
                    payloads = (pcm_to_wav(pcm, result["sample_rate"], result["sample_width"], result["channels"]),)
                self.requests.reply(route, request_id, final, payloads)

        def on_error(error: ModelManagerError) -> None:
            log.warning("synthesis_failed", utterance_id=utterance_id, code=error.code, message=error.message)
            failed = {**meta, "final": True, "error": error.to_wire()}
            self.events.send_multipart(protocol.encode_event(TOPIC_AUDIO, failed, time.time()))
            if route is not None:
                self.requests.reply_error(route, request_id, error)

        request = {
            "text": args.text,
            "voice": args.voice or self.settings.voice,
            "speed": args.speed,
            "format": "pcm",
            "stream": True,
        }
        self.manager.submit("synthesize", request, on_result, on_error, on_chunk=on_chunk)
