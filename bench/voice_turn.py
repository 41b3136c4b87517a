"""One voice turn end to end: a spoken question in, the persona's spoken answer out, with the default models.

Starts the manager, the STT and TTS services and the Jarvis agent (each its own process, on sockets in a
temporary directory, configured like the shipped YAML), makes ten questions with the Piper voice, and puts each
through the loop as ``mm talk`` does, one session, one turn after another. Reports medians of the breakdown:

    stt_ms               the STT service, clip in to transcript out
    llm_ttft_ms          the persona's model, first token
    tts_first_audio_ms   the TTS service, first text piece in to its first audio
    first_audio_ms       the utterance's end (clip sent) to the first reply audio

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/voice_turn.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.talk import talk  # noqa: E402
from daemonkit.process import DaemonProcess  # noqa: E402
from model_client import ModelClient  # noqa: E402

QUESTIONS = [
    "Jarvis, what is the capital of France?",
    "What is the tallest mountain in the world?",
    "How many days are there in a week?",
    "What colour is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "Which planet is closest to the sun?",
    "What language do people speak in Spain?",
    "How many legs does a spider have?",
    "What is the largest ocean on Earth?",
]
FIGURES = (
    "stt_ms",
    "llm_ttft_ms",
    "llm_first_piece_ms",
    "llm_total_ms",
    "tts_first_audio_ms",
    "first_audio_ms",
    "end_to_end_ms",
)


def bench_config(run: Path) -> dict:
    """The shipped YAML with its sockets, state and history moved into ``run``; model paths made absolute."""
    config = yaml.safe_load((REPO / "config" / "llm_config.yaml").read_text())
    for spec in config["models"].values():
        spec["path"] = str((REPO / "config" / spec["path"]).resolve())
    config["endpoints"] = {k: f"ipc://{run}/{k}.sock" for k in ("requests", "events", "workers")}
    config["manager"] = {**config["manager"], "state_dir": str(run / "state"), "log_level": "warning"}
    config["kv_cache"] = {**config["kv_cache"], "spill_dir": str(run / "kv")}
    config["metrics"] = {**config.get("metrics", {}), "port": 0}
    stt, tts = config["services"]["stt"], config["services"]["tts"]
    stt.update(requests=f"ipc://{run}/stt.sock", events=f"ipc://{run}/stt-ev.sock")
    tts.update(requests=f"ipc://{run}/tts.sock", say=f"ipc://{run}/say.sock", events=f"ipc://{run}/tts-ev.sock")
    config["agents"].update(
        requests=f"ipc://{run}/agent-{{persona}}.sock",
        events=f"ipc://{run}/agent-{{persona}}-ev.sock",
        history_dir=str(run / "agents"),
    )
    return config


QUIET = ("--log-level", "warning")


def loop_daemons(config: dict, config_path: Path) -> list[DaemonProcess]:
    """The voice loop's processes on ``config``, the manager first: the STT and TTS services, the Jarvis agent."""
    services, persona = config["services"], config["agents"]["requests"].format(persona="jarvis")
    return [
        DaemonProcess("model_manager", config_path, config["endpoints"]["requests"]),
        DaemonProcess("services.stt", config_path, services["stt"]["requests"], None, *QUIET),
        DaemonProcess("services.tts", config_path, services["tts"]["requests"], None, *QUIET),
        DaemonProcess("agents", config_path, persona, None, "--persona", "jarvis", *QUIET),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=len(QUESTIONS))
    args = parser.parse_args()
    run = Path(tempfile.mkdtemp(prefix="mm-voice-"))
    config = bench_config(run)
    config_path = run / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    daemons = loop_daemons(config, config_path)
    rows: list[dict] = []
    try:
        for daemon in daemons:
            daemon.start(wait=False)
        for daemon in daemons:
            daemon.wait_ready(timeout=60)
        with ModelClient(config["endpoints"]["requests"], timeout=120) as client:
            clips = [client.synthesize(q).audio.to_wav() for q in QUESTIONS[: args.turns]]
        talk(
            clips[0], session_id="warm-up", timeout=300, config=config_path
        )  # loads the persona's model once, not measured
        for i, clip in enumerate(clips):
            result = talk(clip, session_id="bench", timeout=300, config=config_path)
            rows.append({**result["breakdown"], "cached_tokens": (result.get("usage") or {}).get("cached_tokens")})
            if os.environ.get("VOICE_TURN_DEBUG"):
                print("   ", result["breakdown"], result.get("usage"), result.get("stt_timings"), flush=True)
            print(f"  turn {i + 1:2}: {result['heard'][:44]:<44} -> {str(result['reply'])[:50]!r}", flush=True)
    finally:
        for daemon in reversed(daemons):  # the agent first: it talks to the others
            daemon.stop(timeout=30)
        shutil.rmtree(run, ignore_errors=True)

    medians = {name: round(statistics.median(r[name] for r in rows if r[name] is not None), 1) for name in FIGURES}
    print(f"voice turn, {len(rows)} turns of one session (medians, ms)")
    for name in FIGURES:
        values = [r[name] for r in rows if r[name] is not None]
        print(f"  {name:<20} {medians[name]:>8.1f}   min {min(values):8.1f}   max {max(values):8.1f}")
    figures = {
        "turns": len(rows),
        "stt_ms": medians["stt_ms"],
        "llm_ttft_ms": medians["llm_ttft_ms"],
        "llm_total_ms": medians["llm_total_ms"],
        "tts_first_audio_ms": medians["tts_first_audio_ms"],
        "first_audio_ms": medians["first_audio_ms"],
        "end_to_end_ms": medians["end_to_end_ms"],
        "cached_tokens_median": statistics.median(r["cached_tokens"] or 0 for r in rows),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
