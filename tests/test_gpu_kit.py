"""The GPU run kit cannot rot: its dry mode (no build, the CPU) runs here, and the sdist repacking keeps what the
build needs. On a GPU machine the same checks run for real (docs/gpu.md)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts" / "gpu"))

from prepare import kept  # noqa: E402


def test_the_kit_runs_dry_and_every_check_reports(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(
        ["sh", str(REPO / "scripts" / "gpu" / "run.sh"), "--dry", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    checks = report["checks"]
    assert report["mode"] == "dry" and report["ok"], report
    assert set(checks) == {"runtime", "inventory", "load", "decode", "sigkill", "budget", "spare", "batching"}
    assert all("at_s" in check for check in checks.values()), "each check is recorded as it completes"
    assert checks["runtime"]["as_a_worker"]["exit"] == 0 and checks["runtime"]["plain"]["exit"] == 0
    assert checks["inventory"]["skipped"] and checks["spare"]["skipped"] and checks["batching"]["skipped"]
    assert 0.85 <= checks["load"]["measured_over_estimate"] <= 1.15  # the synthetic model's estimate holds
    assert checks["decode"]["tokens_per_s"]["synthetic"] > 0
    assert checks["sigkill"]["freed_within_s"] is not None and checks["sigkill"]["manager_answers_after"]
    assert [r["ready"] for r in checks["budget"]["rounds"]] == [["a"], ["b"], ["a"], ["b"]]  # evicted each time
    assert report["model"]["bytes"] > 64 * 2**20


def test_the_sdist_loses_only_its_git_test_vocabularies_and_docs() -> None:
    names = [
        "llama_cpp_python-0.3/.git/config",
        "llama_cpp_python-0.3/docs/index.md",
        "llama_cpp_python-0.3/vendor/llama.cpp/models/ggml-vocab-llama.gguf",
        "llama_cpp_python-0.3/vendor/llama.cpp/CMakeLists.txt",
        "llama_cpp_python-0.3/vendor/llama.cpp/tools/mtmd/clip.cpp",
        "llama_cpp_python-0.3/vendor/llama.cpp/docs-like/x",
        "llama_cpp_python-0.3/llama_cpp/llama.py",
        "llama_cpp_python-0.3/CMakeLists.txt",
    ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in names:
            tar.addfile(tarfile.TarInfo(name), io.BytesIO())
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        left = [m.name for m in tar if kept(m)]
    assert left == [n for n in names if "/.git/" not in n and "/docs/" not in n and "/models/" not in n]
