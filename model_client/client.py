"""``ModelClient``: what agents import to use the manager's models; ``Conversation`` keeps a chat's messages.

The client speaks through a DEALER socket so that it can receive streamed chunks, kept the Lazy Pirate way (see
``connection``): a late reply is waited for with a timeout, then the request is sent again on a fresh socket, a
bounded number of times, and only for ops that are safe to repeat. A client object is meant for one thread; give
each thread its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from model_client import protocol
from model_client.audio import Audio, read_wav
from model_client.connection import Connection
from model_client.endpoints import default_endpoint
from model_client.errors import InternalError, Timeout, error_from_wire
from model_client.results import Completion, TextChunk, chunk_from, completion_from
from model_client.security import CurveClient


class Stream:
    """Iterate for text pieces as the model produces them (each may carry several tokens' text: ``tokens`` counts
    the tokens received so far); ``result`` holds the Completion at the end."""

    def __init__(self, pieces: Iterator[TextChunk | Completion]) -> None:
        self._pieces = pieces
        self.result: Completion | None = None
        self.tokens = 0

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            if isinstance(piece, Completion):
                self.result = piece
            else:
                self.tokens += piece.tokens
                yield piece.text

    def text(self) -> str:
        return "".join(self)


@dataclass
class Transcript:
    """What Whisper heard: the text, its timed segments, the language and the clip's length."""

    text: str
    segments: list[dict[str, Any]]
    language: str
    duration_s: float
    model: str
    timings: dict[str, float]

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> Transcript:
        return cls(
            text=result["text"],
            segments=result["segments"],
            language=result["language"],
            duration_s=result["duration_s"],
            model=result["model"],
            timings=result["timings"],
        )


@dataclass
class Speech:
    """Synthesized speech: the audio (PCM, ``to_wav()`` for a file) and how long it took to make."""

    audio: Audio
    model: str
    timings: dict[str, float]


class SpeechStream:
    """Iterate for the audio of each sentence as it is made; ``result`` holds the final report at the end."""

    def __init__(self, chunks: Iterator[Audio | dict[str, Any]]) -> None:
        self._chunks = chunks
        self.result: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Audio]:
        for chunk in self._chunks:
            if isinstance(chunk, dict):
                self.result = chunk
            else:
                yield chunk


class ModelClient:
    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        context: zmq.Context | None = None,
        priority: int | None = None,
        curve: CurveClient | None = None,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.priority = priority  # 0..100 (protocol.PRIORITY_*); None: the manager's default
        self.connection = Connection(
            self.endpoint, curve or CurveClient.from_env(), context or zmq.Context.instance(), retries
        )

    # ----- plumbing -------------------------------------------------------------------------------------------

    def close(self) -> None:
        self.connection.reset()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _receive(self, request_id: str, timeout: float) -> protocol.Reply:
        """The next reply to ``request_id``; replies to requests abandoned earlier are skipped."""
        self.connection.sock.rcvtimeo = round(timeout * 1000)  # one blocking recv is cheaper than poll + recv
        while True:
            try:
                reply = self.connection.recv()
            except zmq.Again:
                raise Timeout(f"no reply from {self.endpoint} within {timeout} s", endpoint=self.endpoint) from None
            if reply.id in (request_id, None):
                return reply

    def _request(
        self, op: str, args: dict[str, Any], timeout: float, payloads: tuple[bytes, ...] = ()
    ) -> protocol.Request:
        """The request, carrying how long this client will wait, so the manager drops it once nobody waits."""
        return protocol.Request(
            op=op, args=args, payloads=payloads, deadline_ms=round(timeout * 1000, 1), priority=self.priority
        )

    def request(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        timeout: float | None = None,
        payloads: tuple[bytes, ...] = (),
    ) -> Any:
        """Send one request and return its result, raising the typed error the manager answered with."""
        return self._result(self.call(op, args, timeout, payloads))

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        timeout: float | None = None,
        payloads: tuple[bytes, ...] = (),
    ) -> protocol.Reply:
        """Send one request (with binary payload frames) and return its final reply, result or error."""
        timeout = self.timeout if timeout is None else timeout
        request = self._request(op, args or {}, timeout, payloads)
        attempts = 0
        while True:
            self.connection.send(request)
            attempts += 1
            try:
                reply = self._receive(request.id, timeout)
            except Timeout:
                self.connection.reset()  # a fresh socket, so a late reply cannot be taken for the next one
                if not self.connection.may_resend(op, attempts):
                    raise
                continue
            while not reply.is_final:  # a streamed request answered here: keep only the final reply
                reply = self._receive(request.id, timeout)
            return reply

    @staticmethod
    def _result(reply: protocol.Reply) -> Any:
        if reply.type == protocol.REPLY_ERROR:
            raise error_from_wire(reply.body)
        return reply.body

    def _replies(self, op: str, args: dict[str, Any], timeout: float) -> Iterator[protocol.Reply]:
        """Send a streamed request; yield its chunks, then its final reply (raised if it is an error)."""
        request = self._request(op, {**args, "stream": True}, timeout)
        self.connection.send(request)
        try:
            while True:
                reply = self._receive(request.id, timeout)
                if reply.is_final:
                    self._result(reply)
                    yield reply
                    return
                yield reply
        except BaseException:
            self.connection.reset()  # abandoning the stream: later chunks must not reach the next request
            raise

    def _stream(self, op: str, args: dict[str, Any], timeout: float) -> Iterator[TextChunk | Completion]:
        for reply in self._replies(op, args, timeout):
            yield completion_from(reply.body) if reply.is_final else chunk_from(reply.body)

    # ----- the API --------------------------------------------------------------------------------------------

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.request("ping", timeout=timeout)

    def wait_ready(self, timeout: float | None = None, on_wait: Any = None, interval: float = 0.5) -> dict[str, Any]:
        """Ping until the daemon answers (it may still be starting); ``on_wait(seconds)`` is called between tries.
        Raises Timeout after ``timeout`` seconds (None: wait for ever)."""
        started = time.monotonic()
        while True:
            try:
                return self.request("ping", timeout=interval)
            except Timeout:
                waited = time.monotonic() - started
                if timeout is not None and waited > timeout:
                    raise
                if on_wait is not None:
                    on_wait(waited)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def models(self) -> list[dict[str, Any]]:
        return self.request("models")["models"]

    def load(self, model: str) -> dict[str, Any]:
        return self.request("load", {"model": model})

    def unload(self, model: str) -> dict[str, Any]:
        return self.request("unload", {"model": model})

    def pull(self, ref: str, name: str | None = None, check: bool = False, **options: Any) -> Iterator[dict[str, Any]]:
        """Fetch a model into the catalogue (``hf.co/ORG/REPO:QUANT``, ``hf://ORG/REPO/FILE``, an https URL): yields
        the progress maps (``status``: resolved, fit, downloading, verified, success), the last one the result
        (``model``, ``fit``, ``files``). ``check``: the fit only, nothing downloaded. ``timeout`` bounds the wait for
        each piece of progress, not the whole pull."""
        timeout = float(options.pop("timeout", self.timeout))
        args = {"ref": ref, "name": name, "check": check, **options}
        for reply in self._replies("pull", args, timeout):
            yield {**reply.body, "final": reply.is_final}

    def remove(self, model: str) -> dict[str, Any]:
        """Take a pulled model (and its files) or an alias out of the catalogue; a model in use is ``busy``."""
        return self.request("remove", {"model": model})

    def copy(self, source: str, destination: str) -> dict[str, Any]:
        """A second name for a model (an alias: the same weights, loaded once)."""
        return self.request("copy", {"source": source, "destination": destination})

    def show(self, model: str) -> dict[str, Any]:
        return self.request("show", {"model": model})

    def reload(self) -> dict[str, Any]:
        """Take the catalogue fragments as they are on disk now (what SIGHUP does)."""
        return self.request("reload")

    def drop_conversation(self, model: str, conversation_id: str) -> bool:
        """Forget a conversation's cached state (in RAM and on disk); True if there was one."""
        return self.request("conversation.drop", {"model": model, "conversation_id": conversation_id})["dropped"]

    def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        conversation_id: str | None = None,
        stream: bool = False,
        timeout: float | None = None,
        **params: Any,
    ) -> Completion | Stream:
        """Chat with ``model``; ``params`` are sampling parameters named as llama.cpp names them."""
        args = {"model": model, "messages": messages, "conversation_id": conversation_id, **params}
        return self.generate("chat", args, stream, timeout)

    def complete(
        self,
        model: str,
        prompt: str,
        conversation_id: str | None = None,
        stream: bool = False,
        timeout: float | None = None,
        **params: Any,
    ) -> Completion | Stream:
        args = {"model": model, "prompt": prompt, "conversation_id": conversation_id, **params}
        return self.generate("complete", args, stream, timeout)

    def embed(self, model: str, texts: str | list[str], normalize: bool = True) -> list[list[float]]:
        """One vector per text (pooled over its tokens, unit length unless ``normalize`` is false)."""
        return self.request("embed", {"model": model, "input": texts, "normalize": normalize})["embeddings"]

    def transcribe(
        self, audio: bytes, model: str | None = None, timeout: float | None = None, **options: Any
    ) -> Transcript:
        """Transcribe an audio file's bytes (WAV, FLAC, MP3, OGG, ...); ``options``: language, beam_size,
        vad_filter, word_timestamps."""
        reply = self.call("transcribe", {"model": model, **options}, timeout, payloads=(audio,))
        return Transcript.from_result(self._result(reply))

    def transcribe_pcm(self, audio: Audio, model: str | None = None, timeout: float | None = None, **options: Any):
        """Transcribe raw little-endian PCM."""
        pcm = {"format": "pcm", "sample_rate": audio.sample_rate, "sample_width": audio.sample_width}
        return self.transcribe(audio.pcm, model, timeout, channels=audio.channels, **pcm, **options)

    def synthesize(
        self, text: str, voice: str | None = None, speed: float = 1.0, timeout: float | None = None, **options: Any
    ) -> Speech:
        """Speak ``text`` with ``voice`` (a tts model of the catalogue; None: the first); one reply, all audio
        (``format="pcm"`` in ``options`` asks for raw PCM instead of a WAV file; either way ``audio`` is PCM)."""
        args = {"text": text, "voice": voice, "speed": speed, "format": "wav", **options}
        reply = self.call("synthesize", args, timeout)
        result = self._result(reply)
        if not reply.payloads:
            raise InternalError("the synthesize reply carried no audio frame")
        payload = reply.payloads[0]
        if result["format"] == "pcm":
            audio = Audio(payload, result["sample_rate"], result["sample_width"], result["channels"])
        else:
            audio = read_wav(payload)
        return Speech(audio=audio, model=result["model"], timings=result["timings"])

    def synthesize_stream(
        self, text: str, voice: str | None = None, speed: float = 1.0, timeout: float | None = None, **options: Any
    ) -> SpeechStream:
        """Speak ``text``, one PCM chunk per sentence as soon as it is made."""
        timeout = self.timeout if timeout is None else timeout
        args = {"text": text, "voice": voice, "speed": speed, "format": "pcm", "stream": True, **options}
        return SpeechStream(self._speech_chunks(args, timeout))

    def _speech_chunks(self, args: dict[str, Any], timeout: float) -> Iterator[Audio | dict[str, Any]]:
        for reply in self._replies("synthesize", args, timeout):
            if reply.is_final:
                yield reply.body
                continue
            chunk, pcm = reply.body, reply.payloads[0] if reply.payloads else b""
            yield Audio(pcm, chunk["sample_rate"], chunk.get("sample_width", 2), chunk.get("channels", 1))

    def generate(
        self, op: str, args: dict[str, Any], stream: bool = False, timeout: float | None = None
    ) -> Completion | Stream:
        """``chat`` or ``complete`` from ready-made protocol arguments (``chat`` and ``complete`` build them)."""
        timeout = self.timeout if timeout is None else timeout
        if stream:
            return Stream(self._stream(op, args, timeout))
        return completion_from(self.request(op, args, timeout))


@dataclass
class Conversation:
    """A chat's message list and a stable ``conversation_id``, so the manager can reuse its cached context."""

    client: ModelClient
    model: str
    system: str | None = None
    conversation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    messages: list[dict[str, str]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})

    def say(self, text: str, **params: Any) -> Completion:
        self.messages.append({"role": "user", "content": text})
        reply = self.client.chat(self.model, self.messages, self.conversation_id, **{**self.params, **params})
        assert isinstance(reply, Completion)
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply

    def drop(self) -> bool:
        """Forget the manager's cached state of this conversation (the messages here stay)."""
        return self.client.drop_conversation(self.model, self.conversation_id)

    def stream(self, text: str, **params: Any) -> Iterator[str]:
        """Yield the reply's pieces; the full reply joins the history once the stream ends."""
        self.messages.append({"role": "user", "content": text})
        stream = self.client.chat(
            self.model, self.messages, self.conversation_id, stream=True, **{**self.params, **params}
        )
        assert isinstance(stream, Stream)
        pieces = []
        for piece in stream:
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
