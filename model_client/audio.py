"""PCM and WAV helpers shared by the client, the services and the manager (standard library only)."""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass


@dataclass(frozen=True)
class Audio:
    """Raw little-endian PCM with what it takes to play it."""

    pcm: bytes
    sample_rate: int
    sample_width: int = 2
    channels: int = 1

    @property
    def duration_s(self) -> float:
        frame = self.sample_width * self.channels
        return len(self.pcm) / frame / self.sample_rate if frame and self.sample_rate else 0.0

    def to_wav(self) -> bytes:
        return pcm_to_wav(self.pcm, self.sample_rate, self.sample_width, self.channels)


def pcm_to_wav(pcm: bytes, sample_rate: int, sample_width: int = 2, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(sample_width)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
    return buffer.getvalue()


def read_wav(data: bytes) -> Audio:
    """Parse a PCM WAV file; raises ``wave.Error`` (or EOFError) on anything else."""
    with wave.open(io.BytesIO(data), "rb") as wav:
        return Audio(wav.readframes(wav.getnframes()), wav.getframerate(), wav.getsampwidth(), wav.getnchannels())
