"""``mm talk FILE``: one spoken turn through the whole loop (STT, a persona, TTS), printed as a person reads it.

The client's ``mm`` finds this command through the ``model_manager.cli`` entry point, so the client never imports
the agents: installed alone it simply has no ``talk``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model_client.errors import BadRequest

HELP = "one spoken turn through the whole loop (STT, a persona, TTS)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the utterance, an audio file")
    parser.add_argument("--persona", help="the persona that must answer (default: the routing decides)")
    parser.add_argument("--session", help="a session id, to go on with a conversation (default: a new one)")
    parser.add_argument("-o", "--output", type=Path, help="write the spoken reply to this WAV file")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def run(args: argparse.Namespace) -> None:
    from agents.talk import talk  # the loop's sockets and services: only when the command runs

    try:
        audio = args.file.read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read {args.file}: {exc.strerror}") from None
    result = talk(audio, persona=args.persona, session_id=args.session, timeout=args.timeout)
    spoken = result.pop("audio", None)
    if args.output and spoken is not None:
        args.output.write_bytes(spoken.to_wav())
    result["wav"] = str(args.output) if args.output and spoken is not None else None
    result["reply_audio_s"] = round(spoken.duration_s, 2) if spoken is not None else 0.0
    if args.json:
        print(json.dumps(result))
        return
    print(f"heard:  {result['heard']}")
    if result["reply"] is None:
        print("(nothing was heard, so nobody answered)")
        return
    who = result["answered_by"]
    if result.get("fallback"):
        who += f" (for {result['persona']}: {result['fallback']['code']})"
    print(f"{who}: {result['reply']}")
    usage = result.get("usage") or {}
    tokens = f"prompt {usage.get('prompt_tokens')} tokens, {usage.get('cached_tokens')} cached"
    print(f"session {result['session_id']}, {tokens}")
    b = result["breakdown"]
    names = ("stt_ms", "llm_ttft_ms", "llm_total_ms", "tts_first_audio_ms", "first_audio_ms", "end_to_end_ms")
    print("  ".join(f"{name.removesuffix('_ms')} {b[name]:.0f} ms" for name in names if b.get(name) is not None))
    if result["wav"]:
        print(f"reply: {result['wav']} ({result['reply_audio_s']:.2f} s)")
