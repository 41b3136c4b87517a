"""Speech through the real daemon: Whisper's real-time factor and what batching buys, Piper's first-chunk time.

STT: the real-time factor of one ~10 s clip (transcription time / audio length); then 8 different clips sent
together by 8 clients (the manager batches them) against the same 8 sent one after another, as audio seconds
transcribed per wall second. TTS: time to the first streamed chunk and real-time factor of a two-sentence text.
Rounds alternate so drift hits both sides alike; medians are reported. All clips are made by the Piper voice.

    stt_batch_speedup = throughput(8 concurrent) / throughput(8 one after another)

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/speech.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.daemon import REPO, running_daemon  # noqa: E402
from model_client import ModelClient  # noqa: E402
from model_client.protocol import MIB  # noqa: E402

WHISPER = REPO / "models" / "whisper-tiny.en"
VOICE = REPO / "models" / "piper" / "en_US-joe-medium.onnx"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please turn off the lights in the kitchen before you go to bed tonight.",
    "My favourite colour is blue and I like to swim in the ocean in summer.",
    "The meeting has been moved to Thursday afternoon at three o'clock.",
    "Can you tell me the weather forecast for tomorrow morning, please?",
    "She sells sea shells by the sea shore every single summer.",
    "A journey of a thousand miles begins with a single small step.",
    "The train to London leaves from platform nine in about ten minutes.",
]
LONG_TEXT = (
    "Good evening. Here is a short summary of the news. The weather will stay mild for the rest of the week, "
    "with light rain on Friday. The city council has approved the new cycle lanes downtown."
)
TWO_SENTENCES = "Paris is the capital of France. It is known for its museums and its food."


def daemon_config(device: str, batch_size: int, threads: int | None) -> dict:
    compute = "int8" if device == "cpu" else "float16"
    return {
        "limits": {"max_message_bytes": 64 * MIB},
        "manager": {"spare_workers": 0},
        "models": {
            "whisper": {
                "kind": "stt",
                "path": str(WHISPER),
                "device": device,
                "compute_type": compute,
                "batch_size": batch_size,
                "batch_wait_ms": 10,
                "n_threads": threads,
                "idle_ttl_s": -1,
                "max_queue": 64,
            },
            "joe": {"kind": "tts", "path": str(VOICE), "device": device, "idle_ttl_s": -1},
        },
    }


def sequential(client: ModelClient, clips: list[bytes]) -> float:
    started = time.perf_counter()
    for clip in clips:
        client.transcribe(clip, model="whisper", language="en")
    return time.perf_counter() - started


def concurrent(endpoint: str, clips: list[bytes]) -> tuple[float, list[int]]:
    clients = [ModelClient(endpoint, timeout=300) for _ in clips]
    for c in clients:
        c.ping()
    batches: list[int] = []
    barrier = threading.Barrier(len(clips) + 1)

    def run(c: ModelClient, clip: bytes) -> None:
        barrier.wait()
        batches.append(c.transcribe(clip, model="whisper", language="en").timings["batch"])

    threads = [threading.Thread(target=run, args=(c, clip)) for c, clip in zip(clients, clips, strict=True)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for c in clients:
        c.close()
    return elapsed, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 on cpu, 8 on cuda")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clips", type=int, default=len(SENTENCES), help="clips sent one by one, then together")
    args = parser.parse_args()
    batch_size = args.batch_size or (4 if args.device == "cpu" else 8)

    with running_daemon(daemon_config(args.device, batch_size, args.threads)) as client:
        client.load("whisper")
        client.load("joe")
        clips = [client.synthesize(text, voice="joe").audio for text in SENTENCES[: args.clips]]
        wavs = [clip.to_wav() for clip in clips]
        long_clip = client.synthesize(LONG_TEXT, voice="joe").audio
        audio_s = sum(clip.duration_s for clip in clips)

        rtf, seq_s, par_s, batch_seen, first_ms, tts_rtf = [], [], [], [], [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            client.transcribe(long_clip.to_wav(), model="whisper", language="en")
            rtf.append((time.perf_counter() - started) / long_clip.duration_s)
            seq_s.append(sequential(client, wavs))
            elapsed, batches = concurrent(client.endpoint, wavs)
            par_s.append(elapsed)
            batch_seen.append(max(batches))
            started = time.perf_counter()
            stream = client.synthesize_stream(TWO_SENTENCES, voice="joe")
            first, spoken = None, 0.0
            for chunk in stream:
                first = first if first is not None else (time.perf_counter() - started) * 1000
                spoken += chunk.duration_s
            first_ms.append(first or 0.0)
            tts_rtf.append((time.perf_counter() - started) / spoken)

    seq_tp = audio_s / statistics.median(seq_s)
    par_tp = audio_s / statistics.median(par_s)
    figures = {
        "device": args.device,
        "batch_size": batch_size,
        "stt_clip_s": round(long_clip.duration_s, 2),
        "stt_rtf": round(statistics.median(rtf), 4),
        "stt_seq_audio_s_per_s": round(seq_tp, 2),
        "stt_batched_audio_s_per_s": round(par_tp, 2),
        "stt_batch_speedup": round(par_tp / seq_tp, 3),
        "stt_largest_batch": max(batch_seen),
        "tts_first_chunk_ms": round(statistics.median(first_ms), 1),
        "tts_rtf": round(statistics.median(tts_rtf), 4),
    }
    rows = [
        ("STT real-time factor", f"{figures['stt_rtf']:.3f}", f"one {figures['stt_clip_s']} s clip"),
        (f"STT {len(clips)} clips one by one", f"{seq_tp:.1f} audio s/s", f"{audio_s:.1f} s of audio"),
        (
            f"STT {len(clips)} clips concurrent",
            f"{par_tp:.1f} audio s/s",
            f"largest batch {figures['stt_largest_batch']}",
        ),
        ("STT batch speedup", f"{figures['stt_batch_speedup']:.2f}x", f"batch_size {batch_size}"),
        ("TTS first chunk", f"{figures['tts_first_chunk_ms']:.0f} ms", "two sentences, streamed"),
        ("TTS real-time factor", f"{figures['tts_rtf']:.3f}", ""),
    ]
    print(f"speech benchmark, device {args.device}, {args.rounds} rounds (medians)")
    for name, value, note in rows:
        print(f"  {name:<26} {value:>18}   {note}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
