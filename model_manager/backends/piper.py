"""Text to speech with Piper (ONNX Runtime): one voice per model, audio sentence by sentence.

Piper splits the text into sentences and yields each one's audio as soon as it is made; a streamed request sends
each as a chunk of raw s16 PCM, so a listener hears the first sentence while the next is still being made.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import onnxruntime
from piper import PiperVoice
from piper.config import PiperConfig, SynthesisConfig

from model_client.audio import pcm_to_wav
from model_client.errors import BadRequest, ModelLoadFailed
from model_manager.backends import PAYLOAD, Emit
from model_manager.config import KvCacheSettings, Limits, ModelSpec
from model_manager.worker_protocol import RunArgs, SynthesizeRun

SAMPLE_WIDTH = 2  # Piper makes 16-bit mono
CHANNELS = 1


class PiperBackend:
    should_stop = staticmethod(lambda: False)  # requests here are short: they run to the end
    batchable_ops: frozenset[str] = frozenset()
    batch_size = 1
    batch_wait_s = 0.0

    def __init__(self) -> None:
        self.voice: PiperVoice | None = None
        self.speaker: int | None = None

    def load(self, spec: ModelSpec, name: str, kv: KvCacheSettings | None, limits: Limits | None = None) -> dict:
        started = time.perf_counter()
        config = Path(spec.path + ".json")
        if not config.is_file():
            raise ModelLoadFailed(f"a Piper voice needs its config beside it: {config} is missing", path=str(config))
        try:
            settings = PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
            self.voice = PiperVoice(session=voice_session(spec), config=settings)
        except Exception as exc:
            raise ModelLoadFailed(f"cannot load the Piper voice at {spec.path}: {exc}", path=spec.path) from None
        self.speaker = spec.speaker
        return {
            "load_ms": round((time.perf_counter() - started) * 1000, 1),
            "sample_rate": self.voice.config.sample_rate,
            "speakers": self.voice.config.num_speakers,
            "device": spec.device,
        }

    def warm_up(self) -> None:
        assert self.voice is not None
        for _ in self.voice.synthesize("Ready."):
            pass

    def run(self, op: str, args: RunArgs, emit: Emit) -> dict[str, Any]:
        if not isinstance(args, SynthesizeRun):
            raise BadRequest(f"a text-to-speech voice does not serve {op!r}")
        assert self.voice is not None
        voice = self.voice
        speaker = args.speaker if args.speaker is not None else self.speaker
        if speaker is not None and speaker >= voice.config.num_speakers:
            raise BadRequest(f"speaker {speaker} is out of range: this voice has {voice.config.num_speakers}")
        config = SynthesisConfig(speaker_id=speaker, length_scale=voice.config.length_scale / args.speed)
        stream = args.stream
        started = time.perf_counter()
        first_ms: float | None = None
        parts: list[bytes] = []
        samples = 0
        for seq, chunk in enumerate(voice.synthesize(args.text, config)):
            pcm = chunk.audio_int16_bytes
            samples += len(pcm) // SAMPLE_WIDTH
            if first_ms is None:
                first_ms = (time.perf_counter() - started) * 1000
            if stream:
                emit(
                    {
                        "seq": seq,
                        "samples": len(pcm) // SAMPLE_WIDTH,
                        "sample_rate": voice.config.sample_rate,
                        "sample_width": SAMPLE_WIDTH,
                        "channels": CHANNELS,
                        PAYLOAD: pcm,
                    }
                )
            else:
                parts.append(pcm)
        total_ms = (time.perf_counter() - started) * 1000
        rate = voice.config.sample_rate
        result: dict[str, Any] = {
            "sample_rate": rate,
            "sample_width": SAMPLE_WIDTH,
            "channels": CHANNELS,
            "format": "pcm" if stream else args.format,
            "duration_s": round(samples / rate, 3),
            "timings": {"first_chunk_ms": round(first_ms or total_ms, 2), "synth_ms": round(total_ms, 2)},
        }
        if not stream:
            pcm = b"".join(parts)
            result[PAYLOAD] = pcm_to_wav(pcm, rate, SAMPLE_WIDTH, CHANNELS) if result["format"] == "wav" else pcm
        return result

    def after_reply(self, idle: bool) -> None:
        pass

    def kv_stats(self) -> None:
        return None

    def unload(self) -> None:
        self.voice = None


def session_providers(spec: ModelSpec) -> list[Any]:
    """Where the voice runs: on the GPU the manager placed it on (``spec.gpu``; Piper's own loader always takes
    GPU 0, so a voice booked on cuda:1 would run on GPU 0), else the CPU."""
    if spec.device == "cuda":
        cuda = {"device_id": spec.gpu or 0, "cudnn_conv_algo_search": "HEURISTIC"}
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def voice_session(spec: ModelSpec) -> onnxruntime.InferenceSession:
    """The voice's ONNX session: on its GPU, or on the CPU with the manager's share of the cores
    (model_manager/threads.py; Piper's own loader takes every core)."""
    options = onnxruntime.SessionOptions()
    if spec.n_threads and spec.device != "cuda":
        options.intra_op_num_threads, options.inter_op_num_threads = spec.n_threads, 1
    return onnxruntime.InferenceSession(spec.path, sess_options=options, providers=session_providers(spec))
