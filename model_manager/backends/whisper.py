"""Speech to text with faster-whisper (CTranslate2), with requests batched across clients.

Every clip is cut into windows of at most 30 s (Whisper's input): speech regions found by the Silero VAD when
the request asks for ``vad_filter``, else plain consecutive windows. The windows of every request in a batch go
through the encoder and decoder together (faster-whisper's ``BatchedInferencePipeline.forward``), then each
request gets back only its own segments. A batch of one takes the same path, so a clip's transcript does not
depend on what else was running.

Measured on the 2-core CPU of the development machine (8 Piper clips of 2.7-3.7 s, tiny.en int8, beam 1 and 5,
three runs): one batch of 8 ran 1.04-1.39x faster than 8 clips one after another, batches of 4 1.13-1.56x,
batches of 2 1.04-1.26x, and a batch of 1 through this path 0.97-1.09x of ``WhisperModel.transcribe``. The
default ``batch_size`` is therefore 4 on a CPU (the YAML says so); on a GPU the encoder is far from saturated by
one clip, and 8 is the usual choice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import (
    Segment,
    TranscriptionOptions,
    Word,
    get_suppressed_tokens,
    restore_speech_timestamps,
)
from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps

from model_client.errors import BadRequest, ModelLoadFailed, ModelManagerError
from model_manager.backends import Emit
from model_manager.backends.audio_input import SAMPLE_RATE, decode
from model_manager.config import KvCacheSettings, Limits, ModelSpec
from model_manager.worker_protocol import RunArgs, TranscribeRun

WINDOW_S = 30  # Whisper hears 30 s at a time
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


@dataclass
class Clip:
    """One request of a batch, from decoded audio to its segments."""

    index: int
    args: TranscribeRun
    audio: np.ndarray | None = None
    language: str = "en"
    spans: list[dict[str, int]] | None = None  # sample ranges transcribed (speech regions, or windows)
    windows: list[np.ndarray] | None = None
    windows_meta: list[dict[str, Any]] | None = None
    segments: list[dict[str, Any]] | None = None
    error: ModelManagerError | None = None
    decode_ms: float = 0.0

    @property
    def key(self) -> tuple:
        """Requests whose windows can share a forward pass: same language and decoding options. Word
        timestamps keep per-call state in faster-whisper, so those requests run on their own."""
        words = self.index if self.args.word_timestamps else None
        return self.language, self.args.beam_size, words, self.args.task


class WhisperBackend:
    should_stop = staticmethod(lambda: False)  # requests here are short: they run to the end
    batchable_ops = frozenset({"transcribe"})

    def __init__(self) -> None:
        self.model: WhisperModel | None = None
        self.pipeline: BatchedInferencePipeline | None = None
        self.batch_size = 1
        self.batch_wait_s = 0.0
        self.max_audio_s = 300.0

    def load(self, spec: ModelSpec, name: str, kv: KvCacheSettings | None, limits: Limits | None = None) -> dict:
        started = time.perf_counter()
        device = "cuda" if spec.device == "cuda" else "cpu"
        try:
            self.model = WhisperModel(
                spec.path,
                device=device,
                device_index=spec.gpu or 0,
                compute_type=spec.compute_type,
                cpu_threads=spec.n_threads or 0,
                local_files_only=True,
            )
        except Exception as exc:
            raise ModelLoadFailed(f"cannot load the Whisper model at {spec.path}: {exc}", path=spec.path) from None
        self.pipeline = BatchedInferencePipeline(self.model)
        self.batch_size = spec.batch_size
        self.batch_wait_s = spec.batch_wait_ms / 1000
        if limits is not None:
            self.max_audio_s = float(limits.max_audio_s)
        return {
            "load_ms": round((time.perf_counter() - started) * 1000, 1),
            "quantization": spec.compute_type,
            "device": device,
            "multilingual": self.model.model.is_multilingual,
            "batch_size": self.batch_size,
        }

    def warm_up(self) -> None:
        tone = 0.1 * np.sin(np.arange(SAMPLE_RATE) * 2 * np.pi * 440 / SAMPLE_RATE).astype(np.float32)
        clip = Clip(0, TranscribeRun(beam_size=1), audio=tone)
        self._prepare(clip)
        self._transcribe([clip])

    def run(self, op: str, args: RunArgs, emit: Emit) -> dict[str, Any]:
        outcome = self.run_batch(op, [args])[0]
        if isinstance(outcome, ModelManagerError):
            raise outcome
        return outcome

    def run_batch(self, op: str, batch: list[RunArgs]) -> list[dict[str, Any] | ModelManagerError]:
        """Transcribe every request of ``batch``; a request's own problem (bad audio) fails only that one."""
        if not all(isinstance(args, TranscribeRun) for args in batch):
            raise BadRequest(f"a speech-to-text model does not serve {op!r}")
        started = time.perf_counter()
        clips = [Clip(i, args) for i, args in enumerate(batch) if isinstance(args, TranscribeRun)]
        for clip in clips:
            decode_started = time.perf_counter()
            try:
                clip.audio = decode(clip.args.audio, clip.args, self.max_audio_s)
                self._prepare(clip)
            except ModelManagerError as exc:
                clip.error = exc
            clip.decode_ms = (time.perf_counter() - decode_started) * 1000
        good = [clip for clip in clips if clip.error is None]
        infer_started = time.perf_counter()
        self._transcribe(good)
        infer_ms = (time.perf_counter() - infer_started) * 1000
        total_ms = (time.perf_counter() - started) * 1000
        return [clip.error or self._result(clip, len(good), infer_ms, total_ms) for clip in clips]

    # ----- the steps ------------------------------------------------------------------------------------------

    def _prepare(self, clip: Clip) -> None:
        """Language, then the windows to transcribe (speech regions with the VAD, else consecutive 30 s)."""
        assert self.model is not None and clip.audio is not None
        clip.language = self._language(clip)
        audio = clip.audio
        if clip.args.vad_filter:
            options = VadOptions(max_speech_duration_s=WINDOW_S, min_silence_duration_ms=160)
            clip.spans = get_speech_timestamps(audio, options)
        else:
            step = WINDOW_S * SAMPLE_RATE
            clip.spans = [{"start": s, "end": min(s + step, audio.size)} for s in range(0, audio.size, step)]
        if not clip.spans:
            clip.windows, clip.windows_meta = [], []
            return
        clip.windows, clip.windows_meta = collect_chunks(audio, clip.spans, max_duration=WINDOW_S)

    def _language(self, clip: Clip) -> str:
        assert self.model is not None and clip.audio is not None
        asked = clip.args.language
        if not self.model.model.is_multilingual:
            return "en"
        if asked:
            if asked not in self.model.supported_languages:
                raise BadRequest(f"language {asked!r} is not one this model knows", language=asked)
            return asked
        language, _probability, _all = self.model.detect_language(clip.audio)
        return language

    def _transcribe(self, clips: list[Clip]) -> None:
        """Run every window of ``clips`` through the model in batches of ``batch_size``, grouped by options."""
        assert self.model is not None and self.pipeline is not None
        groups: dict[tuple, list[tuple[Clip, int]]] = {}
        for clip in clips:
            clip.segments = []
            for window in range(len(clip.windows or [])):
                groups.setdefault(clip.key, []).append((clip, window))
        for (language, beam_size, _words, task), windows in groups.items():
            # translate: into English (an English-only model has no task token: it transcribes, which is the same)
            tokenizer = Tokenizer(
                self.model.hf_tokenizer, self.model.model.is_multilingual, task=task, language=language
            )
            word_timestamps = any(clip.args.word_timestamps for clip, _ in windows)
            options = _options(tokenizer, beam_size, word_timestamps)
            for start in range(0, len(windows), self.batch_size):
                part = windows[start : start + self.batch_size]
                features = np.stack(
                    [pad_or_trim(self.model.feature_extractor(clip.windows[w])[..., :-1]) for clip, w in part]
                )
                self.pipeline.last_speech_timestamp = 0.0
                meta = [clip.windows_meta[w] for clip, w in part]
                outputs = self.pipeline.forward(features, tokenizer, meta, options)
                for (clip, _), output in zip(part, outputs, strict=True):
                    clip.segments.extend(output)
        for clip in clips:
            clip.segments = _restore_times(clip)

    def _result(self, clip: Clip, batch: int, infer_ms: float, total_ms: float) -> dict[str, Any]:
        assert clip.audio is not None and clip.segments is not None
        segments = [
            {
                "start": round(float(seg.start), 3),
                "end": round(float(seg.end), 3),
                "text": seg.text.strip(),
                **({"words": [_word(w) for w in seg.words or []]} if clip.args.word_timestamps else {}),
            }
            for seg in clip.segments
        ]
        return {
            "text": " ".join(s["text"] for s in segments if s["text"]).strip(),
            "segments": segments,
            "language": clip.language,
            "duration_s": round(clip.audio.size / SAMPLE_RATE, 3),
            "timings": {
                "decode_ms": round(clip.decode_ms, 2),
                "transcribe_ms": round(infer_ms, 2),
                "total_ms": round(total_ms, 2),
                "batch": batch,
            },
        }

    def after_reply(self, idle: bool) -> None:
        pass

    def kv_stats(self) -> None:
        return None

    def unload(self) -> None:
        self.model = self.pipeline = None


def _options(tokenizer: Tokenizer, beam_size: int, word_timestamps: bool) -> TranscriptionOptions:
    """The options faster-whisper's own batched mode uses (greedy at temperature 0, no conditioning)."""
    return TranscriptionOptions(
        beam_size=beam_size,
        best_of=5,
        patience=1.0,
        length_penalty=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        log_prob_threshold=-1.0,
        no_speech_threshold=0.6,
        compression_ratio_threshold=2.4,
        condition_on_previous_text=False,
        prompt_reset_on_temperature=0.5,
        temperatures=[0.0],
        initial_prompt=None,
        prefix=None,
        suppress_blank=True,
        suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
        without_timestamps=False,
        max_initial_timestamp=0.0,
        word_timestamps=word_timestamps,
        prepend_punctuations=PREPEND_PUNCTUATIONS,
        append_punctuations=APPEND_PUNCTUATIONS,
        multilingual=False,
        max_new_tokens=None,
        clip_timestamps=[],
        hallucination_silence_threshold=None,
        hotwords=None,
    )


def _restore_times(clip: Clip) -> list[Segment]:
    """Segment times of the windows back to times in the clip (the VAD removed the silence between them)."""
    segments = [
        Segment(
            id=i,
            seek=seg["seek"],
            start=round(seg["start"], 3),
            end=round(seg["end"], 3),
            text=seg["text"],
            tokens=seg["tokens"],
            avg_logprob=seg["avg_logprob"],
            compression_ratio=seg["compression_ratio"],
            no_speech_prob=seg["no_speech_prob"],
            words=None,
            temperature=0.0,
        )
        for i, seg in enumerate(clip.segments or [])
    ]
    if clip.args.word_timestamps:
        for segment, raw in zip(segments, clip.segments or [], strict=True):
            segment.words = [Word(**word) for word in raw.get("words", [])]
    return list(restore_speech_timestamps(segments, clip.spans or [], SAMPLE_RATE)) if clip.spans else segments


def _word(word: Any) -> dict[str, Any]:
    return {
        "start": round(float(word.start), 3),
        "end": round(float(word.end), 3),
        "word": word.word,
        "probability": round(float(word.probability), 3),
    }
