"""What a model swap costs: time to first token when the model is (a) loaded, (b) unloaded with memory free,
(c) unloaded with another model to evict first; next to the model's pure load and unload time in-process.

The daemon runs on a simulated 500 MiB GPU that holds SmolLM2 or Gemma 3 270M, not both, so (c) evicts Gemma to
load SmolLM2. Rounds are interleaved so drift hits every case alike; medians are reported.

    swap_overhead_ratio = (c) / (pure unload of Gemma + pure load of SmolLM2 + (a))

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/swap.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.daemon import GEMMA, SMOLLM2, llm_entry, running_daemon  # noqa: E402
from model_client import ModelClient  # noqa: E402

SETTLE_S = 1.0  # pause between cases, as between turns of a conversation: the spare worker is ready again


def daemon_config(threads: int) -> dict:
    """A simulated 500 MiB GPU that holds SmolLM2 or Gemma 3 270M, never both."""
    gpu = {"n_gpu_layers": -1, "parallel": 1}  # one sequence each: the sizes above
    return {
        "devices": {
            "mode": "simulated",
            "simulated": [{"name": "sim-gpu", "total_mib": 500}],
            "gpu_headroom_mib": 0,
            "allow_cpu_fallback": False,
        },
        "scheduler": {"hold_after_use_s": 0},
        "models": {
            "smollm2": llm_entry(SMOLLM2, "Q4_1", threads, **gpu),
            "gemma3-270m": llm_entry(GEMMA, "Q4_K_M", threads, chat_format="gemma", **gpu),
        },
    }


def ttft_ms(client: ModelClient, turn: int) -> float:
    """Client-side time from sending a prompt to its first streamed piece.

    Each prompt differs from the previous one from its first word, so no case gains from the context reuse
    of a loaded model: every case evaluates the whole prompt.
    """
    prompt = f"{turn * 7919} is the number of apples. The colours of apples are red, green and"
    started = time.perf_counter()
    stream = client.complete("smollm2", prompt, stream=True, max_tokens=4, temperature=0.0)
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    return ((first or time.perf_counter()) - started) * 1000


def in_process_ms(threads: int) -> tuple[float, float]:
    """Pure load of SmolLM2 and pure unload of Gemma, with llama-cpp-python in this process (the baseline)."""
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=str(SMOLLM2), n_ctx=2048, n_threads=threads, verbose=False)
    load = (time.perf_counter() - started) * 1000
    llm.close()
    gemma = Llama(model_path=str(GEMMA), n_ctx=2048, n_threads=threads, verbose=False)
    started = time.perf_counter()
    gemma.close()
    del gemma
    gc.collect()
    unload = (time.perf_counter() - started) * 1000
    return load, unload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    loaded, cold, evict, pure_load, pure_unload = [], [], [], [], []
    with running_daemon(daemon_config(args.threads)) as client:
        for name in ("gemma3-270m", "smollm2"):  # measure both once, so every later reservation is exact
            client.load(name)
            client.unload(name)
        turn = 0
        for _ in range(args.rounds):
            turn += 1
            client.load("smollm2")
            ttft_ms(client, turn)  # the worker's first request pays one-off costs; not what (a) is about
            turn += 1
            loaded.append(ttft_ms(client, turn))
            client.unload("smollm2")
            time.sleep(SETTLE_S)
            turn += 1
            cold.append(ttft_ms(client, turn))
            client.unload("smollm2")
            client.load("gemma3-270m")
            time.sleep(SETTLE_S)
            turn += 1
            evict.append(ttft_ms(client, turn))
            client.unload("smollm2")
            load_ms, unload_ms = in_process_ms(args.threads)
            pure_load.append(load_ms)
            pure_unload.append(unload_ms)

    med = {
        k: statistics.median(v)
        for k, v in {"a": loaded, "b": cold, "c": evict, "load": pure_load, "unload": pure_unload}.items()
    }
    figures = {
        "ttft_loaded_ms": round(med["a"], 1),
        "ttft_unloaded_free_ms": round(med["b"], 1),
        "ttft_unloaded_evict_ms": round(med["c"], 1),
        "pure_load_ms": round(med["load"], 1),
        "pure_unload_ms": round(med["unload"], 1),
        "cold_overhead_ratio": round(med["b"] / (med["load"] + med["a"]), 3),
        "swap_overhead_ratio": round(med["c"] / (med["unload"] + med["load"] + med["a"]), 3),
        "rounds": args.rounds,
    }
    print(f"{'case':<48}{'median ms':>10}")
    print(f"{'(a) TTFT, model loaded':<48}{figures['ttft_loaded_ms']:>10}")
    print(f"{'(b) TTFT, model unloaded, memory free':<48}{figures['ttft_unloaded_free_ms']:>10}")
    print(f"{'(c) TTFT, model unloaded, Gemma evicted first':<48}{figures['ttft_unloaded_evict_ms']:>10}")
    print(f"{'pure load of SmolLM2 in-process':<48}{figures['pure_load_ms']:>10}")
    print(f"{'pure unload of Gemma in-process':<48}{figures['pure_unload_ms']:>10}")
    print(
        f"(c) / (unload + load + (a)) = {figures['swap_overhead_ratio']}   (b) / (load + (a)) = "
        f"{figures['cold_overhead_ratio']}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
