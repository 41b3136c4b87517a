"""The HTTP gateway's cost: the same streamed chat through ``model_client`` and through the gateway (OpenAI's
``/v1/chat/completions``, its SSE read with ``httpx``), alternated round by round on one daemon.

Each round streams ``--tokens`` tokens of a counting prompt at temperature 0 (so every stream runs its full length)
both ways, each request starting with its own number; tokens per second over the stream after its first token.
Time to first token is measured at the client on one fixed question asked again and again (its prompt is reused
from the cache, so only the last token is evaluated): what remains is the path's own cost, not the engine's
prompt evaluation, whose run-to-run noise on two cores (tens of milliseconds) would hide it.

    gateway_stream_ratio = gateway tokens/s / model_client tokens/s      (the median over rounds)
    added_ttft_ms        = gateway TTFT - model_client TTFT                (medians)

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/gateway.py`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.daemon import SMOLLM2, llm_entry, running_gateway  # noqa: E402
from model_client import ModelClient  # noqa: E402

COUNTING = "Request {}. Count from 1 to 200, separated by commas: 1, 2, 3,"
NUMBERS = iter(range(1_000_000))


def messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": COUNTING.format(next(NUMBERS))}]


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def through_client(client: ModelClient, tokens: int, fixed: bool = False) -> tuple[float, float]:
    started = time.perf_counter()
    asked = QUESTION if fixed else messages()
    stream = client.chat("smollm2", asked, stream=True, max_tokens=tokens, temperature=0.0)
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    ended = time.perf_counter()
    assert stream.result is not None and first is not None
    return (first - started) * 1000, (stream.result.usage.completion_tokens - 1) / max(1e-9, ended - first)


def through_gateway(http: httpx.Client, tokens: int, fixed: bool = False) -> tuple[float, float]:
    asked = QUESTION if fixed else messages()
    body = {"model": "smollm2", "messages": asked, "max_tokens": tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    first, completion = None, 0
    with http.stream("POST", "/v1/chat/completions", json=body) as answer:
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
    ended = time.perf_counter()
    assert first is not None
    return (first - started) * 1000, (completion - 1) / max(1e-9, ended - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="the model's threads (default: the manager's share)")
    args = parser.parse_args()

    config = {
        "manager": {"spare_workers": 0},
        "models": {"smollm2": llm_entry(SMOLLM2, "Q4_1", args.threads)},
    }
    with running_gateway(config) as stack, httpx.Client(base_url=stack.url, timeout=300) as web:
        client = stack.client
        client.load("smollm2")
        through_client(client, 8)  # the first request pays for buffers
        through_gateway(web, 8)
        direct, http, direct_ttft, http_ttft = [], [], [], []
        for _ in range(args.rounds):  # alternated, so that drift hits both alike
            direct.append(through_client(client, args.tokens))
            http.append(through_gateway(web, args.tokens))
            for _ in range(3):
                direct_ttft.append(through_client(client, 2, fixed=True)[0])
                http_ttft.append(through_gateway(web, 2, fixed=True)[0])

    ttft = [statistics.median(side) for side in (direct_ttft, http_ttft)]
    rate = [statistics.median(r for _, r in side) for side in (direct, http)]
    print(f"{'path':<14}{'TTFT ms':>10}{'tokens/s':>11}")
    for name, t, r in zip(("model_client", "gateway"), ttft, rate, strict=True):
        print(f"{name:<14}{t:>10.1f}{r:>11.1f}")
    figures = {
        "rounds": args.rounds,
        "threads": args.threads,
        "tokens": args.tokens,
        "client_ttft_ms": round(ttft[0], 2),
        "gateway_ttft_ms": round(ttft[1], 2),
        "added_ttft_ms": round(ttft[1] - ttft[0], 2),
        "client_tok_s": round(rate[0], 1),
        "gateway_tok_s": round(rate[1], 1),
        # each round's gateway rate over the model_client rate just before it, the median: the machine's drift
        # between rounds cancels out
        "gateway_stream_ratio": round(statistics.median(h[1] / d[1] for d, h in zip(direct, http, strict=True)), 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
