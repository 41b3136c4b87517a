"""Guardrails: nothing outside model_manager/ loads a model; the shipped YAML and the protocol doc stay true.

Direct model loading means importing, or importing by name at run time, one of the model engines. It is allowed
only in ``model_manager/`` (which owns the models), in ``bench/`` (whose baselines call the engines in-process on
purpose) and in tests named ``test_backend_*.py`` (which exercise backends), or everywhere when the config says
``ENABLE_LEGACY_MODELS: true``.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import msgpack
import msgspec
import pytest

from agents.config import AGENT_OPS, TOPIC_REPLY
from model_client import protocol
from model_manager.backends.gguf import quantization_label
from model_manager.config import load_config
from model_manager.footprint import FootprintStore
from services.config import STT_OPS, TOPIC_AUDIO, TOPIC_SAY, TOPIC_TRANSCRIPT, TTS_OPS, SayArgs
from tests.conftest import FACTS_CACHE

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


def test_the_shipped_config_validates_and_names_real_models() -> None:
    config = load_config(SHIPPED_CONFIG)
    assert config.enable_legacy_models is False
    assert {"smollm2", "gemma3-270m", "whisper-tiny.en", "joe"} <= set(config.models)
    for name, spec in config.models.items():
        path = Path(spec.path)
        if spec.kind == "stt":
            assert (path / "model.bin").is_file(), f"{name}: {path} is not a faster-whisper model directory"
            continue
        assert path.is_file(), f"{name}: {path} is missing (the set-up command installs it)"
        if spec.kind == "tts":
            assert Path(f"{spec.path}.json").is_file(), f"{name}: the voice's .onnx.json is missing"
            continue
        label = quantization_label(FootprintStore(FACTS_CACHE).read_now(str(path)).file_type)
        assert spec.quantization == label, f"{name}: the YAML says {spec.quantization}, the GGUF says {label}"


DOC_EXAMPLE = re.compile(r"```json (request|reply|event)\n(.*?)\n```", re.DOTALL)


def test_every_protocol_doc_example_decodes_with_the_protocol_module() -> None:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    # The error cases are sent to a live manager by test_protocol_errors.py; every other example must be valid.
    text = text[: text.index("## Errors by example")] + text[text.index("## Ops") :]
    examples = DOC_EXAMPLE.findall(text)
    kinds = {kind for kind, _ in examples}
    assert kinds == {"request", "reply", "event"} and len(examples) >= 8
    for kind, text in examples:
        envelope = msgpack.packb(json.loads(text))
        if kind == "request":
            op = json.loads(text)["op"]
            prefixes = {"stt.": STT_OPS, "tts.": TTS_OPS, "agent.": AGENT_OPS}
            ops = next((table for prefix, table in prefixes.items() if op.startswith(prefix)), protocol.OP_ARGS)
            request = protocol.decode_request([envelope], ops)
            protocol.parse_args(request.op, request.args, ops)
        elif kind == "reply":
            reply = protocol.decode_reply([envelope])
            assert reply.id and reply.body is not None
        else:
            topic, body = protocol.decode_event([json.loads(text)["event"].encode(), envelope])
            assert topic in (
                protocol.EVENT_MODEL_LOADED,
                protocol.EVENT_MODEL_UNLOADED,
                protocol.EVENT_MODEL_FAILED,
                protocol.EVENT_HEARTBEAT,
                TOPIC_TRANSCRIPT,
                TOPIC_SAY,
                TOPIC_AUDIO,
                TOPIC_REPLY,
            )
            if topic == TOPIC_SAY:
                msgspec.convert({k: v for k, v in body.items() if k not in ("v", "event", "time")}, SayArgs)


def test_every_error_code_is_documented() -> None:
    from model_client.errors import ERROR_CODES

    doc = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert all(f"| `{code}` |" in doc for code in ERROR_CODES)
    assert all(f"### `{op}`" in doc or f"`{op}` /" in doc or f"/ `{op}`" in doc for op in protocol.OPS)
