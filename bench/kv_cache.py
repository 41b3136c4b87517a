"""Conversations that stay fast: eight conversations interleaved round-robin on one model, ten turns each, run
twice against the same daemon: with KV reuse (``conversation_id``) and with reuse disabled (``cache: false``).

Time to first token is measured at the client, from sending the request to the first streamed piece, so it
includes restoring the conversation's state. The model runs as shipped (``parallel`` from the defaults); with
``--parallel 1`` (exact mode) and temperature 0 both runs produce the same replies, so both see the same histories
(``replies_identical``); batched, a reply may part where two tokens were nearly tied.

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/kv_cache.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.daemon import SMOLLM2, llm_entry, running_daemon  # noqa: E402
from model_client import ModelClient  # noqa: E402
from model_client.protocol import MIB  # noqa: E402
from model_manager.config import Defaults  # noqa: E402

SYSTEM = "You are a friendly assistant in a kitchen. Answer in two or three sentences."
TOPICS = ["apricots", "bread", "coffee", "dumplings", "eggs", "fennel", "garlic", "honey"]
REPORTED_TURNS = (1, 5, 10)


def user_turn(conversation: int, turn: int) -> str:
    """About 60 tokens of a user's message, different for every conversation and turn."""
    topic = TOPICS[conversation % len(TOPICS)]
    return (
        f"This is message {turn + 1} about {topic}. I am planning a dinner for six friends next Saturday and "
        f"I would like to use {topic} in at least one of the dishes. One guest does not eat meat and another "
        f"one cannot have nuts. What would you suggest for step {turn + 1} of the preparation, and why?"
    )


def run(
    client: ModelClient,
    conversations: int,
    turns: int,
    reuse: bool,
    tag: str,
    think_s: float = 0.0,
    max_tokens: int = 48,
):
    """Returns per turn: TTFT of every conversation (ms), prompt tokens, tokens evaluated (not cached), and the
    replies' texts."""
    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(conversations)]
    ttft: list[list[float]] = [[] for _ in range(turns)]
    prompt_tokens: list[list[int]] = [[] for _ in range(turns)]
    evaluated: list[list[int]] = [[] for _ in range(turns)]
    replies: list[str] = []
    for turn in range(turns):
        for conv in range(conversations):
            histories[conv].append({"role": "user", "content": user_turn(conv, turn)})
            time.sleep(think_s)  # the user speaking: the manager is idle meanwhile
            started = time.perf_counter()
            stream = client.chat(
                "smollm2",
                histories[conv],
                conversation_id=f"{tag}-{conv}" if reuse else None,
                cache=reuse,
                stream=True,
                max_tokens=max_tokens,
                temperature=0.0,
            )
            first = None
            for _ in stream:
                first = first or time.perf_counter()
            assert stream.result is not None
            ttft[turn].append(((first or time.perf_counter()) - started) * 1000)
            usage = stream.result.usage
            prompt_tokens[turn].append(usage.prompt_tokens)
            evaluated[turn].append(usage.prompt_tokens - usage.cached_tokens)
            histories[conv].append({"role": "assistant", "content": stream.result.text})
            replies.append(stream.result.text)
    return ttft, prompt_tokens, evaluated, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--parallel",
        type=int,
        default=Defaults().parallel,
        help="the model's sequences (default: the shipped default; 1: exact mode, replies identical with reuse)",
    )
    parser.add_argument("--max-tokens", type=int, default=48, help="each reply's length")
    parser.add_argument(
        "--think-ms", type=float, default=0.0, help="pause before each request, as a user speaking (default: none)"
    )
    args = parser.parse_args()

    config = {
        "kv_cache": {"budget_mib": 1024, "spill_dir": None},
        "models": {"smollm2": llm_entry(SMOLLM2, "Q4_1", args.threads, parallel=args.parallel)},
    }
    with running_daemon(config) as client:
        client.load("smollm2")
        think = args.think_ms / 1000
        reuse = run(client, args.conversations, args.turns, True, "reuse", think, args.max_tokens)
        reuse_ttft, history, evaluated, reuse_replies = reuse
        kv = next(m for m in client.status()["models"] if m["name"] == "smollm2")["kv_cache"]
        plain_ttft, _, _, plain_replies = run(
            client, args.conversations, args.turns, False, "plain", think, args.max_tokens
        )

    median = [statistics.median(t) for t in reuse_ttft]
    plain = [statistics.median(t) for t in plain_ttft]
    tokens = [round(statistics.mean(t)) for t in history]
    new = [round(statistics.mean(t)) for t in evaluated]
    last = args.turns - 1
    print(
        f"{'turn':>5}{'history tokens':>16}{'evaluated':>11}{'TTFT reuse ms':>15}{'TTFT no reuse ms':>18}"
        f"{'speed-up':>10}"
    )
    for turn in (t - 1 for t in REPORTED_TURNS if t <= args.turns):
        speedup = plain[turn] / median[turn]
        print(
            f"{turn + 1:>5}{tokens[turn]:>16}{new[turn]:>11}{median[turn]:>15.1f}{plain[turn]:>18.1f}{speedup:>10.2f}"
        )
    print(f"saved states: {kv['conversations']} conversations, {kv['bytes'] / MIB:.1f} MiB in RAM")
    figures = {
        "ttft_turn10_reuse_ms": round(median[last], 1),
        "ttft_turn10_noreuse_ms": round(plain[last], 1),
        "turn10_speedup": round(plain[last] / median[last], 2),
        "history_tokens_turn10": tokens[last],
        "state_bytes_per_conversation": round(kv["bytes"] / max(1, kv["conversations"])),
        "ttft_growth": round(median[last] / median[0], 3),
        "evaluated_tokens_turn1": new[0],
        "evaluated_tokens_turn10": new[last],
        "ttft_turn1_reuse_ms": round(median[0], 1),
        "ttft_turn5_reuse_ms": round(median[min(4, last)], 1),
        "replies_identical": reuse_replies == plain_replies,
        "think_ms": args.think_ms,
        "conversations": args.conversations,
        "turns": args.turns,
        "parallel": args.parallel,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
