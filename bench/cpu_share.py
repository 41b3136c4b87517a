"""CPU threads shared between models: a prompt's evaluation alone and with Whisper transcribing beside it, with the
manager handing threads out (``devices.cpu_threads: auto``) against each engine taking its own default (``0``).

For each mode a daemon runs SmolLM2 (``parallel`` 4, as shipped), Whisper tiny.en and the Piper voice, all with
their thread counts left to the manager. A prompt of about ``--prompt-words`` words (a new one each time, so
nothing is reused) is evaluated with ``max_tokens`` 1: its time to first token, alone, then while another client
transcribes a ~10 s clip over and over; and the transcription's own time alone and beside the prompts. Rounds
alternate; medians are reported.

    prompt_beside_speedup = prompt TTFT beside Whisper, engines' defaults / the same, threads handed out
    prompt_alone_speedup  = prompt TTFT alone, engines' defaults / the same, threads handed out
    *_slowdown            = beside / alone, per mode

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/cpu_share.py`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.daemon import REPO, SMOLLM2, llm_entry, running_daemon  # noqa: E402
from model_client import ModelClient  # noqa: E402
from model_client.protocol import MIB  # noqa: E402

WHISPER = REPO / "models" / "whisper-tiny.en"
VOICE = REPO / "models" / "piper" / "en_US-joe-medium.onnx"
SPOKEN = (
    "Good evening. Here is a short summary of the news. The weather will stay mild for the rest of the week, "
    "with light rain on Friday. The city council has approved the new cycle lanes downtown."
)
WORDS = "the house keeps its lights low in the evening while the kettle warms and the radio plays a quiet song".split()
MODES = {"defaults": 0, "handed out": "auto"}


def config(cpu_threads: int | str) -> dict:
    return {
        "limits": {"max_message_bytes": 64 * MIB},
        "manager": {"spare_workers": 0},
        "devices": {"cpu_threads": cpu_threads},
        "models": {
            "smollm2": llm_entry(SMOLLM2, "Q4_1", None, parallel=4),
            "whisper": {"kind": "stt", "path": str(WHISPER), "compute_type": "int8", "idle_ttl_s": -1},
            "joe": {"kind": "tts", "path": str(VOICE), "idle_ttl_s": -1},
        },
    }


def prompt_ttft(client: ModelClient, number: int, words: int) -> float:
    text = f"Note {number}: " + " ".join(itertools.islice(itertools.cycle(WORDS), words)) + "\nSummary:"
    started = time.perf_counter()
    client.complete("smollm2", text, max_tokens=1, cache=False)
    return (time.perf_counter() - started) * 1000


def transcribe_ms(client: ModelClient, clip: bytes) -> float:
    started = time.perf_counter()
    client.transcribe(clip, model="whisper", language="en")
    return (time.perf_counter() - started) * 1000


def measure(cpu_threads: int | str, rounds: int, words: int) -> dict[str, float]:
    with running_daemon(config(cpu_threads)) as client:
        for model in ("smollm2", "whisper", "joe"):
            client.load(model)
        clip = client.synthesize(SPOKEN, voice="joe").audio.to_wav()
        client.unload("joe")
        numbers = itertools.count()
        prompt_ttft(client, next(numbers), words)  # the worker's first request pays for its buffers
        alone = [prompt_ttft(client, next(numbers), words) for _ in range(rounds)]
        stt_alone = [transcribe_ms(client, clip) for _ in range(rounds)]
        stop, transcribing, stt_beside = threading.Event(), threading.Event(), []

        def transcribe_loop() -> None:
            with ModelClient(client.endpoint, timeout=300) as other:
                while not stop.is_set():
                    transcribing.set()
                    stt_beside.append(transcribe_ms(other, clip))

        loop = threading.Thread(target=transcribe_loop)
        loop.start()
        transcribing.wait()
        beside = [prompt_ttft(client, next(numbers), words) for _ in range(rounds)]
        stop.set()
        loop.join()
        threads = {m["name"]: m.get("threads") for m in client.status()["models"]}
    return {
        "prompt_alone_ms": statistics.median(alone),
        "prompt_beside_ms": statistics.median(beside),
        "stt_alone_ms": statistics.median(stt_alone),
        "stt_beside_ms": statistics.median(stt_beside),
        "llm_threads": threads.get("smollm2") or 0,
        "stt_threads": threads.get("whisper") or 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-words", type=int, default=250)
    parser.add_argument("--only", choices=sorted(MODES), help="one mode alone (no comparison; the tests' tiny mode)")
    args = parser.parse_args()

    modes = {args.only: MODES[args.only]} if args.only else MODES
    results = {name: measure(setting, args.rounds, args.prompt_words) for name, setting in modes.items()}
    print(f"{'threads':<12}{'LLM/STT thr':>12}{'prompt alone':>14}{'beside STT':>12}{'STT alone':>11}{'beside':>9}")
    figures: dict[str, float] = {"rounds": args.rounds, "prompt_words": args.prompt_words}
    for name, r in results.items():
        shown = f"{r['llm_threads'] or '-'}/{r['stt_threads'] or '-'}"
        print(
            f"{name:<12}{shown:>12}{r['prompt_alone_ms']:>12.0f}ms{r['prompt_beside_ms']:>10.0f}ms"
            f"{r['stt_alone_ms']:>9.0f}ms{r['stt_beside_ms']:>7.0f}ms"
        )
        key = name.replace(" ", "_")
        for field, value in r.items():
            figures[f"{key}_{field}"] = round(value, 1)
        figures[f"{key}_prompt_slowdown"] = round(r["prompt_beside_ms"] / r["prompt_alone_ms"], 3)
        figures[f"{key}_stt_slowdown"] = round(r["stt_beside_ms"] / r["stt_alone_ms"], 3)
    if len(results) == len(MODES):
        before, after = results["defaults"], results["handed out"]
        figures["prompt_beside_speedup"] = round(before["prompt_beside_ms"] / after["prompt_beside_ms"], 3)
        figures["prompt_alone_speedup"] = round(before["prompt_alone_ms"] / after["prompt_alone_ms"], 3)
        figures["stt_beside_speedup"] = round(before["stt_beside_ms"] / after["stt_beside_ms"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
