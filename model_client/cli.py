"""``mm``: look at and drive the model manager from a shell (``mm status`` is the ``ollama ps`` of this product)."""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from model_client import catalogue_commands
from model_client.client import Conversation, ModelClient
from model_client.errors import BadRequest, ModelManagerError
from model_client.security import make_keys


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _conversations(kv: dict[str, int] | None) -> str:
    if not kv:
        return "-"
    spilled = f" +{kv['spilled']} on disk" if kv.get("spilled") else ""
    live = f"{kv['live']} live, " if kv.get("live") else ""
    return f"{live}{kv['conversations']} ({_size(kv['bytes'])}){spilled}"


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]


def format_status(status: dict[str, Any]) -> str:
    """Two tables: models (like ``ollama ps``) and devices, then one line about the manager."""
    models = _table(
        (
            "MODEL",
            "KIND",
            "DEVICE",
            "THREADS",
            "SIZE",
            "STATE",
            "IDLE",
            "TTL LEFT",
            "REQUESTS",
            "BUSY+QUEUE",
            "CONVERSATIONS",
            "PID",
        ),
        [
            (
                m["name"] + (f"@{m['variant']}" if m.get("variant") else ""),
                m.get("kind", "llm"),
                m["device"] or "-",
                str(m.get("threads") or "-"),
                _size(m["size_bytes"] or m["measured_bytes"] or m["estimated_bytes"]),
                m["state"] + (f" ({m['last_error']['code']})" if m.get("last_error") else ""),
                _ago(m["idle_s"]),
                "pinned" if m.get("pinned") else _ago(m["ttl_left_s"]) if m["ttl_s"] >= 0 else "forever",
                str(m["requests"]),
                f"{m['in_flight']}/{m.get('parallel', 1)}+{m['queued']}",
                _conversations(m.get("kv_cache")),
                str(m["pid"] or "-"),
            )
            for m in status["models"]
        ],
    )
    devices = status.get("devices") or {"list": [], "mode": "?"}
    device_rows = _table(
        ("DEVICE", "NAME", "TOTAL", "OTHERS", "RESERVED", "BUDGET", "FREE", "MODELS"),
        [
            (
                d["id"],
                d["name"],
                _size(d["total_bytes"]),
                _size(d["used_by_others_bytes"]),
                _size(d["reserved_bytes"]),
                _size(d["budget_bytes"]) if d.get("budget_bytes") else "-",
                _size(d["free_bytes"]),
                str(d["models"]),
            )
            for d in devices["list"]
        ],
    )
    mode = devices["mode"] + (" (SIMULATED devices)" if devices.get("simulated") else "")
    if devices.get("reason"):
        mode += f": {devices['reason']}"
    manager = status["manager"]
    footer = f"manager pid {manager['pid']}, up {_ago(manager['uptime_s'])}, {manager['workers']} workers"
    footer += f"; devices {mode}"
    refused = manager.get("refused") or {}
    counts = {**refused.get("handshakes", {}), **refused.get("requests", {})}
    if refused.get("subscriber_resets"):
        counts["subscriber_resets"] = refused["subscriber_resets"]
    if counts:
        footer += "\nrefused peers: " + ", ".join(f"{what} {n}" for what, n in sorted(counts.items()))
    errors = [f"{m['name']}: {m['last_error']['message']}" for m in status["models"] if m.get("last_error")]
    if errors:
        footer += "\nlast errors:\n  " + "\n  ".join(errors)
    return "\n".join([*models, "", *device_rows, "", footer])


def _chat(client: ModelClient, model: str, system: str | None, max_tokens: int) -> None:
    conversation = Conversation(client, model, system=system, params={"max_tokens": max_tokens})
    print(f"chatting with {model} (conversation {conversation.conversation_id[:8]}); Ctrl-D to end", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        if not line.strip():
            continue
        started = time.perf_counter()
        for piece in conversation.stream(line):
            print(piece, end="", flush=True)
        print(f"\n[{time.perf_counter() - started:.2f} s]", file=sys.stderr)


def _transcribe(client: ModelClient, args: argparse.Namespace) -> None:
    try:
        audio = args.file.read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read {args.file}: {exc.strerror}") from None
    options = {"language": args.language, "beam_size": args.beam_size, "vad_filter": args.vad}
    transcript = client.transcribe(audio, model=args.model, **options)
    if args.segments:
        for segment in transcript.segments:
            print(f"[{segment['start']:7.2f} -> {segment['end']:7.2f}] {segment['text']}")
    else:
        print(transcript.text)
    took = transcript.timings.get("total_ms", 0.0) + transcript.timings.get("queue_ms", 0.0)
    print(f"[{transcript.duration_s:.2f} s of audio, {transcript.language}, {took:.0f} ms]", file=sys.stderr)


def _keys(directory: Path, clients: tuple[str, ...]) -> int:
    made = make_keys(directory, clients)
    print(f"server key pair: {made['server_public']} (give to clients), {made['server_secret']} (keep here)")
    for name in clients:
        print(f"client {name!r}: {made[f'{name}_secret']} (give to that client only), public key authorized")
    print("\nIn config/llm_config.yaml:")
    print(f"  security:\n    curve_server_secret_key: {made['server_secret'].resolve()}")
    print(f"    curve_authorized_keys: {made['authorized'].resolve()}")
    print(f"Clients: export MM_CURVE_CLIENT_KEY=<client .key_secret> MM_CURVE_SERVER_KEY={made['server_public']}")
    return 0


COMMANDS_GROUP = "model_manager.cli"  # entry points: commands the stack's other packages add (the agents' `talk`)


def _added_commands() -> dict[str, Any]:
    """Commands other installed packages add to ``mm``, each a module with ``HELP``, ``add_arguments(parser)`` and
    ``run(args)``: the client names no package above it, and a client installed alone simply has none."""
    return {entry.name: entry.load() for entry in entry_points(group=COMMANDS_GROUP)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mm", description="Talk to the model manager.")
    parser.add_argument("--endpoint", help="manager endpoint (default: MM_ENDPOINT, else the config)")
    parser.add_argument("--timeout", type=float, default=120.0)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ping", help="check that the manager answers")
    sub.add_parser("status", help="what is loaded where")
    sub.add_parser("models", help="the catalogue")
    for name in ("load", "unload"):
        sub.add_parser(name, help=f"{name} a model").add_argument("model")
    chat = sub.add_parser("chat", help="interactive, streamed chat")
    chat.add_argument("model")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=256, help="the longest reply (default: 256)")
    transcribe = sub.add_parser("transcribe", help="speech to text of an audio file (WAV, FLAC, MP3, OGG, ...)")
    transcribe.add_argument("file", type=Path)
    transcribe.add_argument("--model", help="an stt model of the catalogue (default: the first)")
    transcribe.add_argument("--language", help="e.g. en (default: detected)")
    transcribe.add_argument("--beam-size", type=int, default=1)
    transcribe.add_argument("--vad", action="store_true", help="skip silence with the VAD")
    transcribe.add_argument("--segments", action="store_true", help="print each segment with its times")
    say = sub.add_parser("say", help="text to speech into a WAV file")
    say.add_argument("text")
    say.add_argument("-o", "--output", type=Path, default=Path("say.wav"), help="WAV file to write (say.wav)")
    say.add_argument("--voice", help="a tts model of the catalogue (default: the first)")
    say.add_argument("--speed", type=float, default=1.0)
    catalogue_commands.add_arguments(sub)
    added = _added_commands()
    for name, command in added.items():
        command.add_arguments(sub.add_parser(name, help=command.HELP))
    keys = sub.add_parser("keys", help="make CURVE key pairs for a manager on a network address")
    keys.add_argument("--dir", type=Path, default=Path("keys"), help="where to write them (default: keys/)")
    keys.add_argument("--client", action="append", help="a client's name (repeatable; default: one 'client')")
    keys.add_argument("--api", action="store_true", help="print a bearer API key for the HTTP gateway instead")
    args = parser.parse_args(argv)
    if args.command == "keys" and args.api:
        key = secrets.token_urlsafe(32)
        print(key)
        print(f'\nIn config/llm_config.yaml:\n  gateway:\n    api_keys: ["{key}"]', file=sys.stderr)
        print("Clients send: Authorization: Bearer <the key>", file=sys.stderr)
        return 0
    if args.command == "keys":
        return _keys(args.dir, tuple(args.client or ["client"]))

    with ModelClient(args.endpoint, timeout=args.timeout) as client:
        try:
            if args.command == "ping":
                started = time.perf_counter()
                reply = client.ping()
                print(f"pong from pid {reply['pid']} in {(time.perf_counter() - started) * 1000:.2f} ms")
            elif args.command == "status":
                print(format_status(client.status()))
            elif args.command == "models":
                for model in client.models():
                    exists = "" if model["file_exists"] else "  (file missing)"
                    label = model["quantization"] or model.get("compute_type") or "-"
                    print(f"{model['name']:<20} {model['kind']:<5} {label:<8} {model['path']}{exists}")
            elif args.command in ("load", "unload"):
                result = getattr(client, args.command)(args.model)
                print(f"{result['name']}: {result['state']}")
            elif args.command == "chat":
                _chat(client, args.model, args.system, args.max_tokens)
            elif args.command in catalogue_commands.COMMANDS:
                return catalogue_commands.run(client, args)
            elif args.command in added:
                added[args.command].run(args)
            elif args.command == "transcribe":
                _transcribe(client, args)
            elif args.command == "say":
                speech = client.synthesize(args.text, voice=args.voice, speed=args.speed)
                args.output.write_bytes(speech.audio.to_wav())
                timings = speech.timings
                print(
                    f"{args.output}: {speech.audio.duration_s:.2f} s of speech ({speech.model}), "
                    f"first audio {timings['first_chunk_ms']:.0f} ms, made in {timings['synth_ms']:.0f} ms"
                )
        except ModelManagerError as exc:
            print(f"mm: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
