"""Guardrail: nothing outside model_manager/ loads a model.

Direct model loading means importing, or importing by name at run time, one of the model engines. It is allowed
only in ``model_manager/`` (which owns the models), in ``bench/`` (whose baselines call the engines in-process on
purpose) and in tests named ``test_backend_*.py`` (which exercise backends), or everywhere when the config says
``ENABLE_LEGACY_MODELS: true``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from model_manager.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "config" / "llm_config.yaml"
ENGINES = frozenset({"llama_cpp", "faster_whisper", "ctranslate2", "piper", "onnxruntime"})
EXEMPT_DIRS = ("model_manager", "bench")
SKIPPED_DIRS = frozenset({".venv", "venv", "models", "run", "build", "node_modules", "__pycache__"})
DYNAMIC_IMPORTS = frozenset({"import_module", "__import__"})


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _engine(module: str | None) -> str | None:
    top = (module or "").split(".")[0]
    return top if top in ENGINES else None


def violations_in(source: str, path: Path) -> list[Violation]:
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Violation(path, node.lineno, f"import {a.name}") for a in node.names if _engine(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _engine(node.module):
            found.append(Violation(path, node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in DYNAMIC_IMPORTS and isinstance(node.args[0].value, str) and _engine(node.args[0].value):
                found.append(Violation(path, node.lineno, f"{name}({node.args[0].value!r})"))
    return found


def _exempt(relative: Path) -> bool:
    parts = relative.parts
    return parts[0] in EXEMPT_DIRS or (parts[0] == "tests" and relative.name.startswith("test_backend_"))


def find_direct_model_loads(root: Path) -> list[Violation]:
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_DIRS & set(relative.parts) or any(p.startswith(".") for p in relative.parts) or _exempt(relative):
            continue
        found += violations_in(path.read_text(encoding="utf-8"), relative)
    return found


def guard(root: Path, config_path: Path) -> None:
    """Fail, naming file and line, unless the config enables legacy direct loading."""
    if load_config(config_path).enable_legacy_models:
        return
    found = find_direct_model_loads(root)
    assert not found, "direct model loading outside model_manager/:\n" + "\n".join(map(str, found))


def test_nothing_outside_the_manager_loads_a_model() -> None:
    guard(REPO, SHIPPED_CONFIG)


def test_the_speech_services_import_no_model_library() -> None:
    files = sorted((REPO / "services").rglob("*.py"))
    assert len(files) >= 6 and any(f.name == "service.py" for f in files)
    for path in files:
        assert not violations_in(path.read_text(encoding="utf-8"), path), path
    planted = "import numpy\nfrom faster_whisper.vad import get_speech_timestamps\n"
    assert [str(v.what) for v in violations_in(planted, Path("services/stt/x.py"))] == [
        "from faster_whisper.vad import ..."
    ]


def _planted_tree(root: Path, legacy: bool) -> Path:
    (root / "agents").mkdir(parents=True)
    (root / "model_manager" / "backends").mkdir(parents=True)
    (root / "agents" / "sneaky.py").write_text(
        "import os\nfrom llama_cpp import Llama\n\nmodel = Llama('x.gguf')\n", encoding="utf-8"
    )
    (root / "agents" / "dynamic.py").write_text(
        "import importlib\nengine = importlib.import_module('faster_whisper.transcribe')\n", encoding="utf-8"
    )
    (root / "services.py").write_text("import onnxruntime as ort, json\n", encoding="utf-8")
    (root / "model_manager" / "backends" / "ok.py").write_text("import llama_cpp\n", encoding="utf-8")
    config = root / "llm_config.yaml"
    config.write_text(f"ENABLE_LEGACY_MODELS: {str(legacy).lower()}\n", encoding="utf-8")
    return config


def test_the_guard_fails_on_a_planted_violation_and_names_file_and_line(tmp_path: Path) -> None:
    config = _planted_tree(tmp_path, legacy=False)
    with pytest.raises(AssertionError) as err:
        guard(tmp_path, config)
    report = str(err.value)
    assert "agents/sneaky.py:2: from llama_cpp import ..." in report
    assert "agents/dynamic.py:2: import_module('faster_whisper.transcribe')" in report
    assert "services.py:1: import onnxruntime" in report
    assert "ok.py" not in report, "the manager itself may load models"


def test_the_legacy_flag_lets_direct_loading_pass(tmp_path: Path) -> None:
    guard(tmp_path, _planted_tree(tmp_path, legacy=True))
