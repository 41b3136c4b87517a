"""The HTTP gateway's cost: the same streamed chat through ``model_client`` and through the gateway with the
official ``openai`` package, alternated round by round on one daemon.

Each round streams ``--tokens`` tokens of a counting prompt at temperature 0 (so every stream runs its full length)
both ways. Time to first token is measured at the client; tokens per second over the stream after the first token.

    gateway_stream_ratio = gateway tokens/s / model_client tokens/s      (medians)
    added_ttft_ms        = gateway TTFT - model_client TTFT                (medians)

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/gateway.py`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import openai  # noqa: E402
import yaml  # noqa: E402

from bench.daemon import REPO, SMOLLM2, llm_entry  # noqa: E402
from daemonkit.process import DaemonProcess  # noqa: E402
from model_client import ModelClient  # noqa: E402

MESSAGES = [{"role": "user", "content": "Count from 1 to 200, separated by commas: 1, 2, 3,"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def through_client(client: ModelClient, tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    stream = client.chat("smollm2", MESSAGES, stream=True, max_tokens=tokens, temperature=0.0, cache=False)
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    ended = time.perf_counter()
    assert stream.result is not None and first is not None
    return (first - started) * 1000, (stream.result.usage["completion_tokens"] - 1) / (ended - first)


def through_gateway(llm: openai.OpenAI, tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    stream = llm.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first, completion = None, 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
        if chunk.usage is not None:
            completion = chunk.usage.completion_tokens
    ended = time.perf_counter()
    assert first is not None
    return (first - started) * 1000, (completion - 1) / (ended - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    port = free_port()
    endpoints = {k: f"ipc://{run_dir}/{k}.sock" for k in ("requests", "events", "workers")}
    config = {
        "endpoints": endpoints,
        "manager": {"log_level": "warning", "state_dir": str(run_dir / "state"), "spare_workers": 0},
        "metrics": {"port": 0},
        "gateway": {"port": port},
        "models": {"smollm2": llm_entry(SMOLLM2, "Q4_1", None)},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    manager = DaemonProcess("model_manager", run_dir / "config.yaml", endpoints["requests"])
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(run_dir / "config.yaml")], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        manager.start(timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/api/version", timeout=1).raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise SystemExit("the gateway did not start") from None
                time.sleep(0.1)
        llm = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        with ModelClient(endpoints["requests"], timeout=300) as client:
            client.load("smollm2")
            through_client(client, 8)  # the first request pays for buffers
            through_gateway(llm, 8)
            direct, http = [], []
            for _ in range(args.rounds):  # alternated, so that drift hits both alike
                direct.append(through_client(client, args.tokens))
                http.append(through_gateway(llm, args.tokens))
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)
        manager.stop(timeout=30)
        shutil.rmtree(run_dir, ignore_errors=True)

    ttft = [statistics.median(t for t, _ in side) for side in (direct, http)]
    rate = [statistics.median(r for _, r in side) for side in (direct, http)]
    print(f"{'path':<14}{'TTFT ms':>10}{'tokens/s':>11}")
    for name, t, r in zip(("model_client", "gateway"), ttft, rate, strict=True):
        print(f"{name:<14}{t:>10.1f}{r:>11.1f}")
    figures = {
        "rounds": args.rounds,
        "tokens": args.tokens,
        "client_ttft_ms": round(ttft[0], 2),
        "gateway_ttft_ms": round(ttft[1], 2),
        "added_ttft_ms": round(ttft[1] - ttft[0], 2),
        "client_tok_s": round(rate[0], 1),
        "gateway_tok_s": round(rate[1], 1),
        "gateway_stream_ratio": round(rate[1] / rate[0], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
