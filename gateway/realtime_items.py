"""What a Realtime session keeps of its conversation's items, so that the history holds what the person heard of an
answer, not what was sent: the server speaks faster than real time, so when the person speaks over an answer most of
its audio has reached the client unplayed.

An assistant item remembers each spoken piece's text and audio duration, and when each audio delta went out. Then
``conversation.item.truncate`` (the client saying how much it played, ``audio_end_ms``) and a barge-in without one
(real-time playback from the first delta up to the barge-in) both map a duration onto the pieces: whole pieces before
it, and the piece it falls in cut in proportion, at a word boundary.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from personas.history import Histories

MAX_ITEMS = 256  # items a session can still name; older ones have long left the history (max_history_messages)
SLACK_MS = 1.0  # a client's whole-millisecond audio_end_ms for the end of a piece still covers all of it


def cut_at_word(text: str, fraction: float) -> str:
    """The words of ``text`` that fit wholly in its first ``fraction`` by characters (a word cut in half was not
    heard)."""
    if fraction >= 1.0:
        return text.strip()
    end = max(0, int(len(text) * fraction))
    kept = text[:end]
    if end < len(text) and not text[end].isspace():
        kept = kept.rsplit(None, 1)[0] if len(kept.split()) > 1 else ""
    return kept.strip()


@dataclass
class SpokenPiece:
    text: str
    ms: float = 0.0  # its audio sent so far


@dataclass
class AssistantItem:
    """An assistant message of the session: its transcript, and how its audio went out."""

    id: str
    turn: int  # the session's turn number when it was answered
    asked: list[dict[str, Any]]  # the turn's question messages, to put the turn back if a cut restores its reply
    audio: bool = True
    text: str = ""  # the transcript: what was written (sent as deltas), then what was heard once cut
    status: str = "in_progress"
    pieces: list[SpokenPiece] = field(default_factory=list)
    deltas: list[tuple[float, float]] = field(default_factory=list)  # (monotonic s sent, ms of audio)
    in_history: str | None = None  # this reply's content in the session's history (None: not there)
    cut_ms: float | None = None  # audio_end_ms of the last truncate: the item's audio ends there

    def spoke(self, piece_text: str, new_piece: bool, ms: float) -> None:
        """An audio delta of ``ms`` went out for a piece (``new_piece``: its first)."""
        if new_piece or not self.pieces:
            self.pieces.append(SpokenPiece(piece_text))
        self.pieces[-1].ms += ms
        self.deltas.append((time.monotonic(), ms))

    @property
    def audio_ms(self) -> float:
        return self.cut_ms if self.cut_ms is not None else sum(p.ms for p in self.pieces)

    def played_ms(self, at: float) -> float:
        """How much real-time playback from the first delta had played by ``at`` (monotonic s): each delta plays
        once it has arrived and the one before it has finished."""
        played, free_at = 0.0, None
        for sent_at, ms in self.deltas:
            start = sent_at if free_at is None else max(free_at, sent_at)
            if start >= at:
                break
            played += min(ms, (at - start) * 1000)
            free_at = start + ms / 1000
        return played

    def heard(self, ms: float) -> str:
        """The transcript of the first ``ms`` of the audio."""
        said, left = [], ms
        for piece in self.pieces:
            if left >= piece.ms - SLACK_MS:
                said.append(piece.text)
                left -= piece.ms
                continue
            if piece.ms > 0:
                said.append(cut_at_word(piece.text, left / piece.ms))
            break
        return " ".join(s for s in said if s).strip()

    def message(self) -> dict[str, Any]:
        kind, key = ("output_audio", "transcript") if self.audio else ("output_text", "text")
        content = [{"type": kind, key: self.text}]
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": self.status,
            "content": content,
        }


class Items:
    """The session's items by id (the most recent ``MAX_ITEMS``): assistant messages as ``AssistantItem``, the rest
    as the item maps the client was sent."""

    def __init__(self) -> None:
        self.items: OrderedDict[str, AssistantItem | dict[str, Any]] = OrderedDict()

    def add(self, item: AssistantItem | dict[str, Any]) -> None:
        key = item.id if isinstance(item, AssistantItem) else item["id"]
        self.items[key] = item
        self.items.move_to_end(key)
        while len(self.items) > MAX_ITEMS:
            self.items.popitem(last=False)

    def drop(self, item_id: str) -> None:
        self.items.pop(item_id, None)

    def get(self, item_id: str) -> AssistantItem | dict[str, Any] | None:
        return self.items.get(item_id)

    def as_sent(self, item_id: str) -> dict[str, Any] | None:
        item = self.items.get(item_id)
        return item.message() if isinstance(item, AssistantItem) else item


def rewrite_reply(histories: Histories, session_id: str, item: AssistantItem, text: str, latest: bool) -> None:
    """The item's reply in the session's history becomes ``text`` (gone when empty). A reply the history does not
    hold (nothing of it was heard, so the turn was not kept) is added with its question when it is the latest turn."""
    messages = histories.get(session_id)
    if item.in_history is not None:
        for index in range(len(messages) - 1, -1, -1):
            message = messages[index]
            if message.get("role") == "assistant" and message.get("content") == item.in_history:
                if text:
                    messages[index] = {**message, "content": text}
                else:
                    del messages[index]
                histories.save(session_id, messages)
                item.in_history = text or None
                return
        return  # older than the history keeps
    if text and latest:
        histories.save(session_id, [*messages, *item.asked, {"role": "assistant", "content": text}])
        item.in_history = text
