"""The text-to-speech port. ``synthesize`` -> one ``audio-start``, the chunks, one ``audio-stop``. Streaming
synthesis: ``synthesize-start``, ``synthesize-chunk``* (text as an agent writes it), ``synthesize-stop`` -> each
sentence spoken as soon as it is complete (its own ``audio-start`` ... ``audio-stop``) while more text arrives, then
``synthesize-stopped``. A ``synthesize`` sent during a stream (Home Assistant sends one for older servers) is the
same text again and is ignored."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from model_client.aio import ManagerLink
from model_client.errors import BadRequest, ModelManagerError
from personas.pieces import SpeechPieces
from services.wyoming.catalogue import Catalogue
from services.wyoming.config import WyomingSettings
from services.wyoming.connection import Peer

FIRST_PIECE_WORDS = 4  # the first spoken piece may end at a comma after this many words (speech starts sooner)
SAMPLE_WIDTH, CHANNELS = 2, 1  # the manager's synthesized PCM: s16 mono

log = structlog.get_logger("wyoming")


class TtsHandler:
    def __init__(self, peer: Peer, link: ManagerLink, catalogue: Catalogue, settings: WyomingSettings) -> None:
        self.peer, self.link, self.catalogue, self.settings = peer, link, catalogue, settings
        self.streaming = False
        self.voice: dict[str, Any] = {}
        self.pieces = SpeechPieces(FIRST_PIECE_WORDS)
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.worker: asyncio.Task[bool] | None = None
        self.stream_chars = 0

    async def on_event(self, event: Event) -> bool:
        if Synthesize.is_type(event.type):
            if self.streaming:
                return True
            request = Synthesize.from_event(event)
            try:
                voice = self._voice(request.voice)
                self._check_length(len(request.text))
                await self._speak(request.text, voice)
            except ModelManagerError as exc:
                await self.peer.failed(exc)
                return False
            return True
        if SynthesizeStart.is_type(event.type):
            return await self._start(SynthesizeStart.from_event(event))
        if SynthesizeChunk.is_type(event.type):
            return await self._chunk(SynthesizeChunk.from_event(event).text)
        if SynthesizeStop.is_type(event.type):
            return await self._stop()
        return True

    # ----- streaming synthesis ----------------------------------------------------------------------------

    async def _start(self, start: SynthesizeStart) -> bool:
        if self.streaming:
            await self.peer.error("synthesize-start during a stream: the first stream goes on", "already_streaming")
            return True
        try:
            self.voice = self._voice(start.voice)
        except ModelManagerError as exc:
            await self.peer.failed(exc)
            return False
        self.streaming, self.stream_chars = True, 0
        self.pieces = SpeechPieces(FIRST_PIECE_WORDS)
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._speak_pieces())
        return True

    async def _chunk(self, text: str) -> bool:
        if not self.streaming:
            await self.peer.error("synthesize-chunk before synthesize-start: the text is dropped", "stream_not_started")
            return True
        self.stream_chars += len(text)
        try:
            self._check_length(self.stream_chars)
        except BadRequest as exc:
            await self.peer.failed(exc)
            return False
        for piece in self.pieces.feed(text):
            self.queue.put_nowait(piece)
        return True

    async def _stop(self) -> bool:
        if not self.streaming or self.worker is None:
            await self.peer.error("synthesize-stop without synthesize-start", "stream_not_started")
            return True
        rest = self.pieces.flush()
        if rest:
            self.queue.put_nowait(rest)
        self.queue.put_nowait(None)
        spoken = await self.worker
        self.streaming, self.worker = False, None
        if spoken:
            await self.peer.send(SynthesizeStopped().event())
        return spoken

    async def _speak_pieces(self) -> bool:
        """Speak the stream's pieces in order as they come; False (after an error event) if one failed."""
        while (piece := await self.queue.get()) is not None:
            try:
                await self._speak(piece, self.voice)
            except ModelManagerError as exc:
                await self.peer.failed(exc)
                return False
        return True

    # ----- one text, one audio-start ... audio-stop -----------------------------------------------------

    async def _speak(self, text: str, voice: dict[str, Any]) -> None:
        text = " ".join(text.split())
        rate = int((self.catalogue.voice(voice.get("voice")) or {}).get("sample_rate") or 22050)  # for no audio
        started = False
        if text:
            args = {**voice, "text": text, "format": "pcm", "stream": True}
            async for reply in self.link.replies("synthesize", args):
                if reply.is_final or not reply.payloads:
                    continue
                rate = int(reply.body.get("sample_rate") or rate)
                if not started:
                    await self.peer.send(AudioStart(rate=rate, width=SAMPLE_WIDTH, channels=CHANNELS).event())
                    started = True
                await self._send_pcm(reply.payloads[0], rate)
        if not started:
            await self.peer.send(AudioStart(rate=rate, width=SAMPLE_WIDTH, channels=CHANNELS).event())
        await self.peer.send(AudioStop().event())

    async def _send_pcm(self, pcm: bytes, rate: int) -> None:
        step = self.settings.samples_per_chunk * SAMPLE_WIDTH * CHANNELS
        for at in range(0, len(pcm), step):
            chunk = AudioChunk(rate=rate, width=SAMPLE_WIDTH, channels=CHANNELS, audio=pcm[at : at + step])
            await self.peer.send(chunk.event())

    def _voice(self, wanted: SynthesizeVoice | None) -> dict[str, Any]:
        """The manager's ``voice``/``speaker`` arguments for a Wyoming voice."""
        name = wanted.name if wanted else None
        if wanted and not name and wanted.language:
            name = self.catalogue.voice_for_language(wanted.language)
        entry = self.catalogue.voice(name)
        voice: dict[str, Any] = {"voice": name}
        speaker = wanted.speaker if wanted else None
        if speaker:
            ids = {s["name"]: s["id"] for s in (entry or {}).get("speakers") or []}
            if speaker in ids:
                voice["speaker"] = ids[speaker]
            elif speaker.isdigit():
                voice["speaker"] = int(speaker)
            else:
                raise BadRequest(f"voice {name!r} has no speaker {speaker!r}; it has {sorted(ids) or 'one voice'}")
        return voice

    def _check_length(self, chars: int) -> None:
        if chars > self.settings.max_text_chars:
            raise BadRequest(f"the text is longer than this service's {self.settings.max_text_chars} characters")

    async def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
