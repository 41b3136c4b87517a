"""A llama-architecture GGUF of a chosen size with random weights, written with the ``gguf`` package.

For the GPU checks on a machine with no network (no model hub, at most 64 MiB a transfer): how much memory a model
takes, how fast it decodes and how it is evicted do not depend on the weights' values, only on its shape and
quantization. The vocabulary is Llama's SentencePiece kind (control tokens, the 256 byte tokens, filler pieces), so
llama.cpp loads it, tokenizes any text and decodes.

    python scripts/gpu/synthetic_gguf.py out.gguf --size-mib 1500 --type Q8_0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize

TYPES = {"F16": GGMLQuantizationType.F16, "Q8_0": GGMLQuantizationType.Q8_0, "F32": GGMLQuantizationType.F32}
BYTES_PER_WEIGHT = {"F16": 2.0, "Q8_0": 34 / 32, "F32": 4.0}


def shape_for(size_mib: float, kind: str, n_vocab: int) -> dict[str, int]:
    """A TinyLlama-like shape (GQA 4:1, SwiGLU) with as many layers as the size asks; small sizes get a narrow one."""
    n_embd = 2048 if size_mib >= 400 else 256
    n_ff, n_head, n_head_kv = int(n_embd * 2.75) // 32 * 32, n_embd // 64, max(1, n_embd // 256)
    per_layer = 2 * n_embd * n_embd + 2 * n_embd * (n_embd // n_head * n_head_kv) + 3 * n_embd * n_ff
    fixed = 2 * n_vocab * n_embd
    weights = size_mib * 2**20 / BYTES_PER_WEIGHT[kind]
    n_layer = max(1, round((weights - fixed) / per_layer))
    return {"n_embd": n_embd, "n_ff": n_ff, "n_head": n_head, "n_head_kv": n_head_kv, "n_layer": n_layer}


def write_synthetic_gguf(path: Path, size_mib: float, kind: str = "Q8_0", n_vocab: int = 32000, seed: int = 0) -> dict:
    shape = shape_for(size_mib, kind, n_vocab)
    n_embd, n_ff, n_head, n_head_kv = shape["n_embd"], shape["n_ff"], shape["n_head"], shape["n_head_kv"]
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"synthetic llama {size_mib:.0f} MiB {kind}")
    writer.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[kind])
    writer.add_context_length(4096)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(shape["n_layer"])
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    filler = n_vocab - len(tokens)
    tokens += [f"\u2581w{i}".encode() for i in range(filler)]
    types += [TokenType.NORMAL] * filler
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(filler)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def weights(name: str, rows: int, cols: int) -> None:
        data = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        if kind == "Q8_0":
            writer.add_tensor(name, quantize(data, TYPES[kind]), raw_dtype=TYPES[kind])
        else:
            writer.add_tensor(name, data.astype(np.float16 if kind == "F16" else np.float32))

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(n_embd, dtype=np.float32))

    kv = n_embd // n_head * n_head_kv
    weights("token_embd.weight", n_vocab, n_embd)
    norm("output_norm.weight")
    weights("output.weight", n_vocab, n_embd)
    for layer in range(shape["n_layer"]):
        block = f"blk.{layer}"
        norm(f"{block}.attn_norm.weight")
        weights(f"{block}.attn_q.weight", n_embd, n_embd)
        weights(f"{block}.attn_k.weight", kv, n_embd)
        weights(f"{block}.attn_v.weight", kv, n_embd)
        weights(f"{block}.attn_output.weight", n_embd, n_embd)
        norm(f"{block}.ffn_norm.weight")
        weights(f"{block}.ffn_gate.weight", n_ff, n_embd)
        weights(f"{block}.ffn_up.weight", n_ff, n_embd)
        weights(f"{block}.ffn_down.weight", n_embd, n_ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {**shape, "n_vocab": n_vocab, "type": kind, "bytes": path.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--size-mib", type=float, default=1500)
    parser.add_argument("--type", choices=sorted(TYPES), default="Q8_0")
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    facts = write_synthetic_gguf(args.path, args.size_mib, args.type, args.vocab)
    print(facts, file=sys.stderr)


if __name__ == "__main__":
    main()
