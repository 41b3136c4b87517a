"""A reply's text as tokens come: each token's bytes, whole UTF-8 characters out of them, stop strings held back.

A multi-byte character can be split across tokens, and a stop string across pieces: neither may reach a stream
half-made. ``StopText`` checks only the text that is new since the last token (plus the tail a stop string could
start in), so a long reply costs the same per token as a short one.
"""

from __future__ import annotations

import ctypes

import llama_cpp

PIECE_BUFFER = 256  # bytes: longer pieces (rare) get a buffer of their own


class Detokenizer:
    """A token's bytes, through one reused buffer (``LlamaModel.token_to_piece`` returns its whole buffer, NUL padding
    included, and allocates one a call)."""

    def __init__(self, vocab: object) -> None:
        self.vocab = vocab
        self.buffer = ctypes.create_string_buffer(PIECE_BUFFER)

    def piece(self, token: int) -> bytes:
        size = llama_cpp.llama_token_to_piece(self.vocab, token, self.buffer, PIECE_BUFFER, 0, False)
        if size < 0:  # a longer piece than the buffer: llama.cpp says how long
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -size, 0, False)
            return buffer.raw[:size]
        return self.buffer.raw[:size]


def decode_complete_utf8(buffer: bytearray) -> str:
    """Take the longest valid UTF-8 prefix out of ``buffer``; a multi-byte character split across tokens waits."""
    if buffer.isascii():  # nearly every token: no character can be split
        text = buffer.decode("ascii")
        buffer.clear()
        return text
    for cut in range(len(buffer), max(len(buffer) - 4, -1), -1):
        try:
            text = buffer[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        del buffer[:cut]
        return text
    text = buffer.decode("utf-8", errors="replace")
    buffer.clear()
    return text


class StopText:
    """Accumulates generated text and releases only what cannot be the start of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.parts: list[str] = []  # released so far
        self.pending = ""  # held back: it may be the start of a stop string

    @property
    def released(self) -> str:
        return "".join(self.parts)

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that can go out now, and whether a stop string ended the reply (the stop itself never goes)."""
        if not self.stops:
            self.parts.append(piece)
            return piece, False
        self.pending += piece
        for stop in self.stops:
            at = self.pending.find(stop)  # pending is at most hold + len(piece) long
            if at >= 0:
                out = self.pending[:at]
                self.parts.append(out)
                self.pending = ""
                return out, True
        keep = self._held_suffix()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        self.parts.append(out)
        return out, False

    def _held_suffix(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of some stop string."""
        for size in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.parts.append(out)
        return out
