"""A persona's port: Home Assistant's conversation agent. ``transcript{text, context}`` -> the persona's answer,
streamed (``handled-start``, a ``handled-chunk`` per speakable piece as the model writes, ``handled-stop``) and
then whole in ``handled{text, context}`` for peers that do not stream. Home Assistant's
``context.conversation_id`` keys the history and the manager's ``conversation_id``, so turn 2 costs only its new
tokens.

Routing as the agents do it, from this port's persona: a wake word or another persona's name at the start hands
the turn to that persona; a persona whose model cannot be served hands it to its ``fallback``."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import structlog
from wyoming.asr import Transcript
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled

from model_client.aio import ManagerLink
from model_client.errors import ModelManagerError
from model_client.results import Completion, TextChunk
from personas.config import AgentsConfig, route
from personas.history import Histories
from personas.turn import PersonaTurn
from services.wyoming.connection import Peer

log = structlog.get_logger("wyoming")


def persona_histories(agents: AgentsConfig) -> dict[str, Histories]:
    """Each persona's sessions, one store for every port (a wake word hands a turn to another persona's history)."""
    directory = Path(agents.agents.history_dir) if agents.agents.history_dir else None
    keep = agents.agents.max_history_messages
    return {name: Histories(directory / name if directory else None, keep, name) for name in agents.personas}


class PersonaDoor:
    """What every connection to one persona's port shares."""

    def __init__(self, persona: str, agents: AgentsConfig, histories: dict[str, Histories]) -> None:
        self.persona = persona
        self.agents = agents
        self.histories = histories


class HandleHandler:
    def __init__(self, peer: Peer, link: ManagerLink, door: PersonaDoor) -> None:
        self.peer, self.link, self.door = peer, link, door

    async def on_event(self, event: Event) -> bool:
        if not Transcript.is_type(event.type):
            return True
        transcript = Transcript.from_event(event)
        context = dict(transcript.context or {})
        conversation = str(context.get("conversation_id") or uuid.uuid4().hex)[:128]
        context["conversation_id"] = conversation
        text = transcript.text.strip()
        if not text:
            await self.peer.send(NotHandled(text="Nothing was said.", context=context).event())
            return True
        try:
            await self._turn(text, conversation, context)
        except ModelManagerError as exc:
            await self.peer.failed(exc)
            return False
        return True

    async def _turn(self, text: str, conversation: str, context: dict[str, Any]) -> None:
        started = time.monotonic()
        agents = self.door.agents
        chosen = route(text, agents.personas, agents.routing)
        name = chosen.persona if chosen.reason == "wake_word" else self.door.persona
        session_id = f"wyoming-{conversation}"  # its history file's name is made safe by Histories
        words = agents.agents.first_piece_words
        turn = PersonaTurn(agents.personas, self.door.histories[name], name, session_id, text, words)
        while True:
            try:
                completion = await self._answer(turn, context)
                break
            except ModelManagerError as exc:
                if not turn.fall_back(exc):
                    raise
                log.warning("persona_fallback", persona=name, to=turn.answering, code=exc.code, message=exc.message)
        answer = turn.finish(completion)
        await self.peer.send(Handled(text=answer.text, context=context).event())
        log.info(
            "turn",
            port_persona=self.door.persona,
            persona=name,
            answered_by=answer.answered_by,
            conversation_id=conversation,
            route=chosen.reason,
            prompt_tokens=completion.usage.prompt_tokens,
            cached_tokens=completion.usage.cached_tokens,
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _answer(self, turn: PersonaTurn, context: dict[str, Any]) -> Completion:
        """The answering persona's reply, streamed to the peer a speakable piece at a time. A chunk per piece, not
        per token: a text-to-speech stream downstream can start on each chunk at once, and on two cores the hops a
        token would cost (this service, the peer, its TTS) are taken from the decoding."""
        op, args = turn.request()
        parts: list[str] = []
        completion: Completion | None = None
        async for item in self.link.generation(op, {**args, "stream": True}):
            if isinstance(item, TextChunk):
                if turn.feed(item.text):  # a piece is complete: its text (as written) goes out
                    await self._chunk(parts, turn.take_written(), context)
            else:
                completion = item
        turn.flush()
        if (rest := turn.take_written()).strip():
            await self._chunk(parts, rest, context)
        if parts:
            await self.peer.send(HandledStop().event())
        assert completion is not None
        return completion

    async def _chunk(self, parts: list[str], text: str, context: dict[str, Any]) -> None:
        if not parts:
            await self.peer.send(HandledStart(context=context).event())
        parts.append(text)
        await self.peer.send(HandledChunk(text=text).event())

    async def close(self) -> None:
        return None
