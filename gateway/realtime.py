"""OpenAI's Realtime API over a WebSocket, ``/v1/realtime?model=NAME`` (a persona of the YAML, or a chat model):
audio in while it is spoken, the server's voice activity detection, the transcript, and the answer out as text and
audio deltas, on the shared models.

A session is one persona conversation (``personas.turn``): Whisper for each utterance, the persona's model on the
session's ``conversation_id`` (its KV cache kept across turns), Piper a speakable piece at a time, so the first
audio goes out as soon as the first piece can be spoken. Every request is a voice request (priority 80): it goes
ahead of chat and batch work. Speech during an answer cancels it (barge-in); ``response.cancel`` too.

Audio is pcm16 mono at 24 kHz both ways (Piper's rate is converted). Served events: client ``session.update``,
``input_audio_buffer.append`` / ``commit`` / ``clear``, ``conversation.item.create`` (a user text message),
``response.create`` / ``cancel``; server ``session.created`` / ``updated``, ``input_audio_buffer.speech_started`` /
``speech_stopped`` / ``committed`` / ``cleared``, ``conversation.item.added``,
``conversation.item.input_audio_transcription.completed``, ``response.created``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_audio_transcript.delta`` / ``response.output_text.delta``,
``response.output_audio.delta``, their ``.done`` events, ``response.done`` with usage, and ``error``. A malformed
or unknown event, or audio over the limits, is answered with an ``error`` event and the session goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.audio_codecs import OPENAI_PCM_RATE
from gateway.realtime_answer import new_id, respond
from model_client.aio import ManagerLink
from model_client.errors import ModelManagerError
from personas.config import AgentsConfig, Persona
from personas.history import Histories
from personas.segmenter import Segmenter
from personas.speech_services import Segmenter as SegmenterSettings

log = structlog.get_logger("gateway")

BYTES_PER_SECOND = OPENAI_PCM_RATE * 2
MAX_APPEND_BYTES = 2 * 1024 * 1024  # one append: voice agents send 20-100 ms at a time
MAX_BUFFER_S = 60.0  # audio held before a commit
DEFAULT_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


class RealtimeError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class RealtimeSession:
    def __init__(self, ws: WebSocket, link: ManagerLink, agents: AgentsConfig, model: str, voices: list[str]) -> None:
        self.ws, self.link, self.agents = ws, link, agents
        self.id = new_id("sess")
        self.personas = dict(agents.personas)
        if model not in self.personas:  # a chat model of the catalogue: a persona with the session's instructions
            self.personas[model] = Persona(model=model, system_prompt="You are a helpful voice assistant.")
        self.name, self.voices = model, voices
        self.instructions: str | None = None
        self.voice: str | None = None
        self.modalities = ["audio"]
        self.vad: dict[str, Any] | None = dict(DEFAULT_VAD)
        self.segmenter = self._segmenter()
        self.buffer = bytearray()
        self.histories = Histories(None, agents.agents.max_history_messages, f"realtime-{model}")
        self.pending_text: list[str] = []
        self.pending_results: list[dict[str, Any]] = []  # function outputs for the next response
        self.tools: list[dict[str, Any]] = []  # as the Realtime API writes them (flat)
        self.call_names: dict[str, str] = {}  # call id -> function name
        self.tool_choice: str | dict[str, Any] = "auto"
        self.item_id: str | None = None  # the user item the speech in progress becomes
        self.responding: asyncio.Task | None = None

    # ----- the connection -----------------------------------------------------------------------------------

    async def serve(self) -> None:
        await self.ws.accept()
        await self.send("session.created", session=self._session())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    if message.get("text") is None:
                        raise RealtimeError("invalid_event", "events are JSON text frames, not binary ones")
                    await self._on_event(message["text"])
                except RealtimeError as exc:
                    await self.send(
                        "error",
                        error={
                            "type": "invalid_request_error",
                            "code": exc.code,
                            "message": exc.message,
                            "param": exc.param,
                        },
                    )
                except (WebSocketDisconnect, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a fault of ours: said as an event, logged, and the session goes on
                    log.exception("realtime_event_failed", model=self.name)
                    error = {"type": "server_error", "code": "internal", "message": f"{type(exc).__name__}: {exc}"}
                    await self.send("error", error=error)
        except WebSocketDisconnect:
            pass
        finally:
            if self.responding is not None:
                self.responding.cancel()

    async def send(self, kind: str, **fields: Any) -> None:
        await self.ws.send_text(json.dumps({"type": kind, "event_id": new_id("event"), **fields}))

    async def _on_event(self, raw: str) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            raise RealtimeError("invalid_json", "the event is not valid JSON") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise RealtimeError("invalid_event", "an event is a JSON object with a string type", "type")
        handler = getattr(self, "_on_" + event["type"].replace(".", "_"), None)
        if handler is None:
            raise RealtimeError("unknown_event", f"events of type {event['type']!r} are not served", "type")
        await handler(event)

    # ----- client events ------------------------------------------------------------------------------------

    async def _on_session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise RealtimeError("invalid_value", "session.update needs a session object", "session")
        if isinstance(session.get("instructions"), str):
            self.instructions = session["instructions"]
        if isinstance(session.get("tools"), list):
            tools = session["tools"]
            if not all(isinstance(t, dict) and t.get("type") == "function" and t.get("name") for t in tools):
                raise RealtimeError("invalid_value", "only function tools with a name are served", "session.tools")
            self.tools = tools
        choice = session.get("tool_choice")
        if choice in ("auto", "none", "required") or (isinstance(choice, dict) and isinstance(choice.get("name"), str)):
            self.tool_choice = choice
        if isinstance(session.get("output_modalities"), list):
            self.modalities = ["text"] if session["output_modalities"] == ["text"] else ["audio"]
        audio = session.get("audio") if isinstance(session.get("audio"), dict) else {}
        output, source = audio.get("output") or {}, audio.get("input") or {}
        voice = output.get("voice") if isinstance(output, dict) else None
        if isinstance(voice, str):
            self.voice = voice if voice in self.voices else None  # OpenAI's names take the persona's voice
        if isinstance(source, dict) and "turn_detection" in source:
            detection = source["turn_detection"]
            self.vad = {**DEFAULT_VAD, **detection} if isinstance(detection, dict) else None
            self.segmenter = self._segmenter()
        await self.send("session.updated", session=self._session())

    async def _on_input_audio_buffer_append(self, event: dict[str, Any]) -> None:
        data = event.get("audio")
        if not isinstance(data, str):
            raise RealtimeError("invalid_value", "audio must be base64 pcm16", "audio")
        if len(data) > MAX_APPEND_BYTES * 4 // 3 + 4:
            raise RealtimeError("audio_too_large", f"one append carries at most {MAX_APPEND_BYTES} bytes", "audio")
        try:
            pcm = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("invalid_value", "audio is not valid base64", "audio") from None
        if len(self.buffer) + len(pcm) > MAX_BUFFER_S * BYTES_PER_SECOND:
            raise RealtimeError("buffer_full", f"the input buffer holds at most {MAX_BUFFER_S:.0f} s: commit it")
        if self.segmenter is None:
            self.buffer += pcm
            return
        speaking = self.segmenter.in_utterance
        utterances = self.segmenter.feed(pcm)
        if not speaking and (self.segmenter.in_utterance or utterances):
            await self._speech_started()
        for utterance in utterances:
            await self.send("input_audio_buffer.speech_stopped", item_id=self.item_id)
            await self._commit(utterance, answer=True)

    async def _on_input_audio_buffer_commit(self, event: dict[str, Any]) -> None:
        audio = bytes(self.buffer) or (self.segmenter.flush() if self.segmenter else None) or b""
        if not audio:
            raise RealtimeError("input_audio_buffer_commit_empty", "the input audio buffer is empty")
        await self._commit(audio, answer=False)

    async def _on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        self.buffer.clear()
        self.segmenter = self._segmenter()
        await self.send("input_audio_buffer.cleared")

    async def _on_conversation_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not isinstance(output, str):
                raise RealtimeError("invalid_value", "a function_call_output needs call_id and output", "item")
            result = {"role": "tool", "content": output, "tool_call_id": call_id}
            if call_id in self.call_names:
                result["name"] = self.call_names[call_id]
            self.pending_results.append(result)
            item_id = item.get("id") if isinstance(item.get("id"), str) else new_id("item")
            await self.send("conversation.item.added", item={**item, "id": item_id, "status": "completed"})
            return
        if not isinstance(item, dict) or item.get("type", "message") != "message" or item.get("role") != "user":
            raise RealtimeError("invalid_value", "only user messages and function outputs are served", "item")
        parts = item.get("content") if isinstance(item.get("content"), list) else []
        text = "".join(str(p.get("text") or "") for p in parts if isinstance(p, dict) and p.get("type") == "input_text")
        if not text.strip():
            raise RealtimeError("invalid_value", "a user message needs input_text content", "item.content")
        self.pending_text.append(text)
        item_id = item.get("id") if isinstance(item.get("id"), str) else new_id("item")
        await self.send("conversation.item.added", item={**item, "id": item_id, "status": "completed"})

    async def _on_response_create(self, event: dict[str, Any]) -> None:
        if self.responding is not None and not self.responding.done():
            raise RealtimeError("conversation_already_has_active_response", "a response is in progress")
        text, self.pending_text = " ".join(self.pending_text).strip(), []
        results, self.pending_results = self.pending_results, []
        if not text and not results:
            raise RealtimeError("invalid_value", "nothing to answer: add an item or speak first")
        self.responding = asyncio.create_task(respond(self, text, results))

    async def _on_response_cancel(self, event: dict[str, Any]) -> None:
        await self._cancel()

    # ----- a turn -------------------------------------------------------------------------------------------

    async def _speech_started(self) -> None:
        self.item_id = new_id("item")
        await self.send("input_audio_buffer.speech_started", item_id=self.item_id)
        await self._cancel()  # barge-in: the person speaks, the answer stops

    async def _cancel(self) -> None:
        if self.responding is not None and not self.responding.done():
            self.responding.cancel()
            await asyncio.gather(self.responding, return_exceptions=True)

    async def _commit(self, pcm: bytes, answer: bool) -> None:
        self.buffer.clear()
        item_id = self.item_id or new_id("item")
        self.item_id = None
        await self.send("input_audio_buffer.committed", item_id=item_id)
        item = {
            "id": item_id,
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        await self.send("conversation.item.added", item=item)
        args = {"format": "pcm", "sample_rate": OPENAI_PCM_RATE, "language": "en", "vad_filter": True}
        try:
            result = await self.link.request("transcribe", args, payloads=(pcm,))
        except ModelManagerError as exc:
            raise RealtimeError(exc.code, exc.message) from None
        text = str(result.get("text") or "").strip()
        await self.send(
            "conversation.item.input_audio_transcription.completed", item_id=item_id, content_index=0, transcript=text
        )
        if not text:
            return
        if answer:
            await self._cancel()
            self.responding = asyncio.create_task(respond(self, text, []))
        else:
            self.pending_text.append(text)

    # ----- what the session says of itself ------------------------------------------------------------------

    def _segmenter(self) -> Segmenter | None:
        if self.vad is None:
            return None
        threshold = float(self.vad.get("threshold") or 0.5)
        settings = SegmenterSettings(
            threshold_dbfs=-70.0 + 50.0 * min(1.0, max(0.0, threshold)),
            min_silence_ms=max(30, int(self.vad.get("silence_duration_ms") or 500)),
            pre_roll_ms=max(0, int(self.vad.get("prefix_padding_ms") or 300)),
        )
        return Segmenter(settings, OPENAI_PCM_RATE)

    def _session(self) -> dict[str, Any]:
        persona = self.personas[self.name]
        pcm = {"type": "audio/pcm", "rate": OPENAI_PCM_RATE}
        return {
            "type": "realtime",
            "id": self.id,
            "object": "realtime.session",
            "model": self.name,
            "output_modalities": self.modalities,
            "instructions": self.instructions or persona.system_prompt,
            "audio": {
                "input": {"format": pcm, "turn_detection": self.vad, "transcription": {"model": "whisper"}},
                "output": {"format": pcm, "voice": self.voice or persona.voice},
            },
            "tools": self.tools,
            "tool_choice": self.tool_choice,
        }


async def realtime_endpoint(ws: WebSocket, link: ManagerLink, agents: AgentsConfig) -> None:
    """A session on ``?model=``: a persona of the YAML, or a chat model of the catalogue."""
    model = ws.query_params.get("model") or ""
    try:
        catalogue = (await link.request("models", {}, timeout_s=5.0))["models"]
    except ModelManagerError as exc:
        await ws.close(code=1011, reason=exc.message[:120])
        return
    chat_models = {m["name"] for m in catalogue if m["kind"] == "llm"}
    voices = [m["name"] for m in catalogue if m["kind"] == "tts"]
    if model not in agents.personas and model not in chat_models:
        await ws.accept()
        error = {
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
            "message": f"no persona or chat model {model!r}: {sorted(agents.personas) + sorted(chat_models)}",
        }
        await ws.send_text(json.dumps({"type": "error", "event_id": new_id("event"), "error": error}))
        await ws.close(code=1008)
        return
    log.info("realtime_session", model=model)
    await RealtimeSession(ws, link, agents, model, voices).serve()
