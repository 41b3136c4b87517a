"""One persona turn without a transport: what to ask the manager, which text is ready to speak, who answers when a
model cannot be served, and what the session keeps. Every door drives it the same way (the persona agents over
ZeroMQ, the Wyoming handle ports over asyncio, the gateway's voice sessions):

    turn = PersonaTurn(personas, histories, "jarvis", session_id, text, first_piece_words)
    while True:
        op, args = turn.request()
        try:
            for each streamed chunk of the generation: speak the pieces turn.feed(chunk.text) returns
            break
        except an error: if not turn.fall_back(error): raise
    speak turn.flush(); answer = turn.finish(completion)   # the history is saved

A persona whose model cannot be served (not found, not loadable, out of memory, failed) hands the turn to its
``fallback`` persona, once, as long as nothing was said yet; the answer says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from model_client.errors import ModelManagerError
from model_client.results import Completion
from personas.answer import UNSERVABLE, generation_request
from personas.config import Persona
from personas.history import Histories
from personas.pieces import SpeechPieces


@dataclass(frozen=True)
class Piece:
    """A speakable piece of the reply, numbered from 0 in the order it is to be spoken."""

    number: int
    text: str


@dataclass
class Answer:
    answered_by: str
    text: str
    completion: Completion
    parts: int  # speakable pieces
    fallback: dict[str, Any] | None  # {from, to, code, message} when another persona answered


class PersonaTurn:
    def __init__(
        self,
        personas: dict[str, Persona],
        histories: Histories,
        name: str,
        session_id: str,
        text: str,
        first_piece_words: int,
        tools: list[dict[str, Any]] | None = None,
        tool_results: list[dict[str, Any]] | None = None,
    ) -> None:
        """``tools``: functions the model may call (chat-style personas); ``tool_results``: the ``tool`` messages
        answering its last calls, which this turn adds after ``text`` (empty when the turn only hands results
        back)."""
        self.tools, self.tool_results = tools, tool_results or []
        self.personas, self.histories = personas, histories
        self.name = self.answering = name
        self.session_id, self.text = session_id, text
        self.first_piece_words = first_piece_words
        self.history = histories.get(session_id)
        self.pieces = SpeechPieces(first_piece_words)
        self.written = ""  # the streamed text since the last complete piece, as the model wrote it
        self.fallback: dict[str, Any] | None = None

    @property
    def persona(self) -> Persona:
        """The persona answering now (the fallback, after ``fall_back``)."""
        return self.personas[self.answering]

    def request(self) -> tuple[str, dict[str, Any]]:
        """The manager op and its arguments; the conversation id is the answering persona's and the session's, so
        the manager keeps that conversation's KV cache."""
        self.pieces, self.written = SpeechPieces(self.first_piece_words), ""
        op, args = generation_request(self.persona, self.history, self.text, f"{self.answering}:{self.session_id}")
        if op == "chat" and (self.tools or self.tool_results):
            asked = [{"role": "user", "content": self.text}] if self.text else []
            args["messages"] = [*args["messages"][:-1], *asked, *self.tool_results]
            if self.tools:
                args["tools"] = self.tools
        return op, args

    def feed(self, text: str) -> list[Piece]:
        """A streamed piece of the reply in; the speakable pieces it completed out (one chunk of text can complete
        several: a chunk carries every token since the last one)."""
        self.written += text
        spoken = self.pieces.feed(text)
        first = self.pieces.count - len(spoken)
        return [Piece(first + i, piece) for i, piece in enumerate(spoken)]

    def take_written(self) -> str:
        """The text as written since the last call (for doors that pass the model's own text on, piece by piece)."""
        written, self.written = self.written, ""
        return written

    def flush(self) -> Piece | None:
        """The last speakable piece, when the stream has ended."""
        rest = self.pieces.flush()
        return Piece(self.pieces.count - 1, rest) if rest is not None else None

    def fall_back(self, error: ModelManagerError) -> bool:
        """True when the fallback persona now answers instead (ask again with ``request``); False: the error stands
        (not an unservable model, already fallen back, something was said, or no fallback)."""
        fallback = self.persona.fallback
        if not isinstance(error, UNSERVABLE) or self.fallback is not None or self.pieces.count or not fallback:
            return False
        self.fallback = {"from": self.answering, "to": fallback, "code": error.code, "message": error.message}
        self.answering = fallback
        return True

    def _asked(self) -> list[dict[str, Any]]:
        return [*([{"role": "user", "content": self.text}] if self.text else []), *self.tool_results]

    def interrupted(self, spoken: str) -> None:
        """The person spoke over the answer: the history keeps only what was said of it (nothing: no turn)."""
        if spoken.strip():
            self.histories.save(
                self.session_id, [*self.history, *self._asked(), {"role": "assistant", "content": spoken.strip()}]
            )

    def finish(self, completion: Completion) -> Answer:
        """The answer; the session's history keeps the question and it."""
        text = completion.text.strip()
        reply: dict[str, Any] = {"role": "assistant", "content": text}
        if completion.tool_calls:
            reply["tool_calls"] = [msgspec.to_builtins(call) for call in completion.tool_calls]
        self.histories.save(self.session_id, [*self.history, *self._asked(), reply])
        return Answer(self.answering, text, completion, self.pieces.count, self.fallback)
