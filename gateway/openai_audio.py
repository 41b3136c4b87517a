"""OpenAI's audio API over the manager's speech models: ``/v1/audio/speech`` (Piper, encoded to the format asked
for), ``/v1/audio/transcriptions`` (Whisper, multipart upload, every ``response_format``), and listings of the
speech models and voices."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from gateway.audio_codecs import encode
from gateway.body import decode, refuse_unserved
from gateway.errors import HttpError
from gateway.openai_api import model_object
from model_client.aio import ManagerLink

# OpenAI's own voice and model names: a client that sends them gets the catalogue's first voice or Whisper model
OPENAI_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"}
OPENAI_STT_MODELS = {"whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"}
TEXT_FORMATS = ("text", "srt", "vtt")


class SpeechRequest(msgspec.Struct, kw_only=True):
    input: Annotated[str, msgspec.Meta(min_length=1)]
    model: str = "tts-1"
    voice: str | None = None
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    stream_format: Literal["audio", "sse"] = "audio"  # "sse" refused: the audio comes whole, as a file
    instructions: str | None = None  # refused when given: a Piper voice takes no speaking instructions


def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


def subtitles(segments: list[dict[str, Any]], kind: str) -> str:
    separator = "," if kind == "srt" else "."
    blocks = [] if kind == "srt" else ["WEBVTT", ""]
    for number, segment in enumerate(segments, 1):
        timing = f"{_clock(segment['start'], separator)} --> {_clock(segment['end'], separator)}"
        blocks += ([str(number)] if kind == "srt" else []) + [timing, segment["text"], ""]
    return "\n".join(blocks)


def verbose(result: dict[str, Any], words: bool, task: str = "transcribe") -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": task,
        "language": result.get("language") or "",
        "duration": result.get("duration_s", 0.0),
        "text": result["text"],
        "segments": [
            {
                "id": i,
                "seek": 0,
                "start": s["start"],
                "end": s["end"],
                "text": s["text"],
                "tokens": [],
                "temperature": 0.0,
            }
            for i, s in enumerate(result["segments"])
        ],
    }
    if words:
        body["words"] = [w for s in result["segments"] for w in s.get("words", [])]
    return body


class OpenAIAudio:
    def __init__(self, link: ManagerLink) -> None:
        self.link = link

    async def _catalogue(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in (await self.link.request("models", {}, timeout_s=5.0))["models"] if m["kind"] == kind]

    async def models(self, request: Request) -> Response:
        speech = await self._catalogue("stt") + await self._catalogue("tts")
        return JSONResponse({"object": "list", "data": [model_object(m) for m in speech]})

    async def voices(self, request: Request) -> Response:
        voices = [{"id": m["name"], "name": m["name"]} for m in await self._catalogue("tts")]
        return JSONResponse({"voices": voices})

    async def speech(self, request: Request) -> Response:
        body = await decode(request, SpeechRequest)
        if body.stream_format == "sse":
            raise HttpError(400, "stream_format sse is not served: the speech comes as one file", "stream_format")
        refuse_unserved(body, "instructions")
        names = {m["name"] for m in await self._catalogue("tts")}
        if body.voice in names:
            voice = body.voice
        elif body.voice is None or body.voice in OPENAI_VOICES:
            voice = body.model if body.model in names else None  # None: the catalogue's first voice
        else:
            raise HttpError(400, f"no voice {body.voice!r}: the voices are {sorted(names)}", "voice", "invalid_value")
        args = {"text": body.input, "voice": voice, "speed": body.speed, "format": "pcm"}
        reply = await self.link.final("synthesize", args)
        pcm = reply.payloads[0] if reply.payloads else b""
        data, mime = await run_in_threadpool(encode, pcm, reply.body["sample_rate"], body.response_format)
        return Response(data, media_type=mime)

    async def transcriptions(self, request: Request) -> Response:
        return await self._speech_to_text(request, "transcribe")

    async def translations(self, request: Request) -> Response:
        """The speech's meaning in English (OpenAI's translations take no language: the model detects it)."""
        return await self._speech_to_text(request, "translate")

    async def _speech_to_text(self, request: Request, task: str) -> Response:
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as exc:  # not multipart, or a malformed one
            raise HttpError(400, f"the body must be multipart/form-data with a file: {exc}", "file") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HttpError(400, "the form has no `file` to transcribe", "file", "invalid_value")
        audio = await upload.read()
        model = str(form.get("model") or "whisper-1")
        fmt = str(form.get("response_format") or "json")
        if fmt not in ("json", "verbose_json", *TEXT_FORMATS):
            raise HttpError(
                400, f"response_format {fmt!r} is not one of json, text, srt, verbose_json, vtt", "response_format"
            )
        words = "word" in form.getlist("timestamp_granularities[]")
        args: dict[str, Any] = {"model": None if model in OPENAI_STT_MODELS else model, "word_timestamps": words}
        if task == "translate":
            args["task"] = task
        elif language := form.get("language"):
            args["language"] = str(language)
        result = await self.link.request("transcribe", args, payloads=(audio,))
        if fmt == "text":
            return PlainTextResponse(result["text"])
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(
                subtitles(result["segments"], fmt), media_type="text/plain" if fmt == "srt" else "text/vtt"
            )
        return JSONResponse(verbose(result, words, task) if fmt == "verbose_json" else {"text": result["text"]})
