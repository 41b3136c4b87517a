"""Speech the manager made (s16 mono PCM) in the formats OpenAI's ``/v1/audio/speech`` offers, encoded with PyAV
(FFmpeg's libraries, no ffmpeg binary)."""

from __future__ import annotations

import io

import av
import numpy as np

from model_client.audio import pcm_to_wav

OPENAI_PCM_RATE = 24_000  # OpenAI's `pcm`: 24 kHz, 16-bit signed little-endian, mono

# format -> (container, codec, sample rate or None to keep the voice's, MIME type)
FORMATS: dict[str, tuple[str, str, int | None, str]] = {
    "mp3": ("mp3", "libmp3lame", None, "audio/mpeg"),
    "opus": ("ogg", "libopus", 48_000, "audio/ogg"),
    "aac": ("adts", "aac", None, "audio/aac"),
    "flac": ("flac", "flac", None, "audio/flac"),
}


def _frame(pcm: bytes, rate: int) -> av.AudioFrame:
    samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
    frame.sample_rate = rate
    return frame


def resample(pcm: bytes, rate: int, to_rate: int) -> bytes:
    if rate == to_rate or not pcm:
        return pcm
    resampler = av.AudioResampler(format="s16", layout="mono", rate=to_rate)
    frames = [*resampler.resample(_frame(pcm, rate)), *resampler.resample(None)]
    return b"".join(bytes(f.to_ndarray().astype("<i2").tobytes()) for f in frames)


def encode(pcm: bytes, rate: int, fmt: str) -> tuple[bytes, str]:
    """The audio file's bytes and its MIME type."""
    if fmt == "wav":
        return pcm_to_wav(pcm, rate, 2, 1), "audio/wav"
    if fmt == "pcm":
        return resample(pcm, rate, OPENAI_PCM_RATE), "audio/pcm"
    container, codec, out_rate, mime = FORMATS[fmt]
    out_rate = out_rate or rate
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=out_rate, layout="mono")
        frame_size = stream.codec_context.frame_size or None
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=out_rate, frame_size=frame_size)
        frames = [*resampler.resample(_frame(pcm, rate)), *resampler.resample(None)]
        for frame in frames:
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return buffer.getvalue(), mime
