"""Cut a live PCM stream into utterances by loudness, so each can be transcribed as soon as the speaker pauses.

A plain energy detector (no model: the service loads none): 30 ms frames, speech when a frame's RMS is above
``threshold_dbfs`` and ``noise_ratio`` times the running noise floor. An utterance starts after
``min_speech_ms`` of speech (with ``pre_roll_ms`` of audio before it, so the first syllable is kept) and ends after
``min_silence_ms`` of quiet or at ``max_utterance_s``. The manager's Silero VAD then trims each utterance finely.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from personas.speech_services import Segmenter as SegmenterSettings

FRAME_MS = 30
NOISE_ADAPT = 0.05  # how fast the noise floor follows quiet frames


class Segmenter:
    def __init__(self, settings: SegmenterSettings, sample_rate: int, channels: int = 1) -> None:
        self.settings = settings
        self.sample_rate = sample_rate
        self.channels = channels
        self.frame = sample_rate * FRAME_MS // 1000  # samples per channel in one frame
        self.threshold = 32768.0 * 10 ** (settings.threshold_dbfs / 20)
        self.noise = self.threshold / settings.noise_ratio
        self._pending = np.zeros(0, dtype=np.int16)
        self._pre_roll: deque[np.ndarray] = deque(maxlen=max(1, settings.pre_roll_ms // FRAME_MS))
        self._speech: list[np.ndarray] = []
        self._voiced_run = 0  # consecutive speech frames before the utterance is confirmed
        self._quiet_run = 0
        self.in_utterance = False

    def feed(self, pcm: bytes) -> list[bytes]:
        """Add s16 PCM (interleaved channels); return the utterances it completed, as mono s16 PCM."""
        samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % (2 * self.channels)], dtype=np.int16)
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1).astype(np.int16)
        self._pending = np.concatenate([self._pending, samples])
        done = []
        while self._pending.size >= self.frame:
            frame, self._pending = self._pending[: self.frame], self._pending[self.frame :]
            utterance = self._frame(frame)
            if utterance is not None:
                done.append(utterance)
        return done

    @property
    def utterance_samples(self) -> int:
        """Samples (one channel) of the utterance in progress, its pre-roll included; 0 between utterances. A caller
        counting what it fed knows from it where in the stream the utterance began."""
        return sum(len(frame) for frame in self._speech) if self.in_utterance else 0

    def flush(self) -> bytes | None:
        """The utterance in progress, if any (the stream has ended)."""
        if self._pending.size and self.in_utterance:
            self._speech.append(self._pending)
        self._pending = np.zeros(0, dtype=np.int16)
        return self._end() if self.in_utterance else None

    def _frame(self, frame: np.ndarray) -> bytes | None:
        s = self.settings
        rms = float(np.sqrt(np.mean(frame.astype(np.float32) ** 2)))
        loud = rms > self.threshold and rms > self.noise * s.noise_ratio
        if not loud:
            self.noise += NOISE_ADAPT * (rms - self.noise)
        if not self.in_utterance:
            self._pre_roll.append(frame)
            self._voiced_run = self._voiced_run + 1 if loud else 0
            if self._voiced_run * FRAME_MS >= max(FRAME_MS, s.min_speech_ms):
                self.in_utterance = True
                self._speech = list(self._pre_roll)
                self._pre_roll.clear()
                self._quiet_run = 0
            return None
        self._speech.append(frame)
        self._quiet_run = 0 if loud else self._quiet_run + 1
        length_s = len(self._speech) * FRAME_MS / 1000
        if self._quiet_run * FRAME_MS >= s.min_silence_ms or length_s >= s.max_utterance_s:
            return self._end()
        return None

    def _end(self) -> bytes:
        audio = np.concatenate(self._speech).astype(np.int16).tobytes()
        self._speech, self._voiced_run, self._quiet_run, self.in_utterance = [], 0, 0, False
        return audio
