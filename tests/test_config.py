"""The YAML loader: defaults, path resolution, and errors that name the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_manager.config import ConfigError, load_config, parse_config

MINIMAL = """
models:
  tiny:
    kind: llm
    path: models/tiny.gguf
    quantization: Q4_0
"""


def test_defaults_fill_every_model_field(tmp_path: Path) -> None:
    config = parse_config(MINIMAL, tmp_path)
    spec = config.models["tiny"]
    assert spec.n_ctx == config.defaults.n_ctx == 2048
    assert spec.idle_ttl_s == 300 and spec.priority == 50 and spec.max_queue == 64
    assert spec.path == str(tmp_path / "models" / "tiny.gguf")
    assert config.enable_legacy_models is False


def test_relative_ipc_endpoints_resolve_against_the_config_dir(tmp_path: Path) -> None:
    config = parse_config("endpoints:\n  requests: ipc://run/a.sock\n  events: tcp://127.0.0.1:5556\n", tmp_path)
    assert config.endpoints.requests == f"ipc://{tmp_path}/run/a.sock"
    assert config.endpoints.events == "tcp://127.0.0.1:5556"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("modles: {}\n", ["modles"]),
        (MINIMAL + "    n_ctxx: 10\n", ["n_ctxx", "$.models.tiny"]),
        (MINIMAL + "    n_ctx: lots\n", ["n_ctx", "int"]),
        (MINIMAL + "    n_ctx: 0\n", ["n_ctx", ">= 1"]),
        (MINIMAL.replace("kind: llm", "kind: telepathy"), ["kind"]),
        (MINIMAL.replace("    quantization: Q4_0\n", ""), ["quantization"]),
        ("limits:\n  max_tokens: -1\n", ["max_tokens"]),
        ("ENABLE_LEGACY_MODELS: maybe\n", ["ENABLE_LEGACY_MODELS"]),
        ("models:\n  'bad name!':\n    kind: llm\n    path: x\n    quantization: q\n", ["bad name!"]),
        ("- just\n- a list\n", ["mapping"]),
        ("key: [unclosed\n", ["YAML"]),
        ("devices:\n  gpus: [{index: 0, max_mib: 4096}, {index: 0}]\n", ["devices.gpus", "more than once"]),
        ("devices:\n  gpus: [{max_mib: 4096}]\n", ["index", "$.devices.gpus[0]"]),
        ("models:\n  m:\n    kind: llm\n", ["path", "$.models.m"]),
        (
            "models:\n  m:\n    kind: llm\n    variants: [{quantization: Q8_0, path: a}]\n    variant: Q4_0\n",
            ["Q4_0", "$.models.m.variant"],
        ),
        ("models:\n  v:\n    kind: tts\n    variants: [{quantization: Q8_0, path: a}]\n", ["only an llm"]),
    ],
    ids=[
        "unknown-top-key",
        "unknown-model-key",
        "wrong-type",
        "out-of-range",
        "bad-kind",
        "missing-required",
        "negative-limit",
        "flag-not-bool",
        "bad-model-name",
        "not-a-mapping",
        "not-yaml",
        "gpu-budget-twice",
        "gpu-budget-without-index",
        "no-path",
        "unknown-variant",
        "variants-on-a-voice",
    ],
)
def test_invalid_configs_name_the_key_and_the_problem(tmp_path: Path, text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, tmp_path, source="test.yaml")
    message = str(err.value)
    assert message.startswith("test.yaml: ")
    for name in names:
        assert name in message, message


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_the_daemon_refuses_an_invalid_config_with_the_key_named(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL + "    n_gpu_layerz: 3\n")
    run = subprocess.run(
        [sys.executable, "-m", "model_manager", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert "n_gpu_layerz" in run.stderr
