"""Fixtures that start the real manager process on ipc:// sockets in a temporary directory, with real models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
import zmq
from hypothesis import strategies as st

from daemonkit.process import DaemonProcess
from model_client import ModelClient, protocol
from model_client.protocol import MIB

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"
WHISPER = MODELS / "whisper-tiny.en"
VOICE = MODELS / "piper" / "en_US-joe-medium.onnx"
MAX_AUDIO_S = 30

GREEDY = {"temperature": 0.0, "seed": 1}


FACTS_CACHE = Path(tempfile.gettempdir()) / "mm-test-gguf-facts"


def gguf_facts_cache() -> Path:
    """GGUF header facts of the test models, read once per machine (parsing Gemma's vocabulary takes seconds)."""
    from model_manager.footprint import FootprintStore

    store = FootprintStore(FACTS_CACHE)
    for path in (SMOLLM2, GEMMA):
        store.read_now(str(path))
    store.close()
    return store.facts_path


def base_config(run_dir: Path) -> dict:
    """A config like the shipped one, on sockets of its own, with extra catalogue entries for the tests."""
    state = run_dir / "state"
    state.mkdir(exist_ok=True)
    shutil.copy(gguf_facts_cache(), state / "gguf_facts.json")
    smollm2 = {"kind": "llm", "path": str(SMOLLM2), "quantization": "Q4_1", "n_ctx": 2048, "idle_ttl_s": -1}
    corrupt = run_dir / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    truncated = run_dir / "truncated.gguf"
    with open(SMOLLM2, "rb") as src:
        truncated.write_bytes(src.read(2 * MIB))
    return {
        "ENABLE_LEGACY_MODELS": False,
        "endpoints": {
            "requests": f"ipc://{run_dir}/manager.sock",
            "events": f"ipc://{run_dir}/events.sock",
            "workers": f"ipc://{run_dir}/workers.sock",
        },
        "limits": {
            "max_message_bytes": 4 * MIB,
            "max_tokens": 512,
            "request_timeout_s": 600,  # a backstop: a busy machine runs a tool prompt 10-30x slower than a quiet one
            "max_audio_s": MAX_AUDIO_S,
        },
        "manager": {"heartbeat_s": 0.5, "log_level": "debug", "state_dir": str(state)},
        "metrics": {"port": 0},  # any free port: tests never collide with a running stack
        # One request at a time per LLM (the engine in exact mode): these tests assert serving order, full queues, exact
        # replies with reuse and memory sizes. Batching (the shipped default) has its own daemons in
        # test_batching.py and test_batch_correctness.py.
        "defaults": {"parallel": 1},
        "kv_cache": {"spill_dir": str(run_dir / "kv")},
        "catalogue": {"dir": str(run_dir / "models.d"), "models_dir": str(run_dir / "pulled"), "keep_free_mib": 0},
        "models": {
            "smollm2": smollm2,
            "gemma3-270m": {
                "kind": "llm",
                "path": str(GEMMA),
                "quantization": "Q4_K_M",
                "chat_format": "gemma",
                "idle_ttl_s": -1,
            },
            "smollm2-small-ctx": {**smollm2, "n_ctx": 128},
            "smollm2-short-queue": {**smollm2, "max_queue": 2},
            "smollm2-quick-idle": {**smollm2, "idle_ttl_s": 0.3},
            "smollm2-nice": {**smollm2, "nice": 7},
            "corrupt": {**smollm2, "path": str(corrupt)},
            "truncated": {**smollm2, "path": str(truncated)},
            "missing": {**smollm2, "path": str(run_dir / "no-such-model.gguf")},
            "whisper": {
                "kind": "stt",
                "path": str(WHISPER),
                "compute_type": "int8",
                "batch_size": 4,
                "batch_wait_ms": 50,
                "idle_ttl_s": -1,
            },
            "joe": {"kind": "tts", "path": str(VOICE), "idle_ttl_s": -1},
        },
    }


class ManagerProcess(DaemonProcess):
    """The real manager as a subprocess on ``config`` (written beside its log, ``manager.log``)."""

    def __init__(self, run_dir: Path, config: dict) -> None:
        self.run_dir = run_dir
        self.config = config
        config_path = run_dir / "llm_config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        super().__init__("model_manager", config_path, config["endpoints"]["requests"], run_dir / "manager.log")
        self.events_endpoint = config["endpoints"]["events"]

    def subscribe(self) -> zmq.Socket:
        """A SUB for the model events, returned once the manager has its subscription."""
        return subscriber(self.events_endpoint, "model.", heartbeat=protocol.EVENT_HEARTBEAT)


SHIPPED_CONFIG = REPO / "config" / "llm_config.yaml"
SUPERVISORD_CONF = REPO / "supervisord.conf"


def stack_config(run_dir: Path) -> dict:
    """``base_config`` plus the shipped services, agents, routing and personas, on sockets in ``run_dir``."""
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config = base_config(run_dir)
    config["services"] = {
        "stt": {
            **shipped["services"]["stt"],
            "requests": f"ipc://{run_dir}/stt.sock",
            "events": f"ipc://{run_dir}/stt-events.sock",
            "model": "whisper",
        },
        "tts": {
            **shipped["services"]["tts"],
            "requests": f"ipc://{run_dir}/tts.sock",
            "say": f"ipc://{run_dir}/tts-say.sock",
            "events": f"ipc://{run_dir}/tts-events.sock",
            "voice": "joe",
        },
    }
    config["agents"] = {
        **shipped["agents"],
        "requests": f"ipc://{run_dir}/agent-{{persona}}.sock",
        "events": f"ipc://{run_dir}/agent-{{persona}}-ev.sock",
        "history_dir": str(run_dir / "agents"),
    }
    config["routing"] = shipped["routing"]
    config["personas"] = shipped["personas"]
    # The network front ends on any free ports (0; a daemon started with --ports-file says which): a test never
    # meets a stack running on this machine, nor races another process for a port.
    config["gateway"] = {"port": 0}
    config["wyoming"] = {"asr_port": 0, "tts_port": 0, "handle_ports": {name: 0 for name in shipped["personas"]}}
    return config


class SupervisedStack:
    """The shipped supervisord.conf, pointed at a test's own config, run directory and sockets."""

    def __init__(self, run_dir: Path, config: dict, extra_personas: tuple[str, ...] = ()) -> None:
        self.run_dir = run_dir
        self.config = config
        self.config_path = run_dir / "llm_config.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        (run_dir / "logs").mkdir(exist_ok=True)
        text = SUPERVISORD_CONF.read_text()
        for persona in extra_personas:  # one more agent program, made like Jarvis's
            section = text[text.index("[program:agent-jarvis]") :].split("\n\n")[0]
            text += "\n" + section.replace("jarvis", persona) + "\n"
        text = (
            text.replace("%(here)s/.venv/bin/python", sys.executable)
            .replace("%(here)s/config/llm_config.yaml", str(self.config_path))
            .replace("%(here)s/run", str(run_dir))
            .replace("%(here)s", str(REPO))
        )
        self.conf = run_dir / "supervisord.conf"
        self.conf.write_text(text)
        self.proc: subprocess.Popen | None = None

    def start(self, programs: tuple[str, ...], timeout: float = 90.0) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )
        wait_for(lambda: all(state == "RUNNING" for state in self.states(programs).values()), timeout=timeout)

    def ctl(self, *args: str) -> str:
        run = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return run.stdout

    def states(self, programs: tuple[str, ...]) -> dict[str, str]:
        rows = [line.split() for line in self.ctl("status").splitlines() if line.strip()]
        found = {row[0]: row[1] for row in rows if len(row) > 1}
        return {name: found.get(name, "ABSENT") for name in programs}

    def pid(self, program: str) -> int:
        return int(self.ctl("pid", program).strip() or 0)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.ctl("shutdown")
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def subscriber(endpoint: str, *topics: str, heartbeat: str | None = None) -> zmq.Socket:
    """A SUB to ``topics``. With ``heartbeat`` (the daemon's heartbeat topic) it is returned once the daemon has
    the subscriptions: a daemon greets each new subscriber of its heartbeat with one at once, and subscriptions
    arrive in order, so the greeting proves the others are in place, where a sleep would only hope (ZeroMQ's slow
    joiner)."""
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    for topic in topics:
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    if heartbeat is not None:
        sock.setsockopt(zmq.SUBSCRIBE, heartbeat.encode())
    sock.connect(endpoint)
    if heartbeat is not None:
        deadline = time.monotonic() + 10
        while True:
            assert sock.poll(max(0.0, deadline - time.monotonic()) * 1000), f"no {heartbeat}: not subscribed"
            if protocol.decode_event(sock.recv_multipart())[0] == heartbeat:
                break
    return sock


def is_heartbeat(topic: str) -> bool:
    return topic.endswith(".heartbeat")


def next_event(sock: zmq.Socket, timeout: float = 60.0) -> tuple[str, dict, list[bytes]]:
    """The next event that is not a heartbeat: (topic, body, binary frames)."""
    deadline = time.monotonic() + timeout
    while True:
        assert sock.poll(max(0.0, deadline - time.monotonic()) * 1000), "no event arrived"
        frames = sock.recv_multipart()
        topic, body = protocol.decode_event(frames)
        if not is_heartbeat(topic):
            return topic, body, frames[2:]


def collect_events(sock: zmq.Socket, until: float) -> list[dict]:
    """Events received until ``until`` (monotonic seconds); heartbeats left out."""
    events = []
    while (left := until - time.monotonic()) > 0:
        if sock.poll(left * 1000):
            topic, event = protocol.decode_event(sock.recv_multipart())
            if not is_heartbeat(topic):
                events.append(event)
    return events


def rss_bytes(pid: int) -> int:
    """A daemon's resident memory, to check that what peers send does not grow it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05):
    """``predicate``'s first true value, polled; the timeout is a bound for a busy machine, not an expectation."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def model_status(client: ModelClient, name: str) -> dict:
    return next(m for m in client.status()["models"] if m["name"] == name)


@pytest.fixture(scope="session", autouse=True)
def _models_installed() -> None:
    missing = [p for p in (SMOLLM2, GEMMA, WHISPER / "model.bin", VOICE) if not p.is_file()]
    if missing:
        pytest.exit(f"models missing ({missing}); run `make test`, which installs them first", returncode=2)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # ipc:// paths must stay short (about 100 bytes), so not under pytest's long tmp_path.
    path = Path(tempfile.mkdtemp(prefix="mm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def manager() -> Iterator[ManagerProcess]:
    """One daemon shared by a test module (model loads are the slow part)."""
    path = Path(tempfile.mkdtemp(prefix="mm-"))
    process = ManagerProcess(path, base_config(path))
    process.start()
    yield process
    process.stop()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fresh_manager(run_dir: Path) -> Iterator[ManagerProcess]:
    """A daemon of the test's own, for tests that kill or restart it."""
    process = ManagerProcess(run_dir, base_config(run_dir))
    process.start()
    yield process
    process.stop()


@pytest.fixture
def client(manager: ManagerProcess) -> Iterator[ModelClient]:
    with manager.client(timeout=60) as c:
        yield c


def json_values(
    words: list[str] | None = None, keys: list[str] | None = None, size: int = 3, max_leaves: int = 10
) -> st.SearchStrategy:
    """Any JSON value, nested, for the fuzz tests: integers past int64 included; ``words`` among the strings and
    ``keys`` among the object keys, so that some values reach the fields a daemon reads."""
    leaves = [
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
    ]
    if words:
        leaves.append(st.sampled_from(words))
    names = st.sampled_from(keys) | st.text(max_size=8) if keys else st.text(max_size=8)
    return st.recursive(
        st.one_of(*leaves),
        lambda inner: st.one_of(st.lists(inner, max_size=size), st.dictionaries(names, inner, max_size=size)),
        max_leaves=max_leaves,
    )
