"""OpenAI's Realtime API over a WebSocket, ``/v1/realtime?model=NAME`` (a persona of the YAML, or a chat model):
audio in while it is spoken, the server's voice activity detection, the transcript, and the answer out as text and
audio deltas, on the shared models.

A session is one persona conversation (``personas.turn``): Whisper for each utterance, the persona's model on the
session's ``conversation_id`` (its KV cache kept across turns), Piper a speakable piece at a time, so the first
audio goes out as soon as the first piece can be spoken. Every request is a voice request (priority 80): it goes
ahead of chat and batch work. Speech during an answer cancels it (barge-in); ``response.cancel`` too.

Audio is pcm16 mono at 24 kHz both ways (Piper's rate is converted). Served events: client ``session.update``
(checked whole before any of it applies), ``input_audio_buffer.append`` / ``commit`` / ``clear``,
``conversation.item.create`` (a user text message, a function output), ``conversation.item.retrieve`` /
``truncate``, ``response.create`` / ``cancel``; server ``session.created`` / ``updated``,
``input_audio_buffer.speech_started`` / ``speech_stopped`` (where in the session's audio) / ``committed`` /
``cleared``, ``conversation.item.added`` / ``retrieved`` / ``truncated``,
``conversation.item.input_audio_transcription.completed``, ``response.created``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_audio_transcript.delta`` / ``response.output_text.delta``,
``response.output_audio.delta``, their ``.done`` events, ``response.done`` with usage, and ``error``. A malformed
or unknown event, or audio over the limits, is answered with an ``error`` event and the session goes on; a client
that goes away ends its session and answer quietly (one log line).

The history keeps what the person heard of an answer cut short, not what was sent (``gateway.realtime_items``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from typing import Any

import msgspec
import structlog
from anyio import BrokenResourceError, ClosedResourceError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from daemonkit.json_limits import field_path, first_violation
from gateway.audio_codecs import OPENAI_PCM_RATE
from gateway.realtime_answer import Answer, ClientGone, new_id
from gateway.realtime_items import AssistantItem, Items, rewrite_reply
from gateway.realtime_settings import RealtimeError, Settings, updated
from model_client.aio import ManagerLink
from model_client.errors import ModelManagerError
from personas.config import AgentsConfig, Persona
from personas.history import Histories
from personas.segmenter import FRAME_MS, Segmenter
from personas.speech_services import Segmenter as SegmenterSettings

log = structlog.get_logger("gateway")

BYTES_PER_SECOND = OPENAI_PCM_RATE * 2
MAX_APPEND_BYTES = 2 * 1024 * 1024  # one append: voice agents send 20-100 ms at a time
MAX_BUFFER_S = 60.0  # audio held before a commit
MAX_DEPTH = 64  # as the HTTP bodies (gateway.body): tool schemas nest a handful of levels
FRAME_BYTES = OPENAI_PCM_RATE * FRAME_MS // 1000 * 2
GONE = (WebSocketDisconnect, ClosedResourceError, BrokenResourceError, OSError)

__all__ = ["RealtimeError", "RealtimeSession", "realtime_endpoint"]


class RealtimeSession:
    def __init__(self, ws: WebSocket, link: ManagerLink, agents: AgentsConfig, model: str, voices: list[str]) -> None:
        self.ws, self.link, self.agents = ws, link, agents
        self.id = new_id("sess")
        self.personas = dict(agents.personas)
        if model not in self.personas:  # a chat model of the catalogue: a persona with the session's instructions
            self.personas[model] = Persona(model=model, system_prompt="You are a helpful voice assistant.")
        self.name, self.voices = model, voices
        self.settings = Settings()
        self.segmenter = self._segmenter()
        self.buffer = bytearray()
        self.histories = Histories(None, agents.agents.max_history_messages, f"realtime-{model}")
        self.items = Items()
        self.turns = 0  # answers started: the latest turn's number
        self.pending_text: list[str] = []
        self.pending_results: list[dict[str, Any]] = []  # function outputs for the next response
        self.call_names: dict[str, str] = {}  # call id -> function name
        self.item_id: str | None = None  # the user item the speech in progress becomes
        self.heard_samples = 0  # every sample appended this session: speech events say where they are in it
        self.fed = bytearray()  # appended audio not yet a whole segmenter frame
        self.responding: Answer | None = None
        self.closed = False

    # the settings, as the answer reads them
    @property
    def instructions(self) -> str | None:
        return self.settings.instructions

    @property
    def voice(self) -> str | None:
        voice = self.settings.voice
        return voice if voice in self.voices else None  # OpenAI's names take the persona's voice

    @property
    def modalities(self) -> list[str]:
        return list(self.settings.modalities)

    @property
    def tools(self) -> list[dict[str, Any]]:
        return self.settings.tools

    @property
    def tool_choice(self) -> str | dict[str, Any]:
        return self.settings.tool_choice

    # ----- the connection -----------------------------------------------------------------------------------

    async def serve(self) -> None:
        await self.ws.accept()
        try:
            await self.send("session.created", session=self._session())
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    if message.get("text") is None:
                        raise RealtimeError("invalid_event", "events are JSON text frames, not binary ones")
                    await self._dispatch(message["text"])
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
                except (ClientGone, asyncio.CancelledError, *GONE):
                    raise
                except Exception as exc:  # a fault of ours: said as an event, logged, and the session goes on
                    log.exception("realtime_event_failed", model=self.name)
                    error = {"type": "server_error", "code": "internal", "message": f"{type(exc).__name__}: {exc}"}
                    await self.send("error", error=error)
        except (ClientGone, *GONE):
            pass
        finally:
            self.closed = True
            cut_short = await self._cancel("client_gone")  # an answer still running when the client went...
            if cut_short or (self.responding is not None and self.responding.reason == "client_gone"):  # ...or
                log.info("client_gone", path="/v1/realtime", during="response")  # one that found it gone itself

    async def send(self, kind: str, **fields: Any) -> None:
        """One server event; a client that has gone is ``ClientGone`` (said once, in the session's end)."""
        if self.closed:
            raise ClientGone
        text = json.dumps({"type": kind, "event_id": new_id("event"), **fields})
        try:
            await self.ws.send_text(text)
        except GONE:
            self.closed = True
            raise ClientGone from None
        except RuntimeError:  # starlette's word for a socket already closed
            if self.ws.application_state == WebSocketState.CONNECTED:
                raise
            self.closed = True
            raise ClientGone from None

    async def _dispatch(self, raw: str) -> None:
        """One client event to its ``_on_<type>`` handler (every method so named is one, and nothing else is)."""
        try:
            event = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError):  # msgspec's own depth limit is a RecursionError
            raise RealtimeError("invalid_json", "the event is not valid JSON (or nests too deep)") from None
        found = first_violation(event, MAX_DEPTH)
        if found is not None:
            kind, path = found
            if kind == "too_deep":
                field = field_path(path[:1])[2:] or None
                raise RealtimeError("invalid_json", f"the event nests deeper than {MAX_DEPTH} levels", field)
            raise RealtimeError("invalid_value", "an integer is out of range", field_path(path)[2:] or None)
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise RealtimeError("invalid_event", "an event is a JSON object with a string type", "type")
        handler = getattr(self, "_on_" + event["type"].replace(".", "_"), None)
        if handler is None:
            raise RealtimeError("unknown_event", f"events of type {event['type'][:100]!r} are not served", "type")
        await handler(event)

    # ----- client events ------------------------------------------------------------------------------------

    async def _on_session_update(self, event: dict[str, Any]) -> None:
        settings = updated(self.settings, event.get("session"), self.name)
        vad_changed = settings.vad != self.settings.vad
        self.settings = settings
        if vad_changed:
            self.segmenter = self._segmenter()
            self.fed.clear()
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
        if len(pcm) % 2:  # half a sample would shift every later one
            raise RealtimeError("invalid_value", "audio is pcm16: a whole number of 2-byte samples", "audio")
        if len(self.buffer) + len(pcm) > MAX_BUFFER_S * BYTES_PER_SECOND:
            raise RealtimeError("buffer_full", f"the input buffer holds at most {MAX_BUFFER_S:.0f} s: commit it")
        if self.segmenter is None:
            self.buffer += pcm
            self.heard_samples += len(pcm) // 2
            return
        # A frame at a time, so each speech event knows where in the session's audio it happened.
        self.fed += pcm
        whole = len(self.fed) - len(self.fed) % FRAME_BYTES
        frames, self.fed = bytes(self.fed[:whole]), self.fed[whole:]
        for start in range(0, len(frames), FRAME_BYTES):
            speaking = self.segmenter.in_utterance
            utterances = self.segmenter.feed(frames[start : start + FRAME_BYTES])
            self.heard_samples += FRAME_BYTES // 2
            if not speaking and (self.segmenter.in_utterance or utterances):
                began = self.heard_samples - (self.segmenter.utterance_samples or len(utterances[0]) // 2)
                await self._speech_started(began)
            for utterance in utterances:
                self.item_id = self.item_id or new_id("item")
                await self.send("input_audio_buffer.speech_stopped", item_id=self.item_id, audio_end_ms=self._ms())
                await self._commit(utterance, answer=bool(self.vad and self.vad["create_response"]))

    async def _on_input_audio_buffer_commit(self, event: dict[str, Any]) -> None:
        audio = bytes(self.buffer) or (self.segmenter.flush() if self.segmenter else None) or b""
        if not audio:
            raise RealtimeError("input_audio_buffer_commit_empty", "the input audio buffer is empty")
        await self._commit(audio, answer=False)

    async def _on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        self.buffer.clear()
        self.fed.clear()
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
            # Kept and echoed as served, not as sent: a client's extra fields are neither stored nor sent back.
            kept = {"type": "function_call_output", "call_id": call_id, "output": output}
            await self._added({"id": self._item_id(item), **kept, "status": "completed"})
            return
        if not isinstance(item, dict) or item.get("type", "message") != "message" or item.get("role") != "user":
            raise RealtimeError("invalid_value", "only user messages and function outputs are served", "item")
        parts = item.get("content") if isinstance(item.get("content"), list) else []
        text = "".join(str(p.get("text") or "") for p in parts if isinstance(p, dict) and p.get("type") == "input_text")
        if not text.strip():
            raise RealtimeError("invalid_value", "a user message needs input_text content", "item.content")
        self.pending_text.append(text)
        content = [{"type": "input_text", "text": text}]
        await self._added(
            {"id": self._item_id(item), "type": "message", "role": "user", "content": content, "status": "completed"}
        )

    async def _on_conversation_item_retrieve(self, event: dict[str, Any]) -> None:
        item = self.items.as_sent(self._known_item(event))
        await self.send("conversation.item.retrieved", item=item)

    async def _on_conversation_item_truncate(self, event: dict[str, Any]) -> None:
        """The client played ``audio_end_ms`` of an assistant item's audio: the item's transcript and the session's
        history keep only the words that audio holds, so the model is never told it said what nobody heard."""
        item_id = self._known_item(event)
        item = self.items.get(item_id)
        if not isinstance(item, AssistantItem):
            raise RealtimeError(
                "invalid_value", f"{item_id!r} is not an assistant message: only those are cut", "item_id"
            )
        if not item.audio:
            raise RealtimeError("invalid_value", f"{item_id!r} has no audio to cut", "item_id")
        if event.get("content_index", 0) != 0:
            raise RealtimeError("invalid_value", "an assistant message has one content part: 0", "content_index")
        end_ms = event.get("audio_end_ms")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            raise RealtimeError("invalid_value", "audio_end_ms is a whole number of milliseconds", "audio_end_ms")
        if end_ms > item.audio_ms + 1:
            message = f"audio_end_ms {end_ms} is beyond the item's audio ({item.audio_ms:.0f} ms)"
            raise RealtimeError("invalid_value", message, "audio_end_ms")
        if self.responding is not None and self.responding.item is item and not self.responding.task.done():
            await self._cancel("client_cancelled")  # the client stopped playing it: the rest need not be made
        if end_ms < item.audio_ms - 1 or item.status != "completed":  # a stopped answer's history is an estimate
            text = item.heard(end_ms)
            rewrite_reply(self.histories, self.id, item, text, latest=item.turn == self.turns)
            item.text, item.cut_ms, item.status = text, float(end_ms), "incomplete"
        await self.send("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=end_ms)

    async def _on_response_create(self, event: dict[str, Any]) -> None:
        if self.responding is not None and not self.responding.task.done():
            raise RealtimeError("conversation_already_has_active_response", "a response is in progress")
        text, self.pending_text = " ".join(self.pending_text).strip(), []
        results, self.pending_results = self.pending_results, []
        if not text and not results:
            raise RealtimeError("invalid_value", "nothing to answer: add an item or speak first")
        await self._answer(text, results)

    async def _on_response_cancel(self, event: dict[str, Any]) -> None:
        answer = self.responding
        wanted = event.get("response_id")
        if answer is None or answer.task.done() or (wanted is not None and wanted != answer.id):
            raise RealtimeError("response_cancel_not_active", "there is no response in progress to cancel")
        await self._cancel("client_cancelled")

    # ----- a turn -------------------------------------------------------------------------------------------

    async def _speech_started(self, began_samples: int) -> None:
        self.item_id = new_id("item")
        start_ms = round(began_samples * 1000 / OPENAI_PCM_RATE)
        await self.send("input_audio_buffer.speech_started", item_id=self.item_id, audio_start_ms=start_ms)
        if self.vad and self.vad["interrupt_response"]:
            at = time.monotonic()
            await self._cancel("turn_detected")  # barge-in: the person speaks, the answer stops
            self._cut_to_playback(at)

    def _cut_to_playback(self, at: float) -> None:
        """Speech over an answer that went out whole but is still playing (it was sent faster than real time): the
        history keeps what real-time playback had reached, as for an answer stopped while it was being made."""
        item = self.responding.item if self.responding is not None else None
        if item is None or not item.audio or item.status != "completed" or not item.deltas:
            return
        played = item.played_ms(at)
        if played >= item.audio_ms - 1:
            return
        text = item.heard(played)
        rewrite_reply(self.histories, self.id, item, text, latest=item.turn == self.turns)
        item.text, item.status = text, "incomplete"

    async def _cancel(self, reason: str) -> bool:
        """Stop the answer in progress, if any, and wait for it to say so; True when there was one."""
        answer = self.responding
        if answer is None or answer.task.done():
            return False
        answer.cancel(reason)
        await asyncio.gather(answer.task, return_exceptions=True)
        return True

    async def _answer(self, text: str, results: list[dict[str, Any]]) -> None:
        self.turns += 1
        asked = [*([{"role": "user", "content": text}] if text else []), *results]
        item = AssistantItem(new_id("item"), self.turns, asked, audio=self.modalities == ["audio"])
        self.items.add(item)
        self.responding = Answer(self, text, results, item)
        await self.responding.started.wait()

    async def _commit(self, pcm: bytes, answer: bool) -> None:
        self.buffer.clear()
        item_id = self.item_id or new_id("item")
        self.item_id = None
        await self.send("input_audio_buffer.committed", item_id=item_id)
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        await self._added(item)
        args = {"format": "pcm", "sample_rate": OPENAI_PCM_RATE, "language": "en", "vad_filter": True}
        try:
            result = await self.link.request("transcribe", args, payloads=(pcm,))
        except ModelManagerError as exc:
            raise RealtimeError(exc.code, exc.message) from None
        text = str(result.get("text") or "").strip()
        item["content"] = [{"type": "input_audio", "transcript": text}]
        await self.send(
            "conversation.item.input_audio_transcription.completed", item_id=item_id, content_index=0, transcript=text
        )
        if not text:
            return
        if answer:
            await self._cancel("turn_detected")
            await self._answer(text, [])
        else:
            self.pending_text.append(text)

    async def _added(self, item: dict[str, Any]) -> None:
        self.items.add(item)
        await self.send("conversation.item.added", item=item)

    def _item_id(self, item: dict[str, Any]) -> str:
        given = item.get("id")
        return given if isinstance(given, str) and 0 < len(given) <= 64 else new_id("item")

    def _known_item(self, event: dict[str, Any]) -> str:
        item_id = event.get("item_id")
        if not isinstance(item_id, str) or self.items.get(item_id) is None:
            raise RealtimeError("invalid_value", f"no item {str(item_id)[:80]!r} in this conversation", "item_id")
        return item_id

    # ----- what the session says of itself ------------------------------------------------------------------

    @property
    def vad(self) -> dict[str, Any] | None:
        return self.settings.vad

    def _ms(self) -> int:
        return round(self.heard_samples * 1000 / OPENAI_PCM_RATE)

    def _segmenter(self) -> Segmenter | None:
        if self.vad is None:
            return None
        settings = SegmenterSettings(
            threshold_dbfs=-70.0 + 50.0 * float(self.vad["threshold"]),
            min_silence_ms=max(30, int(self.vad["silence_duration_ms"])),
            pre_roll_ms=int(self.vad["prefix_padding_ms"]),
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
                "output": {"format": pcm, "voice": self.voice or persona.voice, "speed": self.settings.speed},
            },
            "tools": self.tools,
            "tool_choice": self.tool_choice,
            "max_output_tokens": self.settings.max_output_tokens or "inf",
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
