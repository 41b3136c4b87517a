"""What the daemon's transport costs, side by side in one run.

1. ``ping`` round trip through ``ModelClient`` to the real daemon vs a bare pyzmq REQ/REP echo, both over ipc://
   to another process.
2. Streamed decode tokens/s of one long reply through the daemon vs the same model called in-process with
   llama-cpp-python (same prompt, temperature 0, same threads), rounds interleaved so drift hits both.

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/transport.py``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.daemon import SMOLLM2 as MODEL_PATH  # noqa: E402
from bench.daemon import llm_entry, running_daemon  # noqa: E402
from model_client import ModelClient  # noqa: E402

PROMPT = "Here is a long story about a lighthouse keeper and the sea.\n\nOnce upon a time,"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def echo_server(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.bind(endpoint)
    while True:
        message = sock.recv()
        if message == b"stop":
            sock.send(b"bye")
            return
        sock.send(message)


def raw_pinger(endpoint: str) -> tuple[multiprocessing.Process, zmq.Socket]:
    server = multiprocessing.Process(target=echo_server, args=(endpoint,), daemon=True)
    server.start()
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(endpoint)
    return server, sock


def time_calls(call, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def bench_pings(client: ModelClient, endpoint: str, n: int, blocks: int = 10) -> tuple[list[float], list[float]]:
    """Daemon and bare pyzmq pings in alternating blocks, so the machine's drift hits both alike."""
    server, sock = raw_pinger(endpoint)
    payload = b"x" * 48  # about the size of a ping envelope

    def raw_ping() -> None:
        sock.send(payload)
        sock.recv()

    time_calls(raw_ping, 300)
    time_calls(client.ping, 300)
    raw, ping = [], []
    for _ in range(blocks):
        raw += time_calls(raw_ping, n // blocks)
        ping += time_calls(client.ping, n // blocks)
    sock.send(b"stop")
    sock.recv()
    sock.close()
    server.join(5)
    return ping, raw


def decode_rate(chunk_times: list[float], tokens: int) -> float:
    """Tokens per second after the first token: the decode speed, free of prompt evaluation."""
    return (tokens - 1) / (chunk_times[-1] - chunk_times[0])


def stream_daemon(client: ModelClient, max_tokens: int) -> tuple[float, str, int]:
    times = []
    stream = client.complete("smollm2", PROMPT, stream=True, max_tokens=max_tokens, temperature=0.0, seed=1)
    for _ in stream:
        times.append(time.perf_counter())
    tokens = stream.result.usage.completion_tokens
    return decode_rate(times, tokens), stream.result.text, tokens


def stream_direct(llm, max_tokens: int) -> tuple[float, str, int]:
    llm.reset()  # no context reuse, as the daemon's first request of each round has none either... see below
    times, pieces = [], []
    for chunk in llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0, seed=1, stream=True):
        times.append(time.perf_counter())
        pieces.append(chunk["choices"][0]["text"])
    text = "".join(pieces)
    tokens = len(llm.tokenize(PROMPT.encode() + text.encode(), add_bos=True)) - len(llm.tokenize(PROMPT.encode()))
    return decode_rate(times, tokens), text, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pings", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    config = {"models": {"smollm2": llm_entry(MODEL_PATH, "Q4_1", args.threads)}}
    with running_daemon(config) as client:
        echo_dir = Path(tempfile.mkdtemp(prefix="mm-echo-"))
        ping, raw = bench_pings(client, f"ipc://{echo_dir}/echo.sock", args.pings)
        shutil.rmtree(echo_dir, ignore_errors=True)

        from llama_cpp import Llama  # the in-process baseline, on purpose

        llm = Llama(model_path=str(MODEL_PATH), n_ctx=2048, n_threads=args.threads, verbose=False)
        client.load("smollm2")
        stream_daemon(client, 16)  # warm both paths
        stream_direct(llm, 16)
        daemon_rates, direct_rates, same_text = [], [], True
        for _ in range(args.rounds):
            client.unload("smollm2")  # a fresh context each round, like the direct path's reset
            client.load("smollm2")
            rate, daemon_text, daemon_tokens = stream_daemon(client, args.tokens)
            daemon_rates.append(rate)
            rate, direct_text, _ = stream_direct(llm, args.tokens)
            direct_rates.append(rate)
            same_text &= daemon_text == direct_text

    figures = {
        "ping_p50_us": round(statistics.median(ping), 1),
        "ping_p99_us": round(percentile(ping, 0.99), 1),
        "raw_zmq_p50_us": round(statistics.median(raw), 1),
        "raw_zmq_p99_us": round(percentile(raw, 0.99), 1),
        "ping_ratio": round(statistics.median(ping) / statistics.median(raw), 2),
        "stream_tok_s": round(statistics.median(daemon_rates), 1),
        "direct_tok_s": round(statistics.median(direct_rates), 1),
        "stream_ratio": round(statistics.median(daemon_rates) / statistics.median(direct_rates), 3),
        "stream_tokens": daemon_tokens,
        "same_text": same_text,
        "threads": args.threads,
    }
    print(f"{'measure':<38}{'daemon':>12}{'baseline':>12}{'ratio':>8}")
    print(
        f"{'ping round trip p50 (us)':<38}{figures['ping_p50_us']:>12}{figures['raw_zmq_p50_us']:>12}"
        f"{figures['ping_ratio']:>8}"
    )
    print(
        f"{'ping round trip p99 (us)':<38}{figures['ping_p99_us']:>12}{figures['raw_zmq_p99_us']:>12}"
        f"{round(figures['ping_p99_us'] / figures['raw_zmq_p99_us'], 2):>8}"
    )
    print(
        f"{'streamed decode (tokens/s)':<38}{figures['stream_tok_s']:>12}{figures['direct_tok_s']:>12}"
        f"{figures['stream_ratio']:>8}"
    )
    print(f"  per round daemon {[round(r, 1) for r in daemon_rates]} direct {[round(r, 1) for r in direct_rates]}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
