"""The speech-to-text port: ``transcribe`` (optional: model, language), ``audio-start``, ``audio-chunk``*,
``audio-stop`` -> ``transcript``. The utterance goes to the manager's ``transcribe`` as raw PCM in whatever format
the peer sent (the manager resamples), so concurrent satellites share the Whisper batch."""

from __future__ import annotations

import time

import structlog
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event

from model_client.aio import ManagerLink
from model_client.errors import ModelManagerError
from services.wyoming.catalogue import Catalogue, short_language
from services.wyoming.config import WyomingSettings
from services.wyoming.connection import Peer

SAMPLE_WIDTHS = (1, 2, 4)

log = structlog.get_logger("wyoming")


class AsrHandler:
    def __init__(self, peer: Peer, link: ManagerLink, catalogue: Catalogue, settings: WyomingSettings) -> None:
        self.peer, self.link, self.catalogue, self.settings = peer, link, catalogue, settings
        self.model: str | None = None
        self.language: str | None = settings.language
        self.format: tuple[int, int, int] | None = None  # rate, width, channels of the utterance in progress
        self.pcm = bytearray()
        self.max_bytes = 0

    async def on_event(self, event: Event) -> bool:
        if Transcribe.is_type(event.type):
            request = Transcribe.from_event(event)
            models = sorted(m["name"] for m in self.catalogue.of_kind("stt"))
            if request.name is not None and request.name not in models:
                await self.peer.error(
                    f"no speech-to-text model {request.name!r}: the models are {models}", "model_not_found"
                )
                return True
            self.model = request.name
            self.language = short_language(request.language) if request.language else self.settings.language
        elif AudioStart.is_type(event.type):
            await self._start(AudioStart.from_event(event))
        elif AudioChunk.is_type(event.type):
            await self._chunk(AudioChunk.from_event(event))
        elif AudioStop.is_type(event.type):
            return await self._stop()
        return True  # other events are not for this port: dropped, as Wyoming peers do

    async def _start(self, start: AudioStart) -> None:
        rate, width, channels = int(start.rate), int(start.width), int(start.channels)
        if not (1000 <= rate <= 384_000 and width in SAMPLE_WIDTHS and 1 <= channels <= 8):
            self.format = None
            await self.peer.error(
                f"audio-start: {rate} Hz, {width}-byte samples, {channels} channels is not a PCM format this "
                f"service takes (1000-384000 Hz, width {SAMPLE_WIDTHS}, 1-8 channels)",
                "bad_audio_format",
            )
            return
        self.format = (rate, width, channels)
        self.pcm.clear()
        self.max_bytes = min(int(self.settings.max_audio_s * rate) * width * channels, self.settings.max_audio_bytes)

    async def _chunk(self, chunk: AudioChunk) -> None:
        if self.format is None:
            await self.peer.error("audio-chunk before audio-start: the chunk is dropped", "audio_not_started")
            return
        if (int(chunk.rate), int(chunk.width), int(chunk.channels)) != self.format:
            await self.peer.error(
                "audio-chunk's format differs from its audio-start: the chunk is dropped", "bad_audio_format"
            )
            return
        if len(self.pcm) + len(chunk.audio or b"") > self.max_bytes:
            self.format = None
            self.pcm = bytearray()
            await self.peer.error(
                f"the utterance is longer than {self.settings.max_audio_s} s or "
                f"{self.settings.max_audio_bytes} bytes: it is dropped",
                "audio_too_long",
            )
            return
        self.pcm += chunk.audio or b""

    async def _stop(self) -> bool:
        if self.format is None:
            await self.peer.error("audio-stop without an utterance (no audio-start)", "audio_not_started")
            return True
        (rate, width, channels), pcm = self.format, bytes(self.pcm)
        self.format, self.pcm = None, bytearray()
        args = {
            "model": self.model,
            "format": "pcm",
            "sample_rate": rate,
            "sample_width": width,
            "channels": channels,
            "language": self.language,
            "vad_filter": self.settings.vad_filter,
        }
        started = time.monotonic()
        try:
            result = await self.link.request("transcribe", args, payloads=(pcm,))
        except ModelManagerError as exc:
            await self.peer.failed(exc)
            return False
        text = str(result.get("text") or "").strip()
        log.info(
            "transcribed",
            model=result.get("model"),
            audio_s=round(len(pcm) / (rate * width * channels), 2),
            ms=round((time.monotonic() - started) * 1000, 1),
            chars=len(text),
        )
        await self.peer.send(Transcript(text=text, language=result.get("language") or self.language).event())
        return True

    async def close(self) -> None:
        self.pcm = bytearray()
