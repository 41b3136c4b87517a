"""Audio in, 16 kHz mono float32 out: what Whisper listens to. Runs in the STT worker, never in the manager loop.

Files (WAV, FLAC, MP3, OGG, anything FFmpeg reads) are decoded and resampled by PyAV, the library faster-whisper
itself uses; raw PCM is given a WAV header first, so both take the same decoder and resampler.
"""

from __future__ import annotations

import io

import numpy as np

from model_client.audio import pcm_to_wav
from model_client.errors import InvalidAudio
from model_client.protocol import TranscribeArgs

SAMPLE_RATE = 16000


def decode(data: bytes, args: TranscribeArgs, max_audio_s: float) -> np.ndarray:
    """The clip as 16 kHz mono float32; InvalidAudio when it is undecodable, empty or too long."""
    from faster_whisper.audio import decode_audio

    if not data:
        raise InvalidAudio("the audio frame is empty")
    if args.format == "pcm":
        frame = args.sample_width * args.channels
        if len(data) % frame:
            raise InvalidAudio(f"{len(data)} bytes of PCM is not a whole number of {frame}-byte frames")
        seconds = len(data) / frame / args.sample_rate
        if seconds > max_audio_s:
            raise _too_long(seconds, max_audio_s)
        data = pcm_to_wav(data, args.sample_rate, args.sample_width, args.channels)
    try:
        audio = decode_audio(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
    except Exception as exc:  # PyAV raises a family of FFmpeg errors (InvalidDataError, ValueError, ...)
        raise InvalidAudio(f"cannot decode the audio: {type(exc).__name__}: {exc}") from None
    if audio.size == 0:
        raise InvalidAudio("the clip holds no audio samples")
    seconds = audio.size / SAMPLE_RATE
    if seconds > max_audio_s:
        raise _too_long(seconds, max_audio_s)
    return audio


def _too_long(seconds: float, max_audio_s: float) -> InvalidAudio:
    return InvalidAudio(
        f"the clip is {seconds:.1f} s long, over the limit of {max_audio_s:g} s",
        duration_s=round(seconds, 2),
        max_audio_s=max_audio_s,
    )
