"""Where a generated token's CPU time goes outside ``llama_decode``: the stage table of the per-token path.

The engine runs in this process on a model whose decode step is as short as a real model's on a GPU (the
24 MiB synthetic GGUF of ``scripts/gpu/synthetic_gguf.py``, or ``--gguf``), ``--streams`` streamed completions
at once, exactly as a worker steps them, with every stage of the token path timed exclusively (a stage's time
excludes the stages it calls):

    decode       llama_decode itself (the engine's own work: what a faster path cannot remove)
    sample       the sampler chain (sample + accept)
    detokenize   the token's bytes and complete UTF-8 out of them
    stop check   stop strings over the new text
    step         the rest of a step in Python: planning and filling the batch, bookkeeping, ending requests,
                 collecting the streams' text that is due
    message      the worker's messages: each step's ``Chunks`` (every stream's due text) encoded and sent over an
                 ipc socket, and each result
    relay        the manager's work per message: decode the worker's frame, encode each client's (no socket)
    client       the clients' decode of their replies

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

from model_client import protocol  # noqa: E402
from model_client.results import Completion, TextChunk, chunk_from, completion_from  # noqa: E402
from model_manager import worker_protocol as wire  # noqa: E402
from model_manager.backends.llm import backend as llm_backend  # noqa: E402
from model_manager.backends.llm import engine, executor, text  # noqa: E402
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
    executor.LlamaExecutor.sample = clock.wrap("sample", executor.LlamaExecutor.sample)
    text.Detokenizer.piece = clock.wrap("detokenize", text.Detokenizer.piece)
    llm_backend.decode_complete_utf8 = clock.wrap("detokenize", llm_backend.decode_complete_utf8)
    text.StopText.feed = clock.wrap("stop check", text.StopText.feed)
    engine.BatchEngine.step = clock.wrap("step", engine.BatchEngine.step)
    backend = llm_backend.GGUFBackend
    backend.step = clock.wrap("step", backend.step)
    backend.take_chunks = clock.wrap("step", backend.take_chunks)


def synthetic_model(folder: Path) -> Path:
    from synthetic_gguf import write_synthetic_gguf

    path = folder / "synthetic-24mib.gguf"
    write_synthetic_gguf(path, 24, "Q8_0")
    return path


def run(path: Path, streams: int, tokens: int, threads: int) -> dict[str, float]:
    clock = StageClock()
    instrument(clock)
    backend = llm_backend.GGUFBackend()
    spec = ModelSpec(kind="llm", path=str(path), n_ctx=512, parallel=streams, n_threads=threads)
    backend.load(spec, "bench")
    backend.warm_up()
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='mm-token-path-')}/sink"
    sink = subprocess.Popen([sys.executable, "-c", SINK, endpoint], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(endpoint)
    frames: list[bytes] = []

    def send(message: wire.FromWorker) -> None:  # what Worker.send does
        frame = wire.encode(message)
        sock.send(frame)
        frames.append(frame)

    def after_step(outcomes: list[tuple[str, Any]]) -> None:  # what Worker._step does with a step's outcomes
        chunks = backend.take_chunks(time.monotonic())
        if chunks:
            send(wire.Chunks(items=[wire.stream_item(rid, chunk) for rid, chunk in chunks]))
        for rid, result in outcomes:
            send(wire.Generated(rid=rid, result=result))

    after = clock.wrap("message", after_step)
    asked = {"model": "bench", "prompt": "1, 2, 3,", "max_tokens": tokens, "stream": True, "seed": 1}
    args = wire.run_args("complete", protocol.parse_args("complete", asked))
    for i in range(streams):
        backend.submit(f"r{i}", args)
    started = time.perf_counter()
    generated_before = backend.engine.generated if backend.engine else 0
    while backend.busy:
        after(backend.step())
    elapsed = time.perf_counter() - started
    generated = (backend.engine.generated if backend.engine else 0) - generated_before
    sock.send(b"end")
    sink.wait(timeout=30)
    sock.close(linger=0)
    relay, client = clock.wrap("relay", relay_one), clock.wrap("client", client_decode)
    for frame in frames:
        for reply in relay(frame):
            client(reply)
    per_token = {stage: clock.spent[stage] / 1000 / max(1, generated) for stage in STAGES}
    per_token["tokens"] = generated
    per_token["tokens_per_s"] = generated / elapsed
    per_token["messages"] = len(frames)
    return per_token


def relay_one(frame: bytes) -> list[list[bytes]]:
    """The manager's CPU work for one worker message: decode it, encode each client's reply."""
    message = wire.decode_from_worker(frame)
    if isinstance(message, wire.Chunks):
        return [protocol.encode_chunk(item.rid, item.chunk) for item in message.items]
    assert isinstance(message, wire.Generated)
    return [protocol.encode_result(message.rid, message.result)]


def client_decode(frames: list[bytes]) -> TextChunk | Completion:
    """What ``ModelClient`` does with each reply of a stream: the envelope, then its typed body."""
    reply = protocol.decode_reply(frames)
    return completion_from(reply.body) if reply.is_final else chunk_from(reply.body)


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
        f"{'outside':<12}{outside:>10.1f}{outside / total:>8.1%}   ({figures['tokens']} tokens, {args.streams} streams,"
        " "
        f"{figures['messages']} worker messages)"
    )
    result: dict[str, Any] = {f"{s.replace(' ', '_')}_us": round(figures[s], 2) for s in STAGES}
    result.update(
        outside_decode_us=round(outside, 2),
        streams=args.streams,
        tokens=figures["tokens"],
        worker_messages=figures["messages"],
        engine_tokens_per_s=round(figures["tokens_per_s"], 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
