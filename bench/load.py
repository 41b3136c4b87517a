"""The manager under load: 4 to 512 concurrent clients, short `chat` and `transcribe` requests, the way a
published Ray Serve Whisper deployment reports it (average and p95 latency, error rate per concurrency level).

Every client is a DEALER socket of its own (one asyncio loop drives them all), sends its requests one after
another over the daemon's loopback TCP endpoint, and waits at most ``--timeout`` for each. Outcomes: ok; shed
(an explicit ``busy``: the queue was full, counted apart, not an error); error (anything else, timeouts included).
Each level is bounded in requests and time. A soak run then keeps 16 clients busy and compares the manager's
resident memory at its start and end.

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/load.py [--levels 4,16,64]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import psutil
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.daemon import REPO, SMOLLM2, llm_entry, running_daemon  # noqa: E402
from model_client import protocol  # noqa: E402
from model_client.protocol import MIB  # noqa: E402

WHISPER = REPO / "models" / "whisper-tiny.en"
VOICE = REPO / "models" / "piper" / "en_US-joe-medium.onnx"
LEVELS = (4, 16, 64, 128, 256, 512)
SOAK_CLIENTS = 16  # fewer than the queue holds: every request is served, none shed
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}


class Sampler:
    """The manager process's resident memory, sampled while a level runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            await asyncio.sleep(0.1)

    def now(self) -> int:
        return self.process.memory_info().rss


async def one_client(
    ctx: zmq.asyncio.Context,
    endpoint: str,
    op: str,
    args: dict,
    payloads: tuple,
    count: int,
    timeout: float,
    results: list,
    until: float,
) -> None:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for _ in range(count):
            if time.monotonic() > until:
                return
            request = protocol.Request(op=op, args=args, payloads=payloads, deadline_ms=timeout * 1000)
            started = time.perf_counter()
            await sock.send_multipart([b"", *protocol.encode_request(request)])
            outcome = "error"
            try:
                while True:
                    frames = await asyncio.wait_for(sock.recv_multipart(), timeout)
                    reply = protocol.decode_reply(frames[1:])
                    if reply.id == request.id and reply.is_final:
                        break
                if reply.type == protocol.REPLY_RESULT:
                    outcome = "ok"
                elif reply.body.get("code") == "busy":
                    outcome = "shed"
            except TimeoutError:
                sock.close(linger=0)  # a late reply must not be taken for the next request's
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
            results.append((outcome, (time.perf_counter() - started) * 1000))
    finally:
        sock.close(linger=0)


async def level(
    endpoint: str,
    sampler: Sampler,
    op: str,
    args: dict,
    payloads: tuple,
    clients: int,
    total: int,
    timeout: float,
    budget_s: float,
) -> dict:
    ctx = zmq.asyncio.Context()
    results: list[tuple[str, float]] = []
    per_client = max(1, total // clients)
    until = time.monotonic() + budget_s
    stop = asyncio.Event()
    sampler.peak = 0
    watcher = asyncio.create_task(sampler.run(stop))
    started = time.perf_counter()
    await asyncio.gather(
        *(one_client(ctx, endpoint, op, args, payloads, per_client, timeout, results, until) for _ in range(clients))
    )
    elapsed = time.perf_counter() - started
    stop.set()
    await watcher
    ctx.term()
    ok = sorted(ms for outcome, ms in results if outcome == "ok")
    n = len(results)
    return {
        "op": op,
        "clients": clients,
        "requests": n,
        "ok": len(ok),
        "avg_ms": round(statistics.fmean(ok), 1) if ok else None,
        "p95_ms": round(ok[min(len(ok) - 1, int(0.95 * len(ok)))], 1) if ok else None,
        "error_rate": round(sum(1 for o, _ in results if o == "error") / n, 4) if n else 0.0,
        "shed_rate": round(sum(1 for o, _ in results if o == "shed") / n, 4) if n else 0.0,
        "throughput_rps": round(len(ok) / elapsed, 2),
        "max_rss_mb": round(sampler.peak / MIB, 1),
    }


async def soak(endpoint: str, sampler: Sampler, seconds: float, timeout: float) -> dict:
    before = sampler.now()
    result = await level(endpoint, sampler, "chat", CHAT, (), SOAK_CLIENTS, 10**9, timeout, seconds)
    after = sampler.now()
    return {
        "seconds": seconds,
        "clients": SOAK_CLIENTS,
        "requests": result["requests"],
        "ok": result["ok"],
        "error_rate": result["error_rate"],
        "shed_rate": result["shed_rate"],
        "rss_start_mb": round(before / MIB, 1),
        "rss_end_mb": round(after / MIB, 1),
        "rss_growth_mb": round((after - before) / MIB, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--requests", type=int, default=256, help="per level, at least one per client")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a client waits for each reply")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per level at most")
    parser.add_argument("--soak", type=float, default=20.0, help="seconds of soak; 0 skips it")
    parser.add_argument("--parallel", type=int, default=4, help="the chat model's sequences (continuous batching)")
    parser.add_argument("--ops", default="chat,transcribe")
    parser.add_argument("--max-queue", type=int, default=64, help="the chat model's queue")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    config = {
        "endpoints": {"requests": "tcp://127.0.0.1:*"},  # any free port
        "manager": {"spare_workers": 0},
        "limits": {"requests_per_second": 1000, "burst": 1000},
        "models": {
            "smollm2": llm_entry(SMOLLM2, "Q4_1", None, max_queue=args.max_queue, parallel=args.parallel),
            "whisper": {
                "kind": "stt",
                "path": str(WHISPER),
                "compute_type": "int8",
                "batch_size": 4,
                "idle_ttl_s": -1,
                "max_queue": 32,
            },
            "joe": {"kind": "tts", "path": str(VOICE), "idle_ttl_s": -1},
        },
    }
    rows = []
    with running_daemon(config) as client:
        client.load("smollm2")
        client.load("whisper")
        clip = client.synthesize("Please turn off the lights in the kitchen.", voice="joe").audio.to_wav()
        client.unload("joe")
        sampler = Sampler(client.status()["manager"]["pid"])
        endpoint = client.endpoint
        for op, op_args, payloads in (("chat", CHAT, ()), ("transcribe", {"model": "whisper"}, (clip,))):
            if op not in args.ops.split(","):
                continue
            for clients in levels:
                total = max(clients, args.requests)
                row = asyncio.run(
                    level(endpoint, sampler, op, op_args, payloads, clients, total, args.timeout, args.budget)
                )
                rows.append(row)
                print(
                    f"  {op:<10} {clients:>4} clients  {row['requests']:>5} req  ok {row['ok']:>5}  "
                    f"avg {row['avg_ms'] or 0:>8.1f} ms  p95 {row['p95_ms'] or 0:>8.1f} ms  "
                    f"errors {row['error_rate']:.3f}  shed {row['shed_rate']:.3f}  rss {row['max_rss_mb']} MB",
                    flush=True,
                )
        soaked = asyncio.run(soak(endpoint, sampler, args.soak, args.timeout)) if args.soak > 0 else None
    if soaked:
        print(
            f"  soak: {soaked['ok']} of {soaked['requests']} chats served in {soaked['seconds']:.0f} s by "
            f"{SOAK_CLIENTS} clients, errors {soaked['error_rate']:.3f}, "
            f"manager RSS {soaked['rss_start_mb']} -> {soaked['rss_end_mb']} MB"
        )
    upto_256 = [r["error_rate"] for r in rows if r["clients"] <= 256]
    figures = {
        "levels": rows,
        "soak": soaked,
        "max_error_rate_upto_256": max(upto_256) if upto_256 else None,
        "parallel": args.parallel,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
