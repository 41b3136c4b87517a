"""Cut a streamed reply into pieces worth speaking, as the tokens arrive, so speech starts before the reply ends.

Pieces end at sentence ends. The first piece may also end at a comma, semicolon or colon once it has
``first_piece_words`` words: the listener hears something a sentence sooner. Markdown marks and other things a
voice should not read out are removed.
"""

from __future__ import annotations

import re

SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s)|\n+")
CLAUSE_END = re.compile(r"[,;:](?=\s)")
UNSPOKEN = re.compile(r"[*_#`~<>|]+")


def speakable(text: str) -> str:
    return " ".join(UNSPOKEN.sub(" ", text).split())


class SpeechPieces:
    def __init__(self, first_piece_words: int = 4) -> None:
        self.first_piece_words = first_piece_words
        self.buffer = ""
        self.count = 0

    def feed(self, text: str) -> list[str]:
        """Add streamed text; return the pieces it completed."""
        self.buffer += text
        pieces = []
        while True:
            cut = self._cut()
            if cut is None:
                return pieces
            piece, self.buffer = self.buffer[:cut], self.buffer[cut:]
            piece = speakable(piece)
            if any(ch.isalnum() for ch in piece):
                pieces.append(piece)
                self.count += 1

    def flush(self) -> str | None:
        """What is left when the stream ends."""
        piece, self.buffer = speakable(self.buffer), ""
        if any(ch.isalnum() for ch in piece):
            self.count += 1
            return piece
        return None

    def _cut(self) -> int | None:
        end = SENTENCE_END.search(self.buffer)
        if self.count == 0:
            for clause in CLAUSE_END.finditer(self.buffer):
                if end is not None and clause.start() > end.start():
                    break
                if len(self.buffer[: clause.start()].split()) >= self.first_piece_words:
                    return clause.end()
        return end.end() if end is not None else None
