"""One answer of a Realtime session (``gateway.realtime``): the persona's reply streamed as transcript (or text)
deltas and spoken a piece at a time as audio deltas, or the function calls it makes, then ``response.done``.

Cancelled (``response.cancel``, or the person speaking over it), the answer stops where it is; its output item and
the session's history keep what real-time playback from the first audio delta had played by then (the server sends
audio faster than it plays), which a later ``conversation.item.truncate`` may cut further.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from contextlib import aclosing
from typing import Any

import msgspec

from gateway.audio_codecs import OPENAI_PCM_RATE, resample
from gateway.realtime_items import AssistantItem
from model_client.errors import ModelManagerError
from model_client.results import Completion
from personas.config import Persona
from personas.turn import PersonaTurn

DEFAULT_MAX_TOKENS = 256  # the manager's, for a persona that sets none


class ClientGone(Exception):
    """The session's client has gone: nothing more can be said to it."""


def new_id(prefix: str) -> str:
    """A Realtime API id (``resp_...``, ``item_...``, ``event_...``)."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class Answer:
    """A response in flight, as a task of its own so the session keeps reading events (a barge-in, a cancel)."""

    def __init__(self, session: Any, text: str, results: list[dict[str, Any]], item: AssistantItem) -> None:
        """``text``: what the person said (may be empty when only ``results``, function outputs, are handed back)."""
        self.session, self.text, self.results, self.item = session, text, results, item
        self.id = new_id("resp")
        self.reason: str | None = None  # why it was cancelled: turn_detected, client_cancelled, client_gone
        self.cancelled_at = 0.0
        self.output_tokens = 0
        self.started = asyncio.Event()  # a task cancelled before its first step would say nothing at all
        self.task = asyncio.create_task(self._run())

    def cancel(self, reason: str) -> None:
        if self.reason is None and not self.task.done():
            self.reason, self.cancelled_at = reason, time.monotonic()
            self.task.cancel()

    async def _run(self) -> None:
        self.started.set()
        try:
            await self._respond()
        except ClientGone:  # its own send found the client gone: the session's end says so, once
            self.reason = self.reason or "client_gone"

    async def _respond(self) -> None:
        session, item = self.session, self.item
        response_id, item_id = self.id, item.id
        audio = item.audio
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        header = {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": []}
        message = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        part = {"type": "output_audio" if audio else "output_text", "transcript" if audio else "text": ""}
        opened = False

        async def open_message() -> None:
            nonlocal opened
            if not opened:
                opened = True
                await session.send("response.output_item.added", response_id=response_id, output_index=0, item=message)
                await session.send("response.content_part.added", **where, part=part)

        persona = session.personas[session.name]
        if session.instructions:
            persona = msgspec.structs.replace(persona, system_prompt=session.instructions)
        tools = [{"type": "function", "function": _function(t)} for t in session.tools] or None
        turn = PersonaTurn(
            {**session.personas, session.name: persona},
            session.histories,
            session.name,
            session.id,
            self.text,
            session.agents.agents.first_piece_words,
            tools=tools,
            tool_results=self.results,
        )
        status, completion, written = "completed", None, []
        try:
            await session.send("response.created", response=header)
            op, args = turn.request()
            if session.settings.max_output_tokens is not None:
                most = args.get("max_tokens") or DEFAULT_MAX_TOKENS
                args["max_tokens"] = min(most, session.settings.max_output_tokens)
            if tools and op == "chat":
                choice = session.tool_choice
                args["tool_choice"] = (
                    {"type": "function", "function": {"name": choice["name"]}} if isinstance(choice, dict) else choice
                )
            async with aclosing(session.link.generation(op, {**args, "stream": True})) as stream:
                async for chunk in stream:
                    if isinstance(chunk, Completion):
                        completion = chunk
                        continue
                    self.output_tokens += chunk.tokens
                    written.append(chunk.text)
                    await open_message()
                    delta = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
                    await session.send(delta, **where, delta=chunk.text)
                    if audio:
                        for piece in turn.feed(chunk.text):
                            await _speak(session, piece.text, turn.persona, where, item)
            if audio and (rest := turn.flush()) is not None:
                await _speak(session, rest.text, turn.persona, where, item)
        except asyncio.CancelledError:
            status, completion = "cancelled", None
            # What the person heard: real-time playback of the audio sent, up to the cancel; text as shown.
            heard = item.heard(item.played_ms(self.cancelled_at)) if audio else "".join(written).strip()
            turn.interrupted(heard)
            item.in_history = heard or None
            item.text, item.status = heard, "incomplete"
        except ModelManagerError as exc:
            status = "failed"
            await session.send("error", error={"type": "server_error", "code": exc.code, "message": exc.message})

        async def close() -> None:
            output: list[dict[str, Any]] = []
            if completion is not None and status == "completed":
                answer = turn.finish(completion)
                if completion.tool_calls:
                    session.items.drop(item.id)
                    output = await _calls(session, response_id, completion)
                else:
                    item.text, item.status = answer.text, "completed"
                    item.in_history = answer.text
                    await open_message()
                    output = [await _finish_message(session, item, where, part)]
            elif status == "cancelled" and opened:
                output = [await _finish_message(session, item, where, part)]
            done: dict[str, Any] = {"id": response_id, "object": "realtime.response", "status": status}
            if status == "cancelled":
                done["status_details"] = {"type": "cancelled", "reason": _reason(self.reason)}
            elif status == "failed":
                done["status_details"] = {"type": "failed"}
            usage = self._usage(completion)
            await session.send("response.done", response={**done, "output": output, "usage": usage})

        # An answer that has ended is closed whole, events and history, even if a cancel comes meanwhile.
        closing = asyncio.ensure_future(close())
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            await closing

    def _usage(self, completion: Completion | None) -> dict[str, Any]:
        """The manager's counts; for an answer stopped early, the tokens it streamed (its prompt's count comes only
        with a finished generation)."""
        if completion is None:
            tokens = self.output_tokens
            return {
                "total_tokens": tokens,
                "output_tokens": tokens,
                "output_token_details": {"text_tokens": tokens, "audio_tokens": 0},
            }
        usage = completion.usage
        return {
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "input_token_details": {
                "cached_tokens": usage.cached_tokens,
                "text_tokens": usage.prompt_tokens,
                "audio_tokens": 0,
            },
            "output_token_details": {"text_tokens": usage.completion_tokens, "audio_tokens": 0},
        }


def _reason(reason: str | None) -> str:
    return "turn_detected" if reason == "turn_detected" else "client_cancelled"


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}


async def _finish_message(
    session: Any, item: AssistantItem, where: dict[str, Any], part: dict[str, Any]
) -> dict[str, Any]:
    """The closing events of the message, with its transcript as it stands (what was heard, when cut short)."""
    text = item.text
    if item.audio:
        await session.send("response.output_audio.done", **where)
        await session.send("response.output_audio_transcript.done", **where, transcript=text)
    else:
        await session.send("response.output_text.done", **where, text=text)
    part["transcript" if item.audio else "text"] = text
    await session.send("response.content_part.done", **where, part=part)
    message = item.message()
    await session.send("response.output_item.done", response_id=where["response_id"], output_index=0, item=message)
    return message


async def _calls(session: Any, response_id: str, completion: Completion) -> list[dict[str, Any]]:
    """Each function call as an output item with its arguments; the session remembers the names for the outputs."""
    items = []
    for index, call in enumerate(completion.tool_calls):
        session.call_names[call.id] = call.function.name
        item = {
            "id": new_id("item"),
            "type": "function_call",
            "status": "completed",
            "call_id": call.id,
            "name": call.function.name,
            "arguments": call.function.arguments,
        }
        await session.send(
            "response.output_item.added",
            response_id=response_id,
            output_index=index,
            item={**item, "status": "in_progress", "arguments": ""},
        )
        where = {"response_id": response_id, "item_id": item["id"], "output_index": index, "call_id": call.id}
        await session.send("response.function_call_arguments.delta", **where, delta=call.function.arguments)
        await session.send(
            "response.function_call_arguments.done", **where, name=call.function.name, arguments=call.function.arguments
        )
        await session.send("response.output_item.done", response_id=response_id, output_index=index, item=item)
        session.items.add(item)
        items.append(item)
    return items


async def _speak(session: Any, text: str, persona: Persona, where: dict[str, Any], item: AssistantItem) -> None:
    """A piece in Piper's voice as audio deltas; the item notes each delta's duration and when it went out."""
    args = {
        "text": text,
        "voice": session.voice or persona.voice,
        "speed": min(4.0, max(0.25, persona.speed * session.settings.speed)),  # the manager's range
        "format": "pcm",
        "stream": True,
    }
    first = True
    async for reply in session.link.replies("synthesize", args):
        if reply.payloads and reply.payloads[0]:
            rate = int(reply.body.get("sample_rate") or OPENAI_PCM_RATE)
            pcm = await asyncio.to_thread(resample, reply.payloads[0], rate, OPENAI_PCM_RATE)
            item.spoke(text, first, len(pcm) * 1000 / (2 * OPENAI_PCM_RATE))
            first = False
            await session.send("response.output_audio.delta", **where, delta=base64.b64encode(pcm).decode())
