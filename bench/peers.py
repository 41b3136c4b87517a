"""Side by side with llama.cpp's own server: the same model, slots, threads, sampling and workload through
``llama-server`` (what Ollama runs underneath) and through the manager (its gateway's OpenAI API, and
``model_client``), in one run.

``llama-server`` is built once from the llama-cpp-python source distribution this project pins (its vendored
llama.cpp, with ``CMAKE_ARGS`` or the Makefile's CPU flags) and kept under ``build/peers/``; a build that fails
ends the run with what failed and where its log is (``--if-built``: the peer's columns say "not built" instead).

Workloads, each at every ``--clients`` level, streamed and not, at every ``--temperatures`` value:
  chat        every client sends ``--chats`` short chats one after another (``--max-tokens``, the same top_k, top_p,
              min_p and seed on both sides): requests and completion tokens a second, and the p50 of the latency
              (non-streamed) or of the time to first token (streamed).
  multi-turn  ``--conversations`` conversations x ``--turns`` turns, round robin, streamed at temperature 0; the
              manager gets each conversation's id, llama-server its slots' prompt cache (``cache_prompt``, its RAM
              cache): the median TTFT of turn 1 and of the last turn, and the run's time.
Then the resident memory of each, after the workloads: llama-server's process; the manager's and its worker's (the
gateway apart); RSS, and PSS (the pages the manager and its worker share, the interpreter's, counted once).
llama.cpp's own counters are read from each side's answers: prompt and decode milliseconds a token.

    ratio = ours / llama-server (requests/s, tokens/s: higher is better for ours; TTFT, latency, memory: lower)

Prints a table, then one JSON line of figures. Run: ``.venv/bin/python bench/peers.py`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.daemon import GEMMA, REPO, SMOLLM2, llm_entry, running_gateway  # noqa: E402
from bench.kv_cache import SYSTEM, user_turn  # noqa: E402  (the same conversations)
from model_client import ModelClient  # noqa: E402

BUILD = REPO / "build" / "peers"
MODELS = {"smollm2": (SMOLLM2, "Q4_1", None), "gemma3-270m": (GEMMA, "Q4_K_M", "gemma")}
SIDES = ("gateway", "model_client", "llama-server")
# Gemma 3 270M's GGUF (a base model) has no chat template: the manager is told the gemma turn format, the peer its
# own built-in gemma template (a name it takes only without Jinja: with it, "gemma" is a template that says
# "gemma"). Both write the same prompt, the system text at the head of the first user turn.
PEER_TEMPLATE = {GEMMA: ["--no-jinja", "--chat-template", "gemma"]}
TOPICS = ["a lighthouse", "a bakery", "the moon", "a lost key", "a red bicycle", "a storm", "an old map", "a cat"]
# The Makefile's flags for a CPU that lists AMX (some virtual machines stop its first instruction): the same family
# without AMX; elsewhere llama.cpp's own -march=native.
NO_AMX = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON "
    "-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
)


class BuildFailed(RuntimeError):
    """llama-server could not be built: the message says which step and where its log is."""


# ----- building the peer ------------------------------------------------------------------------------------------


def cpu_flags() -> list[str]:
    """What the project's own llama.cpp is built with (the Makefile's rule)."""
    if "CMAKE_ARGS" in os.environ:
        return shlex.split(os.environ["CMAKE_ARGS"])
    try:
        amx = "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        amx = False
    return NO_AMX.split() if amx else []


def server_path(pinned: str, flags: list[str]) -> Path:
    tag = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:8]
    return BUILD / f"llama.cpp-{pinned}-{tag}" / "build" / "bin" / "llama-server"


def build_llama_server(pinned: str, flags: list[str], log: Callable[[str], None]) -> Path:
    """llama-server of llama-cpp-python ``pinned``'s vendored llama.cpp, built once (minutes) and kept."""
    binary = server_path(pinned, flags)
    if binary.is_file():
        return binary
    root = binary.parents[2]
    root.mkdir(parents=True, exist_ok=True)
    build_log = root / "build.log"

    def step(what: str, command: list[str], **kwargs) -> None:
        log(f"llama-server: {what}")
        with build_log.open("a") as out:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            try:
                done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)
            except OSError as exc:
                raise BuildFailed(f"{what}: {exc} (is it installed?); log: {build_log}") from None
        if done.returncode != 0:
            raise BuildFailed(f"{what} failed (exit {done.returncode}); log: {build_log}")

    sdist = root / "sdist"
    archives = list(sdist.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        spec = f"llama-cpp-python=={pinned}"
        step(
            f"fetching the source of {spec}",
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(sdist), spec],
        )
        archives = list(sdist.glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            raise BuildFailed(f"pip gave no source archive of {spec}; log: {build_log}")
    source = root / "src"
    if not (source / "CMakeLists.txt").is_file():
        log("llama-server: unpacking the vendored llama.cpp")
        with tarfile.open(archives[0]) as archive:
            prefix = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise BuildFailed(f"{archives[0]} holds no vendor/llama.cpp")
            for member in members:
                member.name = member.name[len(prefix) :]
            shutil.rmtree(source, ignore_errors=True)
            archive.extractall(source, members=[m for m in members if m.name], filter="data")
    options = [
        "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would fetch the web page from a hub: the page is not measured
    ]  # fmt: skip
    step("configuring (cmake)", ["cmake", "-S", str(source), "-B", str(root / "build"), *options, *flags])
    jobs = str(os.cpu_count() or 2)
    step(f"building (cmake --build, {jobs} jobs; minutes)",
         ["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j", jobs])  # fmt: skip
    if not binary.is_file():
        raise BuildFailed(f"the build made no {binary}; log: {build_log}")
    return binary


# ----- the two servers ------------------------------------------------------------------------------------------


@dataclass
class Server:
    """One side: an OpenAI-compatible URL, what its model is called there, and the processes whose memory counts."""

    name: str
    url: str
    model: str
    pids: Callable[[], list[int]]
    endpoint: str | None = None  # the manager's model_client endpoint (ours only)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {process.returncode} at start")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"llama-server did not answer /health within {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(
    binary: Path, model: Path, slots: int, n_ctx: int, threads: int, flash: str, gpu_layers: int = 0
) -> Iterator[Server]:
    """``-np`` slots of ``n_ctx`` tokens each (one KV stream a slot, as ours), ``threads`` for prompts and decode."""
    port = free_port()
    command = [
        str(binary), "-m", str(model), *PEER_TEMPLATE.get(model, []), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "-c", str(n_ctx * slots), "-t", str(threads), "-tb", str(threads), "-fa", flash,
        "--no-webui", "-ngl", str(gpu_layers if gpu_layers >= 0 else 999),
    ]  # fmt: skip
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield Server("llama-server", url, model.stem, lambda: [process.pid])
    except Exception:
        tail = Path(log.name).read_text(errors="replace").splitlines()[-15:]
        say(f"llama-server ({shlex.join(command)}) said last:\n" + "\n".join(tail))
        raise
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        os.unlink(log.name)


@contextmanager
def ours(name: str, model: Path, quantization: str, chat_format: str | None, slots: int, n_ctx: int, threads: int,
         flash: str = "auto", voice_sequences: int = 0, gpu_layers: int = 0) -> Iterator[Server]:  # fmt: skip
    """The manager and its gateway, the model loaded with ``slots`` sequences of ``n_ctx`` tokens on ``threads``."""
    entry = llm_entry(
        model,
        quantization,
        threads,
        parallel=slots,
        n_ctx=n_ctx,
        flash_attn=flash,
        voice_sequences=voice_sequences,
        n_gpu_layers=gpu_layers,
        **({"chat_format": chat_format} if chat_format else {}),
    )
    config = {"manager": {"spare_workers": 0}, "kv_cache": {"spill_dir": None}, "models": {name: entry}}
    with running_gateway(config) as stack:
        stack.client.load(name)
        manager = psutil.Process(stack.manager_pid)
        yield Server(
            "ours", stack.url, name, lambda: [manager.pid, *(p.pid for p in manager.children())], stack.client.endpoint
        )


def resident_mib(pids: list[int], field: str = "rss") -> float:
    """The processes' resident memory (``pss``: each page shared between them, the interpreter's and the shared
    libraries', counted once)."""
    return sum(getattr(psutil.Process(pid).memory_full_info(), field) for pid in pids) / 2**20


# ----- requests -------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    latency_ms: float
    ttft_ms: float
    tokens: int
    prompt_ms_per_token: float | None = None  # llama.cpp's counters, where the side reports them
    decode_ms_per_token: float | None = None
    evaluated: int | None = None  # prompt tokens evaluated (not taken from a cache)


def sampling(temperature: float, seed: int) -> dict:
    """The same sampler chain on both sides: top_k, top_p, min_p, temperature; no penalties."""
    return {"temperature": temperature, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": seed,
            "repeat_penalty": 1.0}  # fmt: skip


def web(server: Server) -> httpx.Client:
    """A new connection a request on both sides: llama-server closes one after a streamed answer, which a kept
    connection finds only on its next request."""
    return httpx.Client(base_url=server.url, timeout=600, limits=httpx.Limits(max_keepalive_connections=0))


def over_http(http: httpx.Client, server: Server, messages: list[dict], max_tokens: int, temperature: float,
              seed: int, stream: bool, conversation: str | None = None) -> tuple[Reply, str]:  # fmt: skip
    headers = {"X-Conversation-Id": conversation} if conversation else {}
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens, "stream": stream,
            **sampling(temperature, seed)}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    first, tokens, text, timings, usage = None, 0, [], {}, {}
    if stream:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as answer:
            answer.raise_for_status()
            for line in answer.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(chunk["choices"][0]["delta"]["content"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    tokens = usage["completion_tokens"]
                timings = chunk.get("timings") or timings
    else:
        answer = http.post("/v1/chat/completions", json=body, headers=headers)
        answer.raise_for_status()
        reply = answer.json()
        usage = reply["usage"]
        tokens = usage["completion_tokens"]
        text.append(reply["choices"][0]["message"].get("content") or "")
        timings = reply.get("timings") or {}
    ended = time.perf_counter()
    latency = (ended - started) * 1000
    return Reply(
        latency,
        ((first or ended) - started) * 1000,
        tokens,
        timings.get("prompt_per_token_ms"),
        timings.get("predicted_per_token_ms"),
        timings.get("prompt_n", evaluated_of(usage)),
    ), "".join(text)


def evaluated_of(usage: dict) -> int | None:
    """OpenAI's usage: the prompt tokens not counted as cached."""
    if "prompt_tokens" not in usage:
        return None
    return usage["prompt_tokens"] - ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def over_client(client: ModelClient, server: Server, messages: list[dict], max_tokens: int, temperature: float,
                seed: int, stream: bool, conversation: str | None = None) -> tuple[Reply, str]:  # fmt: skip
    options = sampling(temperature, seed)
    started = time.perf_counter()
    first = None
    if stream:
        answer = client.chat(server.model, messages, stream=True, max_tokens=max_tokens,
                             conversation_id=conversation, **options)  # fmt: skip
        for _ in answer:
            first = first or time.perf_counter()
        result = answer.result
    else:
        result = client.chat(server.model, messages, max_tokens=max_tokens, conversation_id=conversation, **options)
    ended = time.perf_counter()
    assert result is not None
    usage, timings = result.usage, result.timings
    evaluated = usage.prompt_tokens - usage.cached_tokens
    # The engine's figures, defined as llama-server's per-slot ones: the prompt's time over the tokens evaluated,
    # and the reply's time a token after the first.
    reply = Reply(
        (ended - started) * 1000,
        ((first or ended) - started) * 1000,
        usage.completion_tokens,
        timings.ttft_ms / max(1, evaluated) if timings else None,
        1000 / timings.tokens_per_s if timings and timings.tokens_per_s else None,
        evaluated,
    )
    return reply, result.text


def connect(server: Server, side: str) -> ModelClient | httpx.Client:
    return ModelClient(server.endpoint, timeout=600) if side == "model_client" else web(server)


def ask(side: str) -> Callable[..., tuple[Reply, str]]:
    """How a side is asked: ``over_client`` or ``over_http``, called alike."""
    return over_client if side == "model_client" else over_http


def chat_messages(level: str, client: int, chat: int) -> list[dict]:
    """A prompt of its own for every request of the run (the same on both sides): llama-server keeps every prompt
    it saw in RAM, so a prompt asked again at the next level would be answered from its cache."""
    topic = TOPICS[(client + chat) % len(TOPICS)]
    return [{"role": "user", "content": f"Story {level}-{client}.{chat}: write a short story about {topic}."}]


@dataclass
class Level:
    side: str
    clients: int
    stream: bool
    temperature: float
    replies: list[Reply] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def req_s(self) -> float:
        return len(self.replies) / self.seconds

    @property
    def tok_s(self) -> float:
        return sum(r.tokens for r in self.replies) / self.seconds

    @property
    def p50_ms(self) -> float:
        return statistics.median(r.ttft_ms if self.stream else r.latency_ms for r in self.replies)

    def counter(self, name: str) -> float | None:
        values = [getattr(r, name) for r in self.replies if getattr(r, name) is not None]
        return statistics.median(values) if values else None


def chat_load(server: Server, side: str, clients: int, chats: int, max_tokens: int, temperature: float,
              stream: bool) -> Level:  # fmt: skip
    """``clients`` clients at once, each sending ``chats`` chats one after another."""
    level = Level(side, clients, stream, temperature)
    # one digit a side (the same token count on each), then the level
    tag = f"{SIDES.index(side)}{clients}{'s' if stream else 'p'}{temperature:g}-{chats}x{max_tokens}"
    go = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            with connect(server, side) as connection:
                go.wait()
                for chat in range(chats):
                    messages = chat_messages(tag, index, chat)
                    reply, _ = ask(side)(
                        connection, server, messages, max_tokens, temperature, 1000 * index + chat, stream
                    )
                    level.replies.append(reply)
        except BaseException as exc:  # noqa: BLE001 - reported after the level
            errors.append(exc)
            go.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    go.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    level.seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{side}, {clients} clients: {errors[0]!r}")
    return level


def multi_turn(server: Server, side: str, conversations: int, turns: int, max_tokens: int) -> dict:
    """Round robin over the conversations, streamed, temperature 0: TTFT per turn (ms) and the run's seconds."""
    # a system prompt of its own a side (the same token count): ours would otherwise find the other side's turns
    system = f"{SYSTEM} Run {SIDES.index(side)}."
    histories = [[{"role": "system", "content": system}] for _ in range(conversations)]
    ttft: list[list[float]] = [[] for _ in range(turns)]
    evaluated: list[list[int]] = [[] for _ in range(turns)]
    counters: list[float] = []
    started = time.perf_counter()
    with connect(server, side) as connection:
        for turn in range(turns):
            for conv in range(conversations):
                histories[conv].append({"role": "user", "content": user_turn(conv, turn)})
                # ours: the conversation's id (X-Conversation-Id through the gateway); llama-server: its prompt cache
                conversation = None if side == "llama-server" else f"{side}-{conv}"
                reply, text = ask(side)(connection, server, histories[conv], max_tokens, 0.0, 0, True, conversation)
                ttft[turn].append(reply.ttft_ms)
                if reply.evaluated is not None:
                    evaluated[turn].append(reply.evaluated)
                if reply.prompt_ms_per_token is not None:
                    counters.append(reply.prompt_ms_per_token)
                histories[conv].append({"role": "assistant", "content": text})
    return {
        "turn1_ttft_ms": statistics.median(ttft[0]),
        "last_ttft_ms": statistics.median(ttft[-1]),
        "seconds": time.perf_counter() - started,
        "turn1_evaluated": statistics.median(evaluated[0]) if evaluated[0] else None,
        "last_evaluated": statistics.median(evaluated[-1]) if evaluated[-1] else None,
        "prompt_ms_per_token": statistics.median(counters) if counters else None,
    }


# ----- the run --------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def level_key(name: str, side: str, level: Level) -> str:
    return f"{name}_{side}_{level.clients}_{'stream' if level.stream else 'plain'}_t{level.temperature:g}"


@dataclass
class Measured:
    """One model's figures: each side's chat levels, multi-turn run and resident memory."""

    levels: dict[str, list[Level]] = field(default_factory=dict)
    turns: dict[str, dict] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)


def run_side(args: argparse.Namespace, name: str, side: str, server: Server, into: Measured) -> None:
    chat_load(server, side, 1, 1, 4, 0.0, False)  # the first request pays for buffers
    for clients in args.levels:
        for temperature in args.temperature_list:
            for stream in args.stream_list:
                say(f"{name} {side}: {clients} clients, temperature {temperature}, stream {stream}")
                level = chat_load(server, side, clients, args.chats, args.max_tokens, temperature, stream)
                into.levels.setdefault(side, []).append(level)
    if args.conversations:
        say(f"{name} {side}: {args.conversations} conversations x {args.turns} turns")
        into.turns[side] = multi_turn(server, side, args.conversations, args.turns, args.turn_tokens)


def measure(args: argparse.Namespace, name: str, binary: Path | None) -> Measured:
    """Ours, then llama-server: one after the other (two servers on two cores would each skew the other)."""
    path, quantization, chat_format = MODELS[name]
    measured = Measured()
    with ours(name, path, quantization, chat_format, args.slots, args.n_ctx, args.threads, args.our_flash,
              args.voice_sequences, args.gpu_layers) as server:  # fmt: skip
        for side in args.side_list:
            run_side(args, name, side, server, measured)
        measured.memory["ours"] = resident_mib(server.pids())
        measured.memory["ours_pss"] = resident_mib(server.pids(), "pss")
    if binary is not None:
        with llama_server(binary, path, args.slots, args.n_ctx, args.threads, args.flash_attn,
                          args.gpu_layers) as server:  # fmt: skip
            run_side(args, name, "llama-server", server, measured)
            measured.memory["llama-server"] = resident_mib(server.pids())
            measured.memory["llama-server_pss"] = resident_mib(server.pids(), "pss")
    return measured


def report(args: argparse.Namespace, name: str, measured: Measured, figures: dict, ratios: dict) -> None:
    """Prints the model's tables; its figures and ratios (ours / llama-server) go into ``figures`` and ``ratios``."""
    print(f"\n{name}: {args.chats} chats a client, max_tokens {args.max_tokens}")
    heads = ("clients", "stream", "temp", "req/s", "tok/s", "p50 ms", "prompt ms/t", "decode ms/t")
    print(f"{'side':<14}" + "".join(f"{h:>12}" for h in (*heads, "ratio req/s", "ratio tok/s", "ratio p50")))
    peer = {(lv.clients, lv.stream, lv.temperature): lv for lv in measured.levels.get("llama-server", [])}
    for side, levels in measured.levels.items():
        for lv in levels:
            theirs = peer.get((lv.clients, lv.stream, lv.temperature)) if side != "llama-server" else None
            shares = (None, None, None)
            if theirs is not None:
                shares = (lv.req_s / theirs.req_s, lv.tok_s / theirs.tok_s, lv.p50_ms / theirs.p50_ms)
                for what, share in zip(("req_s", "tok_s", "p50"), shares, strict=True):
                    ratios[f"{level_key(name, side, lv)}_{what}"] = round(share, 3)
            cells = (
                lv.clients, "yes" if lv.stream else "no", f"{lv.temperature:g}", f"{lv.req_s:.2f}", f"{lv.tok_s:.1f}",
                f"{lv.p50_ms:.0f}", fmt(lv.counter("prompt_ms_per_token"), 2),
                fmt(lv.counter("decode_ms_per_token"), 2), *(fmt(x, 3) for x in shares),
            )  # fmt: skip
            print(f"{side:<14}" + "".join(f"{c:>12}" for c in cells))
            figures[level_key(name, side, lv)] = {
                "req_s": round(lv.req_s, 2),
                "tok_s": round(lv.tok_s, 1),
                "p50_ms": round(lv.p50_ms, 1),
            }
    if measured.turns:
        print(f"\n{name}: {args.conversations} conversations x {args.turns} turns, max_tokens {args.turn_tokens}")
        print(
            f"{'side':<14}{'turn 1 TTFT':>12}{'last TTFT':>11}{'growth':>8}{'seconds':>9}{'prompt ms/t':>12}"
            f"{'evaluated 1':>12}{'evaluated N':>12}"
        )
        peer_turns = measured.turns.get("llama-server")
        for side, t in measured.turns.items():
            growth = t["last_ttft_ms"] / t["turn1_ttft_ms"]
            print(
                f"{side:<14}{t['turn1_ttft_ms']:>12.0f}{t['last_ttft_ms']:>11.0f}{growth:>8.2f}{t['seconds']:>9.1f}"
                f"{fmt(t['prompt_ms_per_token'], 2):>12}{fmt(t['turn1_evaluated'], 0):>12}"
                f"{fmt(t['last_evaluated'], 0):>12}"
            )
            figures[f"{name}_{side}_multiturn"] = {k: round(v, 2) for k, v in t.items() if v is not None}
            figures[f"{name}_{side}_multiturn"]["growth"] = round(growth, 3)
            if peer_turns and side != "llama-server":
                peer_growth = peer_turns["last_ttft_ms"] / peer_turns["turn1_ttft_ms"]
                ratios[f"{name}_{side}_last_ttft"] = round(t["last_ttft_ms"] / peer_turns["last_ttft_ms"], 3)
                ratios[f"{name}_{side}_growth"] = round(growth / peer_growth, 3)
    print(f"\n{name}: resident memory " + ", ".join(f"{k} {v:.0f} MiB" for k, v in measured.memory.items()))
    figures[f"{name}_rss_mib"] = {k: round(v) for k, v in measured.memory.items()}
    if "llama-server" in measured.memory:
        ratios[f"{name}_rss"] = round(measured.memory["ours"] / measured.memory["llama-server"], 3)
        ratios[f"{name}_pss"] = round(measured.memory["ours_pss"] / measured.memory["llama-server_pss"], 3)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def peer_binary(args: argparse.Namespace, pinned: str) -> tuple[Path | None, str]:
    """The llama-server to run and what the table says of it; built here unless ``--if-built``."""
    if args.peer:
        return Path(args.peer), args.peer
    flags = cpu_flags()
    binary = server_path(pinned, flags)
    if binary.is_file():
        return binary, str(binary)
    if args.if_built:
        return None, "not built (bench/peers.py without --if-built builds it)"
    try:
        return build_llama_server(pinned, flags, say), str(binary)
    except BuildFailed as exc:
        print(f"could not build llama-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, one level each")
    parser.add_argument("--chats", type=int, default=6, help="chats each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperatures", default="0.7,0")
    parser.add_argument("--streams", default="no,yes", help="non-streamed, streamed or both")
    parser.add_argument("--sides", default="gateway,model_client", help="ours: through the gateway, model_client")
    parser.add_argument("--conversations", type=int, default=8, help="multi-turn: conversations (0: none)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn-tokens", type=int, default=48, help="multi-turn: each reply's max_tokens")
    parser.add_argument("--slots", type=int, default=4, help="sequences (ours) and slots (llama-server)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="tokens a sequence / slot")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--flash-attn", default="auto", help="llama-server's -fa (on, off, auto: its default)")
    parser.add_argument("--our-flash-attn", dest="our_flash", default="auto", help="the model's flash_attn (ours)")
    parser.add_argument(
        "--voice-sequences", type=int, default=0, help="ours: sequences kept for voice beyond --slots (as the peer: 0)"
    )
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers on the GPU, both sides (-1: all)")
    parser.add_argument("--peer", help="a llama-server binary to use instead of building one")
    parser.add_argument("--if-built", action="store_true", help="no build: without a built peer, ours alone")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.clients.split(",") if int(x) > 0]  # 0: no chat levels
    args.temperature_list = [float(x) for x in args.temperatures.split(",")]
    args.stream_list = [s == "yes" for s in args.streams.split(",")]
    args.side_list = [s for s in args.sides.split(",") if s]

    pinned = version("llama-cpp-python")
    binary, peer_note = peer_binary(args, pinned)
    print(
        f"llama-server: {peer_note}; -np {args.slots} -c {args.slots * args.n_ctx} -t {args.threads} "
        f"-fa {args.flash_attn}\nours: parallel {args.slots}, voice_sequences {args.voice_sequences}, "
        f"n_ctx {args.n_ctx}, "
        f"n_threads {args.threads}, flash_attn {args.our_flash}"
    )
    figures: dict = {
        "llama_cpp_python": pinned,
        "threads": args.threads,
        "slots": args.slots,
        "n_ctx": args.n_ctx,
        "peer": peer_note if binary else None,
        "peer_flash_attn": args.flash_attn,
    }
    ratios: dict[str, float] = {}
    for name in args.models.split(","):
        report(args, name, measure(args, name, binary), figures, ratios)
    figures["ratios"] = ratios
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
