"""The events this service reads, typed: each one's data is checked before a handler sees it, strictly (a number
sent as a string, a fractional sample rate, a text that is not a string are refused), and the refusal is a sentence
for a person, not a Python exception's repr. Fields not named here are allowed (Wyoming grows) and not read."""

from __future__ import annotations

import msgspec
from wyoming.event import Event


class EventRefused(ValueError):
    """An event whose data does not match its type: the peer gets ``bad_event`` with this text."""


class _Data(msgspec.Struct):
    pass


class TranscribeData(_Data):
    name: str | None = None
    language: str | None = None


class AudioFormat(_Data):
    rate: int
    width: int
    channels: int
    timestamp: int | None = None


class AudioStopData(_Data):
    timestamp: int | None = None


class VoiceData(_Data):
    name: str | None = None
    language: str | None = None
    speaker: str | None = None


class SynthesizeData(_Data):
    text: str
    voice: VoiceData | None = None


class SynthesizeStartData(_Data):
    voice: VoiceData | None = None


class TextData(_Data):
    text: str


class TranscriptData(_Data):
    text: str
    language: str | None = None


SCHEMAS: dict[str, type[_Data]] = {
    "transcribe": TranscribeData,
    "audio-start": AudioFormat,
    "audio-chunk": AudioFormat,
    "audio-stop": AudioStopData,
    "synthesize": SynthesizeData,
    "synthesize-start": SynthesizeStartData,
    "synthesize-chunk": TextData,
    "transcript": TranscriptData,
}


def check_event(event: Event) -> None:
    """Raise ``EventRefused`` if the event is of a type this service reads and its data does not fit that type."""
    schema = SCHEMAS.get(event.type)
    if schema is None:
        return
    try:
        msgspec.convert(event.data or {}, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise EventRefused(f"{event.type}: {exc}".replace("`$.", "`")) from None
