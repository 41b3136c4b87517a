"""The ``mm`` command against the real daemon, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, ManagerProcess


def mm(manager: ManagerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MM_ENDPOINT=manager.endpoint, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "model_client.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_ping_load_status_unload(manager: ManagerProcess) -> None:
    assert "pong from pid" in mm(manager, "ping").stdout
    assert mm(manager, "load", "smollm2").stdout.strip() == "smollm2: ready"
    status = mm(manager, "status").stdout.splitlines()
    assert status[0].split()[:6] == ["MODEL", "KIND", "DEVICE", "THREADS", "SIZE", "STATE"]
    [row] = [line.split() for line in status if line.startswith("smollm2 ")]
    assert "ready" in row and 1 <= int(row[3]) <= os.cpu_count(), "a CPU model shows the threads it was given"
    assert mm(manager, "unload", "smollm2").stdout.strip() == "smollm2: unloaded"


def test_models_lists_the_catalogue(manager: ManagerProcess) -> None:
    out = mm(manager, "models").stdout
    assert "smollm2" in out and "Q4_1" in out
    assert "missing" in out and "(file missing)" in out


def test_chat_streams_replies_for_each_line(manager: ManagerProcess) -> None:
    run = mm(manager, "chat", "smollm2", "--max-tokens", "16", stdin="Hello there\nWhat is two plus two?\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count(">>> ") == 3  # two questions answered, then the prompt that meets end of input
    assert len(run.stdout.replace(">>> ", "").strip()) > 0
    assert run.stderr.count(" s]") == 2, "each reply reports its time"


def test_errors_are_one_clear_line_and_exit_1(manager: ManagerProcess) -> None:
    run = mm(manager, "load", "no-such-model")
    assert run.returncode == 1
    assert run.stderr.strip().startswith("mm: model_not_found: model 'no-such-model' is not in the catalogue")


def test_keys_makes_a_server_pair_and_authorized_client_keys(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "model_client.cli", "keys", "--dir", str(tmp_path / "keys"), "--client", "kitchen"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert run.returncode == 0, run.stderr
    keys = tmp_path / "keys"
    assert (keys / "server.key").is_file() and (keys / "server.key_secret").stat().st_mode & 0o077 == 0
    assert (keys / "authorized" / "kitchen.key").read_bytes() == (keys / "kitchen.key").read_bytes()
    assert "curve_server_secret_key:" in run.stdout and "curve_authorized_keys:" in run.stdout


def test_keys_api_prints_a_gateway_key(manager: ManagerProcess) -> None:
    run = mm(manager, "keys", "--api")
    key = run.stdout.strip()
    assert run.returncode == 0 and len(key) >= 32 and "api_keys" in run.stderr
    assert mm(manager, "keys", "--api").stdout.strip() != key, "a new key each time"
