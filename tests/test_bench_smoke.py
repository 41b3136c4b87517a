"""Every benchmark still runs: each script in bench/ runs in a tiny mode and must end with its JSON line of figures.

No figure is asserted (speed is measured by running the benchmarks on a quiet machine, not here), so the scripts
run side by side, one engine thread each, to keep the suite short; a new script must be given its tiny mode here.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

BENCH = REPO / "bench"
HELPERS = {"daemon.py"}  # not a benchmark: the daemon the benchmarks start
TINY = {
    "transport.py": ["--pings", "50", "--tokens", "8", "--rounds", "1", "--threads", "1"],
    "swap.py": ["--rounds", "1", "--threads", "1"],
    "kv_cache.py": ["--conversations", "1", "--turns", "2", "--threads", "1"],
    "speech.py": ["--rounds", "1", "--threads", "1", "--clips", "2"],
    "load.py": ["--levels", "2", "--requests", "4", "--budget", "30", "--soak", "0"],
    "voice_turn.py": ["--turns", "1"],
    "batching.py": ["--levels", "1,2", "--tokens", "8", "--long", "1", "--rounds", "1", "--models", "smollm2"],
}


def test_every_benchmark_has_a_tiny_mode_here() -> None:
    scripts = {path.name for path in BENCH.glob("*.py")} - HELPERS
    assert scripts == set(TINY), f"give these a tiny mode in this test: {sorted(scripts ^ set(TINY))}"


def test_every_benchmark_runs_and_ends_with_its_json_line() -> None:
    runs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCH / name), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in TINY.items()
    }
    failures = {}
    for name, run in runs.items():
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
            failures[name] = f"exit {run.returncode}: " + "\n".join(lines[-15:])
    assert not failures, "\n\n".join(f"{name}\n{tail}" for name, tail in failures.items())
