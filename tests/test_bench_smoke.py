"""Every benchmark still runs: each script in bench/ runs in a tiny mode and must end with its JSON line of figures.

No figure is asserted (speed is measured by running the benchmarks on a quiet machine, not here), so the scripts
run two at a time, the longest first, one engine thread each, to keep the suite short (measured on two cores: all
seven at once took 60-74 s, two at a time 45 s); a new script must be given its tiny mode here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import REPO

BENCH = REPO / "bench"
SIDE_BY_SIDE = 2
HELPERS = {"daemon.py"}  # not a benchmark: the daemon the benchmarks start
TINY = {  # the longest first (measured alone: 11, 8, 9, 11, 11, 10, 10, 8, 6, 5 s), so those side by side end together
    "wyoming.py": ["--turns", "1", "--repeats", "1"],
    "cpu_share.py": ["--rounds", "1", "--prompt-words", "40", "--only", "handed out"],
    "kv_cache.py": ["--conversations", "1", "--turns", "2", "--threads", "1", "--max-tokens", "8"],
    "voice_turn.py": ["--turns", "1"],
    "realtime.py": ["--turns", "1", "--streams", "1"],
    "swap.py": ["--rounds", "1", "--threads", "1"],
    "load.py": ["--levels", "2", "--requests", "4", "--budget", "30", "--soak", "0"],
    "speech.py": ["--rounds", "1", "--threads", "1", "--clips", "2"],
    "batching.py": [
        "--levels",
        "1,2",
        "--tokens",
        "8",
        "--long",
        "1",
        "--rounds",
        "1",
        "--repeats",
        "1",
        "--models",
        "smollm2",
        "--temperatures",
        "0.7",
    ],
    "transport.py": ["--pings", "50", "--tokens", "8", "--rounds", "1", "--threads", "1"],
    "token_path.py": ["--streams", "2", "--tokens", "8", "--threads", "1"],
    "gateway.py": ["--rounds", "1", "--tokens", "8", "--threads", "1"],
    # never builds llama-server here (minutes): without a built one, the manager's side alone
    "peers.py": [
        "--if-built",
        "--models",
        "smollm2",
        "--clients",
        "2",
        "--chats",
        "1",
        "--max-tokens",
        "4",
        "--temperatures",
        "0.7",
        "--sides",
        "gateway",
        "--conversations",
        "1",
        "--turns",
        "2",
        "--turn-tokens",
        "4",
        "--threads",
        "1",
    ],
}


def test_every_benchmark_has_a_tiny_mode_here() -> None:
    scripts = {path.name for path in BENCH.glob("*.py")} - HELPERS
    assert scripts == set(TINY), f"give these a tiny mode in this test: {sorted(scripts ^ set(TINY))}"


def run_tiny(name: str) -> str | None:
    """None if ``name`` ran in its tiny mode and ended with its JSON line of figures; else what went wrong."""
    run = subprocess.Popen(
        [sys.executable, str(BENCH / name), *TINY[name]],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = run.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        run.kill()
        output, _ = run.communicate()
    lines = output.strip().splitlines()
    try:
        figures = json.loads(lines[-1]) if run.returncode == 0 and lines else None
    except ValueError:
        figures = None
    if not isinstance(figures, dict) or not figures:
        return f"exit {run.returncode}: " + "\n".join(lines[-15:])
    return None


def test_every_benchmark_runs_and_ends_with_its_json_line() -> None:
    # Two at a time: all at once, llama.cpp's spinning threads take the cores from the work.
    with ThreadPoolExecutor(max_workers=SIDE_BY_SIDE) as pool:
        outcomes = dict(zip(TINY, pool.map(run_tiny, TINY), strict=True))
    failures = {name: tail for name, tail in outcomes.items() if tail is not None}
    assert not failures, "\n\n".join(f"{name}\n{tail}" for name, tail in failures.items())


def test_a_peer_that_cannot_be_built_is_a_clear_message(tmp_path, monkeypatch) -> None:
    """bench/peers.py builds llama-server from the pinned release's source: a step that fails says which, and where
    its log is, instead of a traceback from deep in the build."""
    sys.path.insert(0, str(BENCH.parent))
    from bench import peers

    monkeypatch.setattr(peers, "BUILD", tmp_path)
    said: list[str] = []
    try:
        peers.build_llama_server("0.0.0", [], said.append)  # no such release on the index
    except peers.BuildFailed as exc:
        message = str(exc)
    else:
        raise AssertionError("a build of a release that does not exist went through")
    assert message.startswith("fetching the source of llama-cpp-python==0.0.0 failed (exit ")
    log = message.rsplit("log: ", 1)[1]
    assert "llama-cpp-python==0.0.0" in open(log).read()
    assert said == ["llama-server: fetching the source of llama-cpp-python==0.0.0"]
