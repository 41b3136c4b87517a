"""Embeddings from a GGUF model: pooled over each input's tokens (the pooling the GGUF declares, else the mean),
L2-normalized, many inputs in one ``llama_decode``. They run in a context of their own beside the generating one,
sharing the model's weights, made on the first ``embed`` (about 100 MiB of buffers for a small model)."""

from __future__ import annotations

from typing import Any

import llama_cpp
import numpy as np

from model_client.errors import BadRequest
from model_manager.backends.llama_cpp_api import LlamaContext, LlamaModel, suppress_stdout_stderr

CONTEXT_TOKENS = 512  # the longest input, and the most tokens one decode takes
SEQUENCES = 16  # inputs one decode takes


class Embedder:
    def __init__(self, model: LlamaModel, threads: int | None) -> None:
        self.model = model
        self.threads = threads or 1
        self.ctx: LlamaContext | None = None
        self.batch: Any = None
        self.dimensions = llama_cpp.llama_model_n_embd(model.model)

    def _context(self) -> LlamaContext:
        if self.ctx is None:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = params.n_batch = params.n_ubatch = CONTEXT_TOKENS
            params.n_seq_max, params.kv_unified, params.embeddings = SEQUENCES, True, True
            params.pooling_type = self._pooling()
            params.n_threads = params.n_threads_batch = self.threads
            with suppress_stdout_stderr(disable=False):
                self.ctx = LlamaContext(model=self.model, params=params, verbose=False)
            self.batch = llama_cpp.llama_batch_init(CONTEXT_TOKENS, 0, 1)
        return self.ctx

    def _pooling(self) -> int:
        metadata = self.model.metadata()
        declared = metadata.get(f"{metadata.get('general.architecture', '')}.pooling_type")
        pooling = int(declared) if declared is not None else llama_cpp.LLAMA_POOLING_TYPE_NONE
        if pooling in (llama_cpp.LLAMA_POOLING_TYPE_NONE, llama_cpp.LLAMA_POOLING_TYPE_RANK):
            return llama_cpp.LLAMA_POOLING_TYPE_MEAN  # a generative model: the mean of its last hidden states
        return pooling

    def set_threads(self, n: int) -> None:
        self.threads = n
        if self.ctx is not None:
            llama_cpp.llama_set_n_threads(self.ctx.ctx, n, n)

    def embed(self, texts: list[str], normalize: bool = True) -> dict[str, Any]:
        tokenized = [self.model.tokenize(text.encode(), add_bos=True, special=False) for text in texts]
        for i, tokens in enumerate(tokenized):
            if len(tokens) > CONTEXT_TOKENS:
                raise BadRequest(f"input {i} is {len(tokens)} tokens, over {CONTEXT_TOKENS}", field="input")
            if not tokens:
                raise BadRequest(f"input {i} is empty", field="input")
        vectors: list[list[float]] = []
        start = 0
        while start < len(tokenized):
            group, used = [], 0
            for tokens in tokenized[start:]:
                if len(group) == SEQUENCES or used + len(tokens) > CONTEXT_TOKENS:
                    break
                group.append(tokens)
                used += len(tokens)
            vectors += self._decode(group, normalize)
            start += len(group)
        return {
            "embeddings": vectors,
            "dimensions": self.dimensions,
            "usage": {"prompt_tokens": sum(len(t) for t in tokenized)},
        }

    def _decode(self, group: list[list[int]], normalize: bool) -> list[list[float]]:
        ctx = self._context()
        batch, n = self.batch, 0
        for seq, tokens in enumerate(group):
            for position, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, position, 1
                batch.seq_id[n][0], batch.logits[n] = seq, True
                n += 1
        batch.n_tokens = n
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ctx), True)
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise BadRequest("llama.cpp could not evaluate the inputs", field="input")
        out = []
        for seq in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
            vector = np.ctypeslib.as_array(pointer, shape=(self.dimensions,)).astype(np.float64)
            if normalize:
                vector /= max(float(np.linalg.norm(vector)), 1e-12)
            out.append(vector.tolist())
        return out

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
