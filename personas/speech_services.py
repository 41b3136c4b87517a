"""What the speech services and their users share: the ``services`` section of the YAML, the ops of each
service's request socket, and the topics they publish or listen to.

Requests to a service use the manager's envelope (``model_client.protocol``) with the service's own ops; events
use the manager's event framing, with audio as a binary frame after the body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from daemonkit.settings import Section, convert, read_sections, resolve_path
from model_client.endpoints import config_path, resolve_endpoint
from model_client.protocol import NoArgs, OpArgs

TOPIC_TRANSCRIPT = "stt.transcript"  # STT service PUB: {session_id, utterance, text, segments, timings, source}
TOPIC_SAY = "tts.say"  # publishers -> TTS service: {text, voice, session_id, speed}
TOPIC_STT_HEARTBEAT = "stt.heartbeat"  # STT service PUB: {pid, uptime_s, sessions}; at once to a new subscriber
TOPIC_TTS_HEARTBEAT = "tts.heartbeat"  # TTS service PUB: {pid, uptime_s}; at once to a new subscriber
TOPIC_AUDIO = "tts.audio"  # TTS service PUB: {session_id, utterance_id, seq, final, sample_rate, ...} + PCM


# ----- the YAML ---------------------------------------------------------------------------------------------


class Segmenter(Section):
    """Cuts a live PCM stream into utterances by loudness: speech starts when a 30 ms frame is louder than the
    threshold (or than ``noise_ratio`` x the running noise floor), and ends after ``min_silence_ms`` of quiet."""

    threshold_dbfs: float = -45.0
    noise_ratio: Annotated[float, msgspec.Meta(ge=1.0)] = 3.0
    min_speech_ms: Annotated[int, msgspec.Meta(ge=0)] = 150
    min_silence_ms: Annotated[int, msgspec.Meta(ge=30)] = 600
    pre_roll_ms: Annotated[int, msgspec.Meta(ge=0)] = 300
    max_utterance_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0


class SttSettings(Section):
    requests: str = "ipc://../run/stt.sock"  # ROUTER: producers send clips and PCM streams
    events: str = "ipc://../run/stt-events.sock"  # PUB: stt.transcript
    model: str | None = None  # an stt model of the catalogue; None: the first
    language: str | None = "en"
    vad_filter: bool = True  # clips and utterances skip silence with the manager's VAD
    watch_dir: str | None = None  # audio files put here are transcribed; the transcript is written beside them
    watch_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    manager_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    segmenter: Segmenter = msgspec.field(default_factory=Segmenter)


class TtsSettings(Section):
    requests: str = "ipc://../run/tts.sock"  # ROUTER: direct requests (op tts.say)
    say: str = "ipc://../run/tts-say.sock"  # SUB, bound: any publisher connects and sends tts.say
    events: str = "ipc://../run/tts-events.sock"  # PUB: tts.audio
    voice: str | None = None  # a tts model of the catalogue; None: the first
    output_dir: str | None = None  # when set, one WAV per utterance is written here
    manager_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0


class ServicesConfig(Section):
    stt: SttSettings = msgspec.field(default_factory=SttSettings)
    tts: TtsSettings = msgspec.field(default_factory=TtsSettings)


def load_services_config(path: Path | None = None) -> ServicesConfig:
    """The ``services`` section, validated, with relative endpoints and directories made absolute."""
    path = path or config_path()
    sections, base = read_sections(path)
    config = convert(sections.get("services") or {}, ServicesConfig, str(path), "$.services")

    def where(value: str | None) -> str | None:
        return None if value is None else str(resolve_path(value, base))

    stt, tts = config.stt, config.tts
    stt = msgspec.structs.replace(
        stt,
        requests=resolve_endpoint(stt.requests, base),
        events=resolve_endpoint(stt.events, base),
        watch_dir=where(stt.watch_dir),
    )
    tts = msgspec.structs.replace(
        tts,
        requests=resolve_endpoint(tts.requests, base),
        say=resolve_endpoint(tts.say, base),
        events=resolve_endpoint(tts.events, base),
        output_dir=where(tts.output_dir),
    )
    return ServicesConfig(stt=stt, tts=tts)


# ----- the STT service's ops ----------------------------------------------------------------------------------

SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class ClipArgs(OpArgs, kw_only=True):
    """A whole clip in the binary frame: a file's bytes, or raw PCM (``format: pcm``). Replied with the
    transcript, which is also published."""

    session_id: SessionId = "default"
    format: Literal["auto", "pcm"] = "auto"
    sample_rate: Annotated[int, msgspec.Meta(ge=1000, le=384_000)] = 16000
    sample_width: Literal[1, 2, 4] = 2
    channels: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1
    source: str = "clip"  # said in the published transcript (clip, file, microphone, ...)
    persona: str | None = None  # passed on in the transcript: the persona that must answer (else routing decides)


class StreamStartArgs(OpArgs, kw_only=True):
    """Opens a live stream of raw s16 PCM for ``session_id``; chunks follow with ``stt.audio``."""

    session_id: SessionId
    sample_rate: Annotated[int, msgspec.Meta(ge=1000, le=384_000)] = 16000
    channels: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1


class SessionArgs(OpArgs, kw_only=True):
    session_id: SessionId


STT_OPS: dict[str, type[OpArgs]] = {
    "ping": NoArgs,
    "stt.clip": ClipArgs,
    "stt.start": StreamStartArgs,
    "stt.audio": SessionArgs,  # + one binary frame of PCM
    "stt.stop": SessionArgs,  # flushes the last utterance
}


# ----- the TTS service's ops ----------------------------------------------------------------------------------


class SayArgs(OpArgs, kw_only=True):
    """Speak ``text``: the audio goes out on ``tts.audio`` as it is made (and to a WAV file when configured).
    The same map is what a publisher sends on ``tts.say``."""

    text: str
    voice: str | None = None
    session_id: SessionId = "default"
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0
    return_audio: bool = False  # direct requests only: the reply carries the utterance as one WAV frame
    turn_id: str | None = None  # echoed in tts.audio: which reply of which agent this piece belongs to...
    part: Annotated[int, msgspec.Meta(ge=0)] = 0  # ...and which piece of it


TTS_OPS: dict[str, type[OpArgs]] = {"ping": NoArgs, "tts.say": SayArgs}
