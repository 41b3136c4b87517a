"""The shipped YAML validates and names the real models the set-up command installs."""

from __future__ import annotations

from pathlib import Path

from model_manager.config import load_config
from model_manager.footprint import FootprintStore, quantization_label
from tests.conftest import FACTS_CACHE, SHIPPED_CONFIG


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
