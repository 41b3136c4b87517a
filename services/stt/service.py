"""The STT service: audio in from producers, transcripts out on ``stt.transcript``. It loads no model: every
transcription is a ``transcribe`` request to the manager, sent without waiting (``Dispatcher``), so one slow
clip never holds up the others and concurrent ones reach the manager together, where they are batched.

Producers use the ROUTER socket (``services.stt.requests``): ``stt.clip`` with a whole clip (answered with its
transcript), or ``stt.start`` / ``stt.audio`` (raw s16 PCM chunks) / ``stt.stop`` for a live source, cut into
utterances by the ``Segmenter``. Audio files dropped into ``watch_dir`` are transcribed too.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import zmq

from daemonkit.binding import Binder, CurveServer, prepare_ipc_dir, remove_ipc_file
from daemonkit.dispatcher import Dispatcher
from daemonkit.publisher import HEARTBEAT_S, EventPublisher, Heartbeat
from daemonkit.request_socket import MAX_CLIP_BYTES, RequestSocket
from model_client import protocol
from model_client.errors import BadRequest, Busy, ModelManagerError
from personas.segmenter import Segmenter
from personas.speech_services import (
    STT_OPS,
    TOPIC_STT_HEARTBEAT,
    TOPIC_TRANSCRIPT,
    ClipArgs,
    SessionArgs,
    StreamStartArgs,
    SttSettings,
)

TICK_S = 0.1
# Live streams open at once, and sessions whose clip numbers are remembered: any producer may open them.
MAX_SESSIONS = 64
MAX_CLIP_COUNTERS = 4096
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm"}

log = structlog.get_logger("services.stt")


@dataclass
class Session:
    """A live stream: its format, its segmenter, and how many utterances it has produced."""

    id: str
    sample_rate: int
    channels: int
    segmenter: Segmenter
    utterances: int = 0


class SttService:
    def __init__(self, settings: SttSettings, manager_endpoint: str, curve: CurveServer | None = None) -> None:
        self.settings = settings
        self.ctx = zmq.Context()
        for endpoint in (settings.requests, settings.events):
            prepare_ipc_dir(endpoint)
        self.binder = Binder(self.ctx, curve)
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, MAX_CLIP_BYTES)
        self.binder.bind(self.frontend, settings.requests, "services.stt.requests")
        self.requests = RequestSocket(self.frontend, STT_OPS, MAX_CLIP_BYTES)
        self.poller = zmq.Poller()
        self.started_at = time.monotonic()
        self.events = EventPublisher(
            self.ctx,
            settings.events,
            lambda s, e: self.binder.bind(s, e, "services.stt.events"),
            self.poller,
            heartbeat=Heartbeat(TOPIC_STT_HEARTBEAT, self._heartbeat, HEARTBEAT_S),
        )
        self.poller.register(self.frontend, zmq.POLLIN)
        self.manager = Dispatcher(manager_endpoint, self.poller, timeout=settings.manager_timeout_s, context=self.ctx)
        self.sessions: dict[str, Session] = {}
        self.clip_counts: OrderedDict[str, int] = OrderedDict()
        self.watched: set[Path] = set()
        self.stopping = False
        self._next_watch = 0.0

    # ----- the loop -------------------------------------------------------------------------------------------

    def _heartbeat(self) -> dict[str, Any]:
        uptime = round(time.monotonic() - self.started_at, 1)
        return {"pid": os.getpid(), "uptime_s": uptime, "sessions": len(self.sessions)}

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("stt_started", requests=self.settings.requests, events=self.settings.events)
        while not self.stopping or self.manager.pending:
            ready = dict(self.poller.poll(TICK_S * 1000))
            if self.frontend in ready:
                self.requests.drain(self._handle)
            if self.manager.sock in ready:
                self.manager.on_readable()
            if self.events.sock in ready:
                self.events.on_readable()
            now = time.monotonic()
            self.manager.check(now)
            self.events.tick(now)
            if self.settings.watch_dir and now >= self._next_watch and not self.stopping:
                self._next_watch = now + self.settings.watch_interval_s
                self._scan_watch_dir(Path(self.settings.watch_dir))
        self.manager.close()
        self.frontend.close(linger=0)
        self.events.close()
        self.binder.close()
        self.ctx.term()
        for endpoint in (self.settings.requests, self.settings.events):
            remove_ipc_file(endpoint)
        log.info("stt_stopped")

    def _stop(self, _signum: int, _frame: Any) -> None:
        self.stopping = True

    # ----- requests from producers ----------------------------------------------------------------------------

    def _handle(self, route: list[bytes], request: protocol.Request, args: Any) -> None:
        if request.op == "ping":
            self.requests.reply(route, request.id, {"pong": True, "service": "stt", "sessions": len(self.sessions)})
        elif request.op == "stt.clip":
            if len(request.payloads) != 1 or not request.payloads[0]:
                raise BadRequest("stt.clip takes the audio in one non-empty binary frame after the envelope")
            self._transcribe(args, request.payloads[0], route=route, request_id=request.id)
        elif request.op == "stt.start":
            self._start(args)
            self.requests.reply(route, request.id, {"session_id": args.session_id, "started": True})
        elif request.op == "stt.audio":
            self._audio(args, request.payloads)
            self.requests.reply(route, request.id, {"session_id": args.session_id})
        elif request.op == "stt.stop":
            flushed = self._stop_session(args)
            self.requests.reply(route, request.id, {"session_id": args.session_id, "utterances": flushed})

    def _start(self, args: StreamStartArgs) -> None:
        if args.session_id not in self.sessions and len(self.sessions) >= MAX_SESSIONS:
            raise Busy(f"{len(self.sessions)} live streams are open, the most this service takes", limit=MAX_SESSIONS)
        self.sessions[args.session_id] = Session(
            args.session_id,
            args.sample_rate,
            args.channels,
            Segmenter(self.settings.segmenter, args.sample_rate, args.channels),
        )
        log.info("stream_started", session_id=args.session_id, sample_rate=args.sample_rate)

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise BadRequest(f"no stream is open for session {session_id!r}: send stt.start first")
        return session

    def _audio(self, args: SessionArgs, payloads: tuple[bytes, ...]) -> None:
        session = self._session(args.session_id)
        for pcm in payloads:
            for utterance in session.segmenter.feed(pcm):
                self._utterance(session, utterance)

    def _stop_session(self, args: SessionArgs) -> int:
        session = self._session(args.session_id)
        rest = session.segmenter.flush()
        if rest:
            self._utterance(session, rest)
        del self.sessions[args.session_id]
        log.info("stream_stopped", session_id=args.session_id, utterances=session.utterances)
        return session.utterances

    def _utterance(self, session: Session, pcm: bytes) -> None:
        session.utterances += 1
        clip = ClipArgs(session_id=session.id, format="pcm", sample_rate=session.sample_rate, source="stream")
        self._transcribe(clip, pcm, utterance=session.utterances)

    # ----- calling the manager, publishing the transcript -----------------------------------------------------

    def _transcribe(
        self,
        clip: ClipArgs,
        audio: bytes,
        route: list[bytes] | None = None,
        request_id: str | None = None,
        utterance: int | None = None,
        on_done: Any = None,
    ) -> None:
        received = time.monotonic()
        if utterance is None:
            utterance = self.clip_counts.pop(clip.session_id, 0) + 1
            self.clip_counts[clip.session_id] = utterance
            if len(self.clip_counts) > MAX_CLIP_COUNTERS:
                self.clip_counts.popitem(last=False)
        args: dict[str, Any] = {
            "model": self.settings.model,
            "language": self.settings.language,
            "vad_filter": self.settings.vad_filter,
            "format": clip.format,
        }
        if clip.format == "pcm":
            args.update(sample_rate=clip.sample_rate, sample_width=clip.sample_width, channels=clip.channels)

        def on_result(result: dict[str, Any], _payloads: tuple[bytes, ...]) -> None:
            event = {
                "session_id": clip.session_id,
                "utterance": utterance,
                "source": clip.source,
                "persona": clip.persona,
                "text": result["text"],
                "segments": result["segments"],
                "language": result["language"],
                "duration_s": result["duration_s"],
                "model": result["model"],
                "timings": {
                    **result["timings"],
                    "service_ms": round((time.monotonic() - received) * 1000, 2),
                },
            }
            self.events.send_multipart(protocol.encode_event(TOPIC_TRANSCRIPT, event, time.time()))
            log.info(
                "transcript",
                session_id=clip.session_id,
                utterance=utterance,
                source=clip.source,
                chars=len(result["text"]),
                audio_s=result["duration_s"],
                ms=event["timings"]["service_ms"],
            )
            if route is not None:
                self.requests.reply(route, request_id, event)
            if on_done is not None:
                on_done(event, None)

        def on_error(error: ModelManagerError) -> None:
            log.warning("transcription_failed", session_id=clip.session_id, code=error.code, message=error.message)
            if route is not None:
                self.requests.reply_error(route, request_id, error)
            if on_done is not None:
                on_done(None, error)

        self.manager.submit("transcribe", args, on_result, on_error, payloads=(audio,))

    def _scan_watch_dir(self, folder: Path) -> None:
        """Transcribe audio files that appeared in ``folder``; write ``<file>.transcript.json`` beside each."""
        if not folder.is_dir():
            return
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in AUDIO_SUFFIXES or path in self.watched:
                continue
            if path.with_name(path.name + ".transcript.json").exists():
                continue
            try:
                audio = path.read_bytes()
            except OSError:
                continue
            self.watched.add(path)

            def done(event: dict | None, error: ModelManagerError | None, path: Path = path) -> None:
                out = event if event is not None else {"error": error.to_wire() if error else None}
                path.with_name(path.name + ".transcript.json").write_text(json.dumps(out, indent=1))
                self.watched.discard(path)

            self._transcribe(ClipArgs(session_id=path.stem, source="file"), audio, on_done=done)
