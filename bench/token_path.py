"""Where a generated token's CPU time goes outside ``llama_decode``: the stage table of the per-token path.

The batched engine runs in this process on a model whose decode step is as short as a real model's on a GPU (the
24 MiB synthetic GGUF of ``scripts/gpu/synthetic_gguf.py``, or ``--gguf``), ``--streams`` streamed completions
at once, exactly as a worker steps them, with every stage of the token path timed exclusively (a stage's time
excludes the stages it calls):

    decode       llama_decode itself (the engine's own work: what a faster path cannot remove)
    sample       the sampler chain (sample + accept)
    detokenize   the token's bytes and complete UTF-8 out of them
    stop check   stop strings over the text so far
    step         the rest of a step in Python: building the batch, bookkeeping, ending requests
    message      the worker's message per token: the Chunk struct encoded and sent over an ipc socket
    relay        the manager's work per message: decode the worker's frame, encode the client's (no socket)
    client       the client's decode of that reply

Each row is microseconds per generated token, over all streams; ``outside_decode_us`` adds every row but decode.
Prints the table, then one JSON line. Run on a quiet machine: ``.venv/bin/python bench/token_path.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "gpu"))

import llama_cpp  # noqa: E402
import zmq  # noqa: E402
from llama_cpp._internals import LlamaSampler  # noqa: E402

from model_client import protocol  # noqa: E402
from model_manager import worker_protocol as wire  # noqa: E402
from model_manager.backends import (  # noqa: E402
    PAYLOAD,  # noqa: E402
    batch_engine,
    gguf_batched,
)
from model_manager.config import ModelSpec  # noqa: E402

STAGES = ("decode", "sample", "detokenize", "stop check", "step", "message", "relay", "client")
SINK = "import sys, zmq; s = zmq.Context().socket(zmq.PULL); s.bind(sys.argv[1]); print('ready', flush=True)\n"
SINK += "while s.recv() != b'end': pass"


class StageClock:
    """Exclusive wall time per stage: a stage entered inside another pauses the outer one's clock."""

    def __init__(self) -> None:
        self.spent: dict[str, int] = defaultdict(int)
        self._stack: list[tuple[str, int]] = []  # (stage, ns its callees took)

    def wrap(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter_ns()
            self._stack.append((stage, 0))
            try:
                return function(*args, **kwargs)
            finally:
                took = time.perf_counter_ns() - started
                _stage, inner = self._stack.pop()
                self.spent[stage] += took - inner
                if self._stack:
                    outer, outer_inner = self._stack[-1]
                    self._stack[-1] = (outer, outer_inner + took)

        return timed


def instrument(clock: StageClock) -> None:
    """Wrap the engine's stages where the engine looks them up (module attributes and class methods)."""
    llama_cpp.llama_decode = clock.wrap("decode", llama_cpp.llama_decode)
    LlamaSampler.sample = clock.wrap("sample", LlamaSampler.sample)
    backend = gguf_batched.BatchedGGUFBackend
    backend._piece = clock.wrap("detokenize", backend._piece)  # noqa: SLF001
    gguf_batched._decode_complete_utf8 = clock.wrap("detokenize", gguf_batched._decode_complete_utf8)  # noqa: SLF001
    gguf_batched._StopText.feed = clock.wrap("stop check", gguf_batched._StopText.feed)  # noqa: SLF001
    batch_engine.BatchEngine.step = clock.wrap("step", batch_engine.BatchEngine.step)
    backend.step = clock.wrap("step", backend.step)


def synthetic_model(folder: Path) -> Path:
    from synthetic_gguf import write_synthetic_gguf

    path = folder / "synthetic-24mib.gguf"
    write_synthetic_gguf(path, 24, "Q8_0")
    return path


def run(path: Path, streams: int, tokens: int, threads: int) -> dict[str, float]:
    clock = StageClock()
    instrument(clock)
    backend = gguf_batched.BatchedGGUFBackend()
    spec = ModelSpec(kind="llm", path=str(path), n_ctx=512, parallel=streams, n_threads=threads)
    backend.load(spec, "bench")
    backend.warm_up()
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='mm-token-path-')}/sink"
    sink = subprocess.Popen([sys.executable, "-c", SINK, endpoint], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(endpoint)
    frames: list[bytes] = []

    def emitter(rid: str) -> Callable[[dict[str, Any]], None]:
        def emit(chunk: dict[str, Any]) -> None:  # what Worker._submit's emit does
            frame = wire.encode(wire.Chunk(rid=rid, chunk=chunk, payload=chunk.pop(PAYLOAD, None)))
            sock.send(frame)
            frames.append(frame)

        return clock.wrap("message", emit)

    args = protocol.args_to_dict(
        protocol.parse_args(
            "complete", {"model": "bench", "prompt": "1, 2, 3,", "max_tokens": tokens, "stream": True, "seed": 1}
        )
    )
    for i in range(streams):
        backend.submit(f"r{i}", "complete", dict(args), emitter(f"r{i}"))
    started = time.perf_counter()
    generated_before = backend.engine.generated if backend.engine else 0
    while backend.busy:
        backend.step()
    elapsed = time.perf_counter() - started
    generated = (backend.engine.generated if backend.engine else 0) - generated_before
    sock.send(b"end")
    sink.wait(timeout=30)
    sock.close(linger=0)
    relay, client = clock.wrap("relay", relay_one), clock.wrap("client", protocol.decode_reply)
    for frame in frames:
        client(relay(frame))
    per_token = {stage: clock.spent[stage] / 1000 / max(1, generated) for stage in STAGES}
    per_token["tokens"] = generated
    per_token["tokens_per_s"] = generated / elapsed
    return per_token


def relay_one(frame: bytes) -> list[bytes]:
    """The manager's CPU work for one worker chunk: decode it, encode the client's reply frames."""
    message = wire.decode_from_worker(frame)
    assert isinstance(message, wire.Chunk)
    return protocol.encode_chunk(message.rid, message.chunk, ())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="a GGUF (default: the 24 MiB synthetic model, written here)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="generated per stream")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mm-token-path-") as folder:
        path = args.gguf or synthetic_model(Path(folder))
        figures = run(path, args.streams, args.tokens, args.threads)
    outside = sum(figures[s] for s in STAGES if s != "decode")
    print(f"{'stage':<12}{'us/token':>10}{'share':>8}")
    total = outside + figures["decode"]
    for stage in STAGES:
        print(f"{stage:<12}{figures[stage]:>10.1f}{figures[stage] / total:>8.1%}")
    print(
        f"{'outside':<12}{outside:>10.1f}{outside / total:>8.1%}   ({figures['tokens']} tokens, {args.streams} streams)"
    )
    result: dict[str, Any] = {f"{s.replace(' ', '_')}_us": round(figures[s], 2) for s in STAGES}
    result.update(
        outside_decode_us=round(outside, 2),
        streams=args.streams,
        tokens=figures["tokens"],
        engine_tokens_per_s=round(figures["tokens_per_s"], 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
