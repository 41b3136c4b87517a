"""Flash attention: on for batched models (a CPU too, as llama-server's auto), off in exact mode, off when the
model's ``flash_attn`` says so; the YAML takes only auto, on and off."""

from __future__ import annotations

import llama_cpp
import msgspec
import pytest
import yaml

from model_manager.backends.llm.backend import flash_attention
from model_manager.config import ModelSpec

ON, OFF = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


@pytest.mark.parametrize(
    ("exact", "setting", "expected"),
    [
        (False, "auto", ON),
        (False, "on", ON),
        (False, "off", OFF),
        (False, True, ON),  # YAML's bare on
        (False, False, OFF),  # and off
        (True, "auto", OFF),
        (True, "on", OFF),
    ],
)
def test_the_flash_attention_rule(exact: bool, setting: str | bool, expected: int) -> None:
    assert flash_attention(exact, setting) == expected


def test_the_catalogue_refuses_another_flash_attn_value() -> None:
    assert msgspec.convert({"kind": "llm", "flash_attn": "off"}, ModelSpec).flash_attn == "off"
    written = yaml.safe_load("kind: llm\nflash_attn: off\n")  # YAML 1.1: a bare off is false
    assert flash_attention(False, msgspec.convert(written, ModelSpec).flash_attn) == OFF
    with pytest.raises(msgspec.ValidationError, match="flash_attn"):
        msgspec.convert({"kind": "llm", "flash_attn": "yes"}, ModelSpec)
