"""One answer of a Realtime session (``gateway.realtime``): the persona's reply streamed as transcript (or text)
deltas and spoken a piece at a time as audio deltas, or the function calls it makes, then ``response.done``.

Cancelled (``response.cancel``, or the person speaking over it), the answer stops where it is and the session's
history keeps what was spoken of it.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import msgspec

from gateway.audio_codecs import OPENAI_PCM_RATE, resample
from model_client.errors import ModelManagerError
from model_client.results import Completion
from personas.config import Persona
from personas.turn import PersonaTurn


def new_id(prefix: str) -> str:
    """A Realtime API id (``resp_...``, ``item_...``, ``event_...``)."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


async def respond(session: Any, text: str, results: list[dict[str, Any]]) -> None:
    """``text``: what the person said (may be empty when only ``results``, function outputs, are handed back)."""
    response_id, item_id = new_id("resp"), new_id("item")
    audio = session.modalities == ["audio"]
    where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
    header = {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": []}
    await session.send("response.created", response=header)
    item = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_audio" if audio else "output_text", "transcript" if audio else "text": ""}
    opened = False

    async def open_message() -> None:
        nonlocal opened
        if not opened:
            opened = True
            await session.send("response.output_item.added", response_id=response_id, output_index=0, item=item)
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
        text,
        session.agents.agents.first_piece_words,
        tools=tools,
        tool_results=results,
    )
    status, completion, said = "completed", None, []
    try:
        op, args = turn.request()
        if tools and op == "chat":
            choice = session.tool_choice
            args["tool_choice"] = (
                {"type": "function", "function": {"name": choice["name"]}} if isinstance(choice, dict) else choice
            )
        async for chunk in session.link.generation(op, {**args, "stream": True}):
            if isinstance(chunk, Completion):
                completion = chunk
                continue
            await open_message()
            delta = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
            await session.send(delta, **where, delta=chunk.text)
            if audio:
                for piece in turn.feed(chunk.text):
                    await _speak(session, piece.text, turn.persona, where)
                    said.append(piece.text)
        if audio and (rest := turn.flush()) is not None:
            await _speak(session, rest.text, turn.persona, where)
    except asyncio.CancelledError:
        status = "cancelled"
        turn.interrupted(" ".join(said))  # barge-in: the history keeps what was spoken
    except ModelManagerError as exc:
        status = "failed"
        await session.send("error", error={"type": "server_error", "code": exc.code, "message": exc.message})
    output: list[dict[str, Any]] = []
    if completion is not None and status == "completed":
        turn.finish(completion)
        if completion.tool_calls:
            output = await _calls(session, response_id, completion)
        else:
            await open_message()
            output = [await _finish_message(session, completion.text.strip(), audio, where, item, part)]
    done = {"id": response_id, "object": "realtime.response", "status": status, "output": output}
    await session.send("response.done", response={**done, "usage": _usage(completion)})


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}


async def _finish_message(
    session: Any, text: str, audio: bool, where: dict[str, Any], item: dict[str, Any], part: dict[str, Any]
) -> dict[str, Any]:
    if audio:
        await session.send("response.output_audio.done", **where)
        await session.send("response.output_audio_transcript.done", **where, transcript=text)
    else:
        await session.send("response.output_text.done", **where, text=text)
    part["transcript" if audio else "text"] = text
    await session.send("response.content_part.done", **where, part=part)
    item = {**item, "status": "completed", "content": [part]}
    await session.send("response.output_item.done", response_id=where["response_id"], output_index=0, item=item)
    return item


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
        items.append(item)
    return items


async def _speak(session: Any, text: str, persona: Persona, where: dict[str, Any]) -> None:
    args = {
        "text": text,
        "voice": session.voice or persona.voice,
        "speed": persona.speed,
        "format": "pcm",
        "stream": True,
    }
    async for reply in session.link.replies("synthesize", args):
        if reply.payloads and reply.payloads[0]:
            rate = int(reply.body.get("sample_rate") or OPENAI_PCM_RATE)
            pcm = await asyncio.to_thread(resample, reply.payloads[0], rate, OPENAI_PCM_RATE)
            await session.send("response.output_audio.delta", **where, delta=base64.b64encode(pcm).decode())


def _usage(completion: Completion | None) -> dict[str, Any] | None:
    if completion is None:
        return None
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
