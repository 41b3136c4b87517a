"""Continuous batching: N concurrent streams through the daemon against the engine's ceiling, and a short request's
time to first token while long ones run.

For each model and each N, N streams of ``--tokens`` tokens each go through the daemon (a model with ``parallel``
= the largest N), measured at the clients as aggregate tokens per second; beside them, raw ``llama_decode`` in this
process with N sequences in one context (one token of each a step, the same threads and context set-up, each
sampled by the engine's own sampler from the logits read the engine's way): what the engine could do with no
daemon around it. Both at every ``--temperatures`` value (0: greedy; 0.7: the default chain, seeded). Then, with
``--long`` streams generating, a short chat's time to first token, over the same request's time to first token
on the idle model.

    daemon_over_ceiling_N[_tT] = daemon tokens/s / raw tokens/s      (the lower of the models; _t0.7: at 0.7)
    ttft_under_load_ratio = TTFT with the long streams running / TTFT idle      (the higher of the models)

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/batching.py`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.daemon import GEMMA, SMOLLM2, llm_entry, running_daemon  # noqa: E402
from model_client import ModelClient  # noqa: E402

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy decoding keeps counting: every stream runs its full length
N_CTX = 512
MODELS = {"smollm2": (SMOLLM2, "Q4_1", None), "gemma3-270m": (GEMMA, "Q4_K_M", "gemma")}


def ceiling(
    path: Path, sequences: int, parallel: int, tokens: int, threads: int, gpu_layers: int = 0, temperature: float = 0.0
) -> float:
    """Aggregate tokens/s of raw llama_decode: ``sequences`` sequences, one token each a step, each sampled as the
    daemon's engine samples (its sampler for ``temperature``, read from the same logits the same way)."""
    import llama_cpp

    from model_manager.backends.llama_cpp_api import LlamaContext, LlamaModel, suppress_stdout_stderr
    from model_manager.backends.llm.backend import flash_attention
    from model_manager.backends.llm.executor import LlamaExecutor, make_sampler
    from model_manager.backends.llm.planner import Plan
    from model_manager.backends.llm.state import Sampling

    with suppress_stdout_stderr(disable=False):
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
        prompt = model.tokenize(COUNTING.encode(), add_bos=True, special=False)
        # Every prompt goes in one decode: the batch holds them all, however many sequences (a batch of 512 ran
        # out at 16 streams of a long-tokenized prompt); llama.cpp splits it into micro-batches of 512.
        size = max(512, sequences * len(prompt))
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx, ctx_params.n_seq_max, ctx_params.kv_unified = N_CTX * parallel, parallel, False
        ctx_params.n_batch, ctx_params.n_ubatch = size, 512
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        ctx_params.flash_attn_type = flash_attention(exact=parallel == 1)  # as the daemon's engine
        ctx = LlamaContext(model=model, params=ctx_params, verbose=False)
    executor = LlamaExecutor(model, ctx, size, parallel)  # the engine's batch filling and logits reading
    samplers = [make_sampler(model, Sampling(temperature=temperature, seed=s)) for s in range(sequences)]

    every = list(range(sequences))
    prompts = Plan(
        tokens=prompt * sequences,
        positions=list(range(len(prompt))) * sequences,
        seq_ids=[s for s in every for _ in prompt],
        logits=[p == len(prompt) - 1 for _ in every for p in range(len(prompt))],
    )
    assert executor.decode(prompts) == 0
    last = [executor.sample(samplers[s], (s + 1) * len(prompt) - 1) for s in every]
    started = time.perf_counter()
    for step in range(tokens - 1):
        plan = Plan(tokens=last, positions=[len(prompt) + step] * sequences, seq_ids=every, logits=[True] * sequences)
        assert executor.decode(plan) == 0
        last = [executor.sample(samplers[s], s) for s in every]
    elapsed = time.perf_counter() - started
    for sampler in samplers:
        sampler.close()
    ctx.close()
    model.close()
    return sequences * (tokens - 1) / elapsed


def through_daemon(endpoint: str, model: str, sequences: int, tokens: int, temperature: float = 0.0) -> float:
    """Aggregate tokens/s of ``sequences`` concurrent streams while all of them are decoding: the tokens of the
    chunks received between the last stream's first chunk and the first stream's last, over that window. The
    ceiling is measured the same way: every sequence decoding, prompts already evaluated."""
    go = threading.Barrier(sequences)
    times: list[list[tuple[float, int]]] = []

    def one(seed: int) -> None:
        with ModelClient(endpoint, timeout=300) as client:
            go.wait()
            stream = client.complete(
                model, COUNTING, stream=True, max_tokens=tokens, temperature=temperature, seed=seed
            )
            stamps, seen = [], 0
            for _ in stream:
                stamps.append((time.perf_counter(), stream.tokens - seen))
                seen = stream.tokens
            times.append(stamps)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(sequences)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    start, end = max(t[0][0] for t in times), min(t[-1][0] for t in times)
    # A chunk's tokens were made between the stream's previous chunk and this one (the worker sends a stream's
    # text at most every 20 ms): the share of that span inside the window counts.
    inside = 0.0
    for stamps in times:
        for (before, _), (stamp, n) in zip(stamps, stamps[1:], strict=False):
            overlap = min(stamp, end) - max(before, start)
            if overlap > 0:
                inside += n * overlap / (stamp - before)
    return inside / (end - start)


def ttft(client: ModelClient, model: str) -> float:
    started = time.perf_counter()
    stream = client.chat(model, [{"role": "user", "content": "Say yes."}], stream=True, max_tokens=4, cache=False)
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    return ((first or time.perf_counter()) - started) * 1000


def ttft_under_load(endpoint: str, model: str, long_streams: int, tokens: int, rounds: int) -> tuple[float, float]:
    """A short chat's time to first token, idle and with ``long_streams`` long generations running (ms)."""
    with ModelClient(endpoint, timeout=300) as client:
        idle = statistics.median(ttft(client, model) for _ in range(rounds))
        running = threading.Event()
        stop = threading.Event()

        def long_one() -> None:
            with ModelClient(endpoint, timeout=300) as c:
                while not stop.is_set():
                    for _ in c.complete(model, COUNTING, stream=True, max_tokens=tokens, temperature=0.0):
                        running.set()

        threads = [threading.Thread(target=long_one, daemon=True) for _ in range(long_streams)]
        for thread in threads:
            thread.start()
        running.wait(60)
        loaded = statistics.median(ttft(client, model) for _ in range(rounds))
        stop.set()
        for thread in threads:
            thread.join()
    return idle, loaded


def with_one_cxx_runtime() -> None:
    """This process imports the engine (the raw ceiling) beside pyzmq (the clients): like a worker, it must run with
    the shared C++ runtime preloaded, or a CUDA build that carries its own breaks ZeroMQ (model_manager/native.py).
    Started without it, it starts itself again with it."""
    from model_manager import native

    env = native.worker_environment(dict(os.environ))
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    with_one_cxx_runtime()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,2,4,8", help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--long", type=int, default=3, help="long generations running while TTFT is measured")
    parser.add_argument("--rounds", type=int, default=3, help="TTFT samples, idle and under load")
    parser.add_argument("--repeats", type=int, default=3, help="raw and daemon runs per level, alternated (medians)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--temperatures", default="0,0.7", help="sampling of both sides, one pass each")
    parser.add_argument("--gguf", help="another model, PATH[:QUANTIZATION] (named `custom`; e.g. the GPU kit's)")
    parser.add_argument("--gpu-layers", type=int, default=0, help="n_gpu_layers, raw and daemon (-1: all)")
    args = parser.parse_args()
    if args.gguf:
        path, _, label = args.gguf.partition(":")
        MODELS["custom"] = (Path(path), label or "Q8_0", None)
    levels = [int(x) for x in args.levels.split(",")]
    temperatures = [float(x) for x in args.temperatures.split(",")]
    parallel = max(max(levels), args.long + 1)
    names = args.models.split(",")
    config = {
        "models": {
            name: llm_entry(
                MODELS[name][0],
                MODELS[name][1],
                args.threads,
                parallel=parallel,
                n_ctx=N_CTX,
                n_gpu_layers=args.gpu_layers,
                **({"chat_format": MODELS[name][2]} if MODELS[name][2] else {}),
            )
            for name in names
        }
    }
    rows, figures = [], {"threads": args.threads, "tokens": args.tokens, "parallel": parallel}
    ratios: dict[tuple[str, float], dict[int, float]] = {}
    ttft_ratios = {}
    with running_daemon(config) as client:
        for name in names:
            client.load(name)
            through_daemon(client.endpoint, name, 1, 8)  # warm the worker's first request
            for temperature in temperatures:
                for n in levels:
                    raws, serveds = [], []
                    for _ in range(args.repeats):  # alternated, so that the machine's drift hits both sides alike
                        raws.append(
                            ceiling(
                                MODELS[name][0], n, parallel, args.tokens, args.threads, args.gpu_layers, temperature
                            )
                        )
                        serveds.append(through_daemon(client.endpoint, name, n, args.tokens, temperature))
                    raw, served = statistics.median(raws), statistics.median(serveds)
                    ratios.setdefault((name, temperature), {})[n] = served / raw
                    rows.append((name, temperature, n, raw, served))
            idle, loaded = ttft_under_load(client.endpoint, name, args.long, args.tokens, args.rounds)
            ttft_ratios[name] = loaded / idle
            figures[f"{name}_ttft_idle_ms"] = round(idle, 1)
            figures[f"{name}_ttft_under_load_ms"] = round(loaded, 1)
            client.unload(name)
    print(f"{'model':<14}{'temp':>6}{'streams':>8}{'raw tok/s':>12}{'daemon tok/s':>14}{'ratio':>8}")
    for name, temperature, n, raw, served in rows:
        print(f"{name:<14}{temperature:>6g}{n:>8}{raw:>12.1f}{served:>14.1f}{served / raw:>8.3f}")
        suffix = "" if temperature == 0 else f"_t{temperature:g}"
        figures[f"{name}_raw_{n}_tok_s{suffix}"] = round(raw, 1)
        figures[f"{name}_daemon_{n}_tok_s{suffix}"] = round(served, 1)
    for name in names:
        print(
            f"{name}: short chat TTFT idle {figures[f'{name}_ttft_idle_ms']} ms, with {args.long} long streams "
            f"{figures[f'{name}_ttft_under_load_ms']} ms"
        )
    top = max(levels)
    for temperature in temperatures:
        suffix = "" if temperature == 0 else f"_t{temperature:g}"
        figures[f"daemon_over_ceiling_{top}{suffix}"] = round(
            min(r[top] for (_, t), r in ratios.items() if t == temperature), 3
        )
    figures["ttft_under_load_ratio"] = round(max(ttft_ratios.values()), 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
