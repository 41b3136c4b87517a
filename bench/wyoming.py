"""A Home Assistant satellite's turn through the Wyoming service vs the same turn through ``mm talk``'s path.

Starts the manager, the STT and TTS services, the Jarvis agent and the Wyoming service (each its own process,
configured like the shipped YAML, sockets and ports of their own), makes spoken questions with the Piper voice and
puts each through both paths, alternating which goes first:

    talk      the clip to the STT service, the transcript routed to the Jarvis agent, its reply's pieces spoken by
              the TTS service (``mm talk``): first audio counted from the clip sent
    wyoming   what Home Assistant does with Wyoming services: the utterance in 20 ms chunks to the asr port, the
              transcript to Jarvis's handle port, its streamed reply fed as it comes into streaming synthesis on the
              tts port: first audio counted from ``audio-stop`` (the end of the utterance)

Each path has its own conversation per pass over the questions, so both reuse their cache alike, and its own
instance of the persona's model (one file, loaded twice), so neither reuses the other's identical prompt; one seed
makes both sample the same reply. The Wyoming utterance's chunks are all read by the service before the clock
starts (a satellite streams in real time). Reports the medians and the median of the paired differences, for the
transcript, the rest, and the first audio: the Wyoming path's added latency (target: at most 50 ms). Prints a
table, then one JSON line of figures. Run: ``.venv/bin/python bench/wyoming.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

# This file's folder leaves the path: its name would hide the `wyoming` package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wyoming.asr import Transcribe, Transcript  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.event import Event  # noqa: E402
from wyoming.handle import Handled, HandledChunk  # noqa: E402
from wyoming.info import Describe  # noqa: E402
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop  # noqa: E402

from agents.talk import talk  # noqa: E402
from bench.voice_turn import QUESTIONS, QUIET, bench_config, loop_daemons  # noqa: E402
from daemonkit.process import DaemonProcess  # noqa: E402
from model_client import ModelClient  # noqa: E402
from model_client.audio import Audio, read_wav  # noqa: E402

TARGET_ADDED_MS = 50.0
CHUNK_MS = 20


async def read_until(client: AsyncTcpClient, kind: str) -> list[Event]:
    events = []
    async with asyncio.timeout(120):
        while True:
            event = await client.read_event()
            if event is None or event.type == "error":
                raise RuntimeError(f"the Wyoming service answered {event} after {[e.type for e in events]}")
            events.append(event)
            if event.type == kind:
                return events


async def wyoming_turn(ports: dict[str, int], audio: Audio, conversation: str) -> dict:
    """One satellite turn as Home Assistant runs it: asr, then handle streamed into tts streaming."""
    rate, step = audio.sample_rate, audio.sample_rate * 2 * CHUNK_MS // 1000
    async with AsyncTcpClient("127.0.0.1", ports["asr"]) as asr:
        await asr.write_event(Transcribe(language="en").event())
        await asr.write_event(AudioStart(rate=rate, width=2, channels=1).event())
        for at in range(0, len(audio.pcm), step):
            await asr.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=audio.pcm[at : at + step]).event())
        # A satellite streams in real time, so its chunks are read by the time the utterance ends: the answer to a
        # describe sent after them says the service has read them all, and the clock starts at audio-stop.
        await asr.write_event(Describe().event())
        await read_until(asr, "info")
        await asr.write_event(AudioStop().event())
        ended = time.monotonic()  # the end of the utterance
        heard = Transcript.from_event((await read_until(asr, "transcript"))[-1]).text
    transcript_ms = (time.monotonic() - ended) * 1000
    first_audio: list[float] = []
    first_text: list[float] = []

    async def speak(tts: AsyncTcpClient) -> None:
        async with asyncio.timeout(120):
            while (event := await tts.read_event()) is not None and event.type != "synthesize-stopped":
                if event.type == "error":
                    raise RuntimeError(f"tts: {event.data}")
                if event.type == "audio-chunk" and not first_audio:
                    first_audio.append(time.monotonic())

    async with (
        AsyncTcpClient("127.0.0.1", ports["jarvis"]) as handle,
        AsyncTcpClient("127.0.0.1", ports["tts"]) as tts,
    ):
        await tts.write_event(SynthesizeStart().event())
        listener = asyncio.create_task(speak(tts))
        await handle.write_event(Transcript(heard, context={"conversation_id": conversation}).event())
        async with asyncio.timeout(120):
            while True:
                event = await handle.read_event()
                if event is None or event.type == "error":
                    raise RuntimeError(f"handle: {event}")
                if HandledChunk.is_type(event.type):
                    first_text.append(time.monotonic())
                    await tts.write_event(SynthesizeChunk(text=HandledChunk.from_event(event).text).event())
                elif Handled.is_type(event.type):
                    reply = Handled.from_event(event).text or ""
                    break
        await tts.write_event(SynthesizeStop().event())
        await listener
    return {
        "heard": heard,
        "reply": reply,
        "transcript_ms": transcript_ms,
        "first_text_ms": (first_text[0] - ended) * 1000 if first_text else None,
        "first_audio_ms": (first_audio[0] - ended) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=len(QUESTIONS))
    parser.add_argument("--repeats", type=int, default=2, help="times the questions are asked (pairs = turns x this)")
    args = parser.parse_args()
    run = Path(tempfile.mkdtemp(prefix="mm-wyoming-"))
    config = bench_config(run)
    # One seed: both paths sample the same reply, so their first spoken pieces are the same length.
    config["personas"]["jarvis"]["generation"]["seed"] = 7
    config["wyoming"] = {"asr_port": 0, "tts_port": 0, "handle_ports": {"jarvis": 0}}  # any free ports
    config["gateway"] = {"port": 0}
    # The Wyoming path's Jarvis runs on a second instance of the same model file: the two paths then reuse only
    # their own conversation's cache, never each other's (one engine would copy the other path's identical prompt).
    config["models"]["smollm2-wyoming"] = dict(config["models"]["smollm2"])
    config_path = run / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    wyoming_config = copy.deepcopy(config)
    wyoming_config["personas"]["jarvis"]["model"] = "smollm2-wyoming"
    wyoming_path = run / "wyoming.yaml"
    wyoming_path.write_text(yaml.safe_dump(wyoming_config))
    daemons = loop_daemons(config, config_path)
    ports_file = run / "wyoming.ports.json"
    wyoming = DaemonProcess(
        "services.wyoming", wyoming_path, config["endpoints"]["requests"], None, *QUIET, "--ports-file", str(ports_file)
    )
    rows: list[dict] = []
    try:
        for daemon in daemons:
            daemon.start(wait=False)
        for daemon in daemons:
            daemon.wait_ready(timeout=60)
        wyoming.start(wait=False)
        ports = wyoming.wait_ports(ports_file, timeout=60)
        with ModelClient(config["endpoints"]["requests"], timeout=120) as client:
            wavs = [client.synthesize(q).audio.to_wav() for q in QUESTIONS[: args.turns]]
        talk(wavs[0], session_id="warm-up", timeout=300, config=config_path)  # loads the models once, not measured
        asyncio.run(wyoming_turn(ports, read_wav(wavs[0]), "warm-up"))
        for i, wav in enumerate(wavs * args.repeats):
            order = ("talk", "wyoming") if i % 2 == 0 else ("wyoming", "talk")
            session = f"bench-{i // len(wavs)}"  # a conversation per pass over the questions
            row: dict = {}
            for path in order:
                if path == "talk":
                    result = talk(wav, session_id=session, timeout=300, config=config_path)
                    breakdown = result["breakdown"]
                    row.update(talk=breakdown["first_audio_ms"], talk_transcript=breakdown["stt_ms"])
                else:
                    result = asyncio.run(wyoming_turn(ports, read_wav(wav), session))
                    row.update(wyoming=result["first_audio_ms"], wyoming_transcript=result["transcript_ms"])
                row[f"{path}_rest"] = row[path] - row[f"{path}_transcript"]
                row[f"{path}_reply"] = result["reply"]
            rows.append(row)
            same = "same reply" if row["talk_reply"].strip() == row["wyoming_reply"].strip() else "replies differ"
            print(
                f"  turn {i + 1:2}: talk {row['talk']:7.1f} ms   wyoming {row['wyoming']:7.1f} ms   ({same})",
                flush=True,
            )
    finally:
        wyoming.stop(timeout=30)
        for daemon in reversed(daemons):
            daemon.stop(timeout=30)
        shutil.rmtree(run, ignore_errors=True)

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 1)

    def added(stage: str) -> float:
        return round(statistics.median(r[f"wyoming{stage}"] - r[f"talk{stage}"] for r in rows), 1)

    print(f"\nafter the end of the utterance, {len(rows)} turns (medians, ms)    mm talk   Wyoming   added (paired)")
    for label, stage in (("transcript", "_transcript"), ("then to first audio", "_rest"), ("first audio", "")):
        talk_ms, wyoming_ms = median(f"talk{stage}"), median(f"wyoming{stage}")
        print(f"  {label:<48} {talk_ms:8.1f}  {wyoming_ms:8.1f}  {added(stage):8.1f}")
    print(f"  target: added to first audio <= {TARGET_ADDED_MS:.0f} ms")
    figures = {
        "turns": len(rows),
        "talk_first_audio_ms": median("talk"),
        "wyoming_first_audio_ms": median("wyoming"),
        "added_transcript_ms": added("_transcript"),
        "added_after_transcript_ms": added("_rest"),
        "added_first_audio_ms": added(""),
        "target_added_ms": TARGET_ADDED_MS,
        "met": added("") <= TARGET_ADDED_MS,
        "same_replies": sum(r["talk_reply"].strip() == r["wyoming_reply"].strip() for r in rows),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
