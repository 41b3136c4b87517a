"""A voice turn over OpenAI's Realtime API beside the same turn through ``mm talk``'s path, on the same clips, and
the Realtime turn again while chat streams load the persona's model.

Starts the voice loop of ``bench/voice_turn.py`` (the manager, the STT and TTS services, the Jarvis agent) and the
gateway, makes the questions with the Piper voice, and for each clip measures:

    talk_ms        ``mm talk``'s path: the clip sent (the utterance's end) to the first reply audio
    realtime_ms    the Realtime API: ``input_audio_buffer.speech_stopped`` to the first ``response.output_audio.delta``
                   (the clip streamed in 40 ms appends, then silence until the server's VAD ends the utterance)
    loaded_ms      realtime_ms while ``--streams`` chat streams run on the persona's model (normal priority)

Prints a table of medians, then one JSON line with ``realtime_added_ms`` (realtime - talk) and ``loaded_over_idle``.
Run: ``.venv/bin/python bench/realtime.py``.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from websockets.sync.client import connect

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.talk import talk  # noqa: E402
from bench.voice_turn import QUESTIONS, bench_config, loop_daemons  # noqa: E402
from daemonkit.process import DaemonProcess  # noqa: E402
from gateway.audio_codecs import OPENAI_PCM_RATE, resample  # noqa: E402
from model_client import ModelClient  # noqa: E402

CHUNK = OPENAI_PCM_RATE * 2 * 40 // 1000  # 40 ms of pcm16
SILENCE = b"\0\0" * OPENAI_PCM_RATE  # a second: the server's VAD ends the utterance within it
LONG = [{"role": "user", "content": "Count from 1 to 1000, one number a line: 1, 2, 3,"}]
TURN_TIMEOUT_S = 400.0  # a bound for a busy machine (the suite runs this beside other work), not an expectation


def realtime_first_audio(url: str, pcm: bytes) -> float:
    """Milliseconds from the server's end of speech to the answer's first audio; waits for the answer to end."""
    with connect(f"{url}/v1/realtime?model=jarvis", max_size=None) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        for start in range(0, len(pcm), CHUNK):
            ws.send(
                json.dumps(
                    {
                        "type": "input_audio_buffer.append",
                        "audio": base64.b64encode(pcm[start : start + CHUNK]).decode(),
                    }
                )
            )
        stopped = first = None
        while True:
            event = json.loads(ws.recv(timeout=TURN_TIMEOUT_S))
            if event["type"] == "input_audio_buffer.speech_stopped":
                stopped = time.perf_counter()
            elif event["type"] == "response.output_audio.delta" and first is None:
                first = time.perf_counter()
            elif event["type"] == "response.done":
                break
            elif event["type"] == "error":
                raise RuntimeError(event["error"])
    assert stopped is not None and first is not None, "no speech_stopped or no audio"
    return (first - stopped) * 1000


class ChatLoad:
    """``count`` long chat streams on the persona's model until stopped (their clients then go away)."""

    def __init__(self, endpoint: str, model: str, count: int) -> None:
        self.stop = threading.Event()
        self.running = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._run, args=(endpoint, model), daemon=True) for _ in range(count)]

    def _run(self, endpoint: str, model: str) -> None:
        with ModelClient(endpoint, timeout=300) as client:
            while not self.stop.is_set():
                first = True
                for _ in client.chat(model, LONG, max_tokens=1000, temperature=0.0, stream=True):
                    if first:
                        self.running.release()
                        first = False
                    if self.stop.is_set():
                        break

    def __enter__(self) -> ChatLoad:
        for thread in self.threads:
            thread.start()
        for _ in self.threads[:4]:  # those a parallel-4 model runs at once are streaming
            self.running.acquire(timeout=120)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=len(QUESTIONS))
    parser.add_argument("--streams", type=int, default=8, help="chat streams loading the model (0: no loaded run)")
    args = parser.parse_args()
    run = Path(tempfile.mkdtemp(prefix="mm-realtime-"))
    config = bench_config(run)
    config["gateway"] = {"port": 0}
    config_path = run / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    endpoint = config["endpoints"]["requests"]
    daemons = loop_daemons(config, config_path)
    gateway = DaemonProcess("gateway", config_path, endpoint, None, "--ports-file", str(run / "ports.json"))
    rows: list[dict[str, float]] = []
    try:
        for daemon in daemons:
            daemon.start(wait=False)
        for daemon in daemons:
            daemon.wait_ready(timeout=TURN_TIMEOUT_S)
        gateway.start(wait=False)
        url = f"http://127.0.0.1:{gateway.wait_ports(run / 'ports.json')['http']}".replace("http://", "ws://")
        with ModelClient(endpoint, timeout=TURN_TIMEOUT_S) as client:
            speech = [client.synthesize(q, format="pcm").audio for q in QUESTIONS[: args.turns]]
        clips = [audio.to_wav() for audio in speech]
        streamed = [resample(a.pcm, a.sample_rate, OPENAI_PCM_RATE) + SILENCE for a in speech]
        talk(
            clips[0], session_id="warm-up", timeout=TURN_TIMEOUT_S, config=config_path
        )  # loads every model, not measured
        realtime_first_audio(url, streamed[0])
        for clip, pcm in zip(clips, streamed, strict=True):
            talked = talk(clip, session_id="bench", timeout=TURN_TIMEOUT_S, config=config_path)["breakdown"][
                "first_audio_ms"
            ]
            rows.append({"talk_ms": talked, "realtime_ms": realtime_first_audio(url, pcm)})
        if args.streams:
            with ChatLoad(endpoint, "smollm2", args.streams):
                for row, pcm in zip(rows, streamed, strict=True):
                    row["loaded_ms"] = realtime_first_audio(url, pcm)
    finally:
        gateway.stop(timeout=30)
        for daemon in reversed(daemons):
            daemon.stop(timeout=30)
        shutil.rmtree(run, ignore_errors=True)

    names = ["talk_ms", "realtime_ms"] + (["loaded_ms"] if args.streams else [])
    medians = {name: round(statistics.median(r[name] for r in rows), 1) for name in names}
    print(f"first audio, {len(rows)} turns (medians, ms); loaded: {args.streams} chat streams on the model")
    for name in names:
        values = [r[name] for r in rows]
        print(f"  {name:<14} {medians[name]:>8.1f}   min {min(values):8.1f}   max {max(values):8.1f}")
    figures = {
        "turns": len(rows),
        **medians,
        "realtime_added_ms": round(medians["realtime_ms"] - medians["talk_ms"], 1),
        "streams": args.streams,
    }
    if args.streams:
        figures["loaded_over_idle"] = round(medians["loaded_ms"] / medians["realtime_ms"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
