"""The GGUF header facts behind every size estimate, read without decoding the vocabulary."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import pytest

from model_manager.footprint import read_gguf_facts
from tests.conftest import GEMMA, SMOLLM2


def facts_by_the_gguf_package(path: Path) -> dict:
    """The same facts through ``gguf.GGUFReader`` (slow on a large vocabulary, but the reference)."""
    reader = gguf.GGUFReader(path)

    def field(name: str, default=None):
        item = reader.fields.get(name)
        return default if item is None else item.contents()

    arch = field("general.architecture")
    return {
        "architecture": arch,
        "tensor_bytes": sum(int(t.n_bytes) for t in reader.tensors),
        "n_layer": field(f"{arch}.block_count"),
        "n_embd": field(f"{arch}.embedding_length"),
        "n_head": field(f"{arch}.attention.head_count"),
        "n_vocab": len(reader.fields["tokenizer.ggml.tokens"].data),
        "file_type": field("general.file_type"),
    }


def test_the_header_reader_agrees_with_the_gguf_package() -> None:
    facts = dataclasses.asdict(read_gguf_facts(str(SMOLLM2)))
    reference = facts_by_the_gguf_package(SMOLLM2)
    assert {key: facts[key] for key in reference} == reference


def test_a_large_vocabulary_is_counted_not_decoded() -> None:
    facts = read_gguf_facts(str(GEMMA))
    assert (facts.architecture, facts.n_vocab, facts.n_layer) == ("gemma3", 262144, 18)
    assert facts.tensor_bytes == pytest.approx(GEMMA.stat().st_size, rel=0.1)


@pytest.mark.parametrize("keep", [0, 3, 100, 4096])
def test_a_cut_or_foreign_file_is_a_clear_error(tmp_path: Path, keep: int) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(SMOLLM2.read_bytes()[:keep] if keep else b"not a model at all")
    with pytest.raises(ValueError, match="GGUF"):
        read_gguf_facts(str(cut))


def test_a_corrupt_string_length_is_an_error_not_an_allocation(tmp_path: Path) -> None:
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(header + (2**62).to_bytes(8, "little") + b"general.name")
    with pytest.raises(ValueError, match="corrupt"):
        read_gguf_facts(str(corrupt))
