"""The engine is written against one llama-cpp-python release: it is pinned, checked at start-up and before a load,
and its private modules are reached from one adapter module only."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from model_client.errors import ModelLoadFailed
from model_manager import llama_version
from model_manager.llama_version import TESTED, WrongLlamaCpp, check_version
from tests.conftest import REPO

ADAPTER = Path("model_manager/backends/llama_cpp_api.py")
SKIPPED = frozenset({".venv", "models", "run", "build", "__pycache__", ".git"})


def private_uses(root: Path) -> list[str]:
    """``file:line`` of every import of a private llama_cpp module (``llama_cpp._x``) outside the adapter."""
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if SKIPPED & set(relative.parts) or relative == ADAPTER:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(n.startswith("llama_cpp.") and n.split(".")[1].startswith("_") for n in names):
                found.append(f"{relative}:{node.lineno}")
    return found


def test_private_llama_cpp_modules_are_used_only_by_the_adapter() -> None:
    assert private_uses(REPO) == []


def test_the_private_use_guard_finds_a_planted_import(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "engine.py").write_text("import os\nfrom llama_cpp._internals import LlamaModel\n")
    (tmp_path / "pkg" / "other.py").write_text("import llama_cpp._utils\nimport llama_cpp\n")
    (tmp_path / ADAPTER.parent).mkdir(parents=True)
    (tmp_path / ADAPTER).write_text("from llama_cpp._internals import LlamaModel\n")
    assert sorted(private_uses(tmp_path)) == ["pkg/engine.py:2", "pkg/other.py:1"]


def test_pyproject_pins_the_tested_release_and_it_is_installed() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [d for group in project["optional-dependencies"].values() for d in group if d.startswith("llama-cpp")]
    assert pins == [f"llama-cpp-python=={TESTED}"]
    check_version()  # what this machine has


def test_another_release_is_refused_naming_the_one_needed() -> None:
    with pytest.raises(WrongLlamaCpp, match=rf"0\.3\.16 is installed; the engine needs {TESTED}"):
        check_version("0.3.16")


def test_the_manager_does_not_start_on_another_release() -> None:
    planted = (
        "import sys; from model_manager import llama_version; llama_version.installed_version = lambda: '0.3.16'; "
        "from model_manager.__main__ import main; sys.exit(main(['--config', 'config/llm_config.yaml']))"
    )
    run = subprocess.run([sys.executable, "-c", planted], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert f"llama-cpp-python 0.3.16 is installed; the engine needs {TESTED}" in run.stderr


def test_a_worker_refuses_to_load_on_another_release(monkeypatch: pytest.MonkeyPatch) -> None:
    from model_manager.backends.llm.backend import GGUFBackend
    from model_manager.config import ModelSpec

    monkeypatch.setattr(llama_version, "installed_version", lambda: "0.3.16")
    with pytest.raises(ModelLoadFailed, match=f"needs {TESTED}"):
        GGUFBackend().load(ModelSpec(kind="llm", path=str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")))
