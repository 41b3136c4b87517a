"""The HTTP gateway, real end to end: the manager and the gateway as processes, the real models, and the clients
people point at it (the official ``openai`` and ``ollama`` packages; ``httpx`` for what they cannot send)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import httpx
import jsonschema
import numpy as np
import ollama
import openai
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from daemonkit.settings import ConfigError
from gateway.app import build_app
from gateway.config import GatewaySettings, load_gateway_settings
from model_client import ModelClient, protocol
from tests.conftest import DaemonProcess, ManagerProcess, base_config, model_status, wait_for
from tests.test_speech import wer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


class Stack:
    def __init__(self, manager: ManagerProcess, url: str, proc: subprocess.Popen) -> None:
        self.manager, self.url, self.proc = manager, url, proc
        self.openai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.ollama = ollama.Client(host=url, timeout=120)

    def client(self) -> ModelClient:
        return self.manager.client(timeout=120)


def start_gateway(manager: ManagerProcess, config_path: Path, name: str = "gateway") -> tuple[DaemonProcess, str]:
    """The gateway on ``config_path`` (port 0: any free one), once it listens: the process and its URL."""
    ports_file = manager.run_dir / f"{name}.ports.json"
    gateway = DaemonProcess(
        "gateway", config_path, manager.endpoint, manager.run_dir / f"{name}.log", "--ports-file", str(ports_file)
    )
    gateway.start(wait=False)
    return gateway, f"http://127.0.0.1:{gateway.wait_ports(ports_file)['http']}"


@contextlib.contextmanager
def running_stack(gateway_settings: dict, make_config: Callable[[Path], dict] = base_config) -> Iterator[Stack]:
    """The manager (``make_config``'s catalogue, with a ``parallel: 4`` SmolLM2) and a gateway with
    ``gateway_settings``."""
    run_dir = Path(tempfile.mkdtemp(prefix="mm-"))
    config = make_config(run_dir)
    config["gateway"] = {"port": 0, **gateway_settings}
    config["models"]["smollm2-batched"] = {**config["models"]["smollm2"], "parallel": 4}
    manager = ManagerProcess(run_dir, config)
    gateway: DaemonProcess | None = None
    try:
        manager.start()
        gateway, url = start_gateway(manager, manager.config_path)
        assert gateway.proc is not None
        yield Stack(manager, url, gateway.proc)
    finally:
        if gateway is not None:
            gateway.stop(timeout=10)
        manager.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack({}) as running:
        yield running


# ----- OpenAI ---------------------------------------------------------------------------------------------------


def test_the_model_list_comes_from_the_catalogue_and_loads_nothing(stack: Stack) -> None:
    ids = {m.id for m in stack.openai.models.list()}
    assert {"smollm2", "gemma3-270m", "whisper", "joe"} <= ids
    assert stack.openai.models.retrieve("smollm2").id == "smollm2"
    with stack.client() as c:
        assert all(m["state"] == "unloaded" for m in c.status()["models"])
    with pytest.raises(openai.NotFoundError):
        stack.openai.models.retrieve("no-such-model")


def test_a_chat_at_temperature_zero_is_the_managers_own_reply(stack: Stack) -> None:
    reply = stack.openai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16, temperature=0)
    with stack.client() as c:
        direct = c.chat("smollm2", QUESTION, max_tokens=16, temperature=0.0)
    assert reply.choices[0].message.content == direct.text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == direct.usage.prompt_tokens and reply.usage.completion_tokens > 0


def test_llama_cpps_sampling_fields_reach_the_engine(stack: Stack) -> None:
    """top_k, min_p and repeat_penalty, as llama-server takes them: top_k 1 at temperature 1.5 is the greedy reply
    (top_k 40, the default, would draw from 40 tokens); a value out of range is a 400 naming the field."""
    greedy = stack.openai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16, temperature=0)
    extra = {"top_k": 1, "min_p": 0.0, "repeat_penalty": 1.0}
    hot = stack.openai.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=16, temperature=1.5, seed=7, extra_body=extra
    )
    assert hot.choices[0].message.content == greedy.choices[0].message.content
    for field, value in (("top_k", -1), ("min_p", 2.0), ("repeat_penalty", 0.0)):
        with pytest.raises(openai.BadRequestError) as bad:
            stack.openai.chat.completions.create(model="smollm2", messages=QUESTION, extra_body={field: value})
        assert bad.value.body["param"] == field


def test_a_stream_follows_openais_order_and_ends_with_usage(stack: Stack) -> None:
    stream = stack.openai.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] == len(chunks) - 2, "the finish reason, then the usage chunk"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = stack.openai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16, temperature=0)
    assert text == whole.choices[0].message.content


def test_structured_output_validates_against_its_schema(stack: Stack) -> None:
    reply = stack.openai.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Invent a person: give a name and an age as JSON."}],
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def test_completions_and_a_conversation_header_reuse_the_cache(stack: Stack) -> None:
    text = stack.openai.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8)
    assert text.object == "text_completion" and text.choices[0].text
    history = list(QUESTION)
    headers = {"X-Conversation-Id": "gateway-talk"}
    first = stack.openai.chat.completions.create(
        model="smollm2", messages=history, max_tokens=12, temperature=0, extra_headers=headers
    )
    history += [{"role": "assistant", "content": first.choices[0].message.content}, QUESTION[0]]
    second = stack.openai.chat.completions.create(
        model="smollm2", messages=history, max_tokens=12, temperature=0, extra_headers=headers
    )
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_errors_are_typed_and_the_gateway_stays_up(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError):
        stack.openai.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as bad:
        stack.openai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens="many")  # type: ignore[arg-type]
    assert bad.value.body["param"] == "max_tokens"
    long = [{"role": "user", "content": "Tell me about the sea. " * 200}]
    with pytest.raises(openai.BadRequestError) as overflow:
        stack.openai.chat.completions.create(model="smollm2-small-ctx", messages=long, max_tokens=8)
    assert overflow.value.code == "context_length_exceeded"
    for body, status in ((b"{not json", 400), (b'{"model": "smollm2"}', 400), (b"x" * (33 * 1024 * 1024), 413)):
        answer = httpx.post(f"{stack.url}/v1/chat/completions", content=body, timeout=30)
        assert answer.status_code == status and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{stack.url}/v1/models", timeout=10).status_code == 200


def test_a_client_that_hangs_up_cancels_its_generation(stack: Stack) -> None:
    counting = "Count from 1 to 500, separated by commas: 1, 2, 3,"  # greedy: it goes on to max_tokens
    body = {"model": "smollm2", "messages": [{"role": "user", "content": counting}], "stream": True}
    body |= {"max_tokens": 500, "temperature": 0}
    log = stack.manager.log_path
    before = len(log.read_text())
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=60) as answer:
        next(answer.iter_lines())
    # The manager logs the cancel when its next chunk for the request finds the gateway's socket closed.
    wait_for(lambda: "client_gone" in log.read_text()[before:], timeout=60)
    with stack.client() as c:
        wait_for(lambda: model_status(c, "smollm2")["in_flight"] == 0, timeout=60)


# ----- Ollama ---------------------------------------------------------------------------------------------------


def test_ollama_lists_shows_and_pulls_only_catalogue_models(stack: Stack) -> None:
    names = {m.model for m in stack.ollama.list().models}
    assert "smollm2" in names and "whisper" not in names, "Ollama lists language models"
    shown = stack.ollama.show("smollm2:latest")
    assert shown.details.quantization_level == "Q4_1" and "completion" in shown.capabilities
    assert stack.ollama.pull("smollm2").status == "success"
    with pytest.raises(ollama.ResponseError) as missing:
        stack.ollama.pull("llama3:70b")
    assert missing.value.status_code == 404
    assert httpx.get(stack.url, timeout=5).text == "Ollama is running"


def test_ollama_chat_streams_and_generate_answers(stack: Stack) -> None:
    pieces = list(
        stack.ollama.chat("smollm2", messages=QUESTION, stream=True, options={"temperature": 0, "num_predict": 24})
    )
    assert pieces[-1].done and pieces[-1].eval_count > 0
    text = "".join(p.message.content for p in pieces)
    with stack.client() as c:
        assert text == c.chat("smollm2", QUESTION, max_tokens=24, temperature=0.0).text
    shaped = stack.ollama.chat("smollm2", messages=QUESTION, format=PERSON, options={"temperature": 0})
    jsonschema.validate(json.loads(shaped.message.content), PERSON)
    generated = stack.ollama.generate("smollm2", "The capital of France is", options={"num_predict": 8})
    assert generated.done and generated.response
    assert "smollm2" in {m.model for m in stack.ollama.ps().models}


def test_ollama_keep_alive_zero_unloads_the_model(stack: Stack) -> None:
    stack.ollama.generate("gemma3-270m", "Hello", options={"num_predict": 2}, keep_alive="0s")
    with stack.client() as c:
        assert model_status(c, "gemma3-270m")["state"] in ("unloading", "unloaded")
        wait_for(lambda: model_status(c, "gemma3-270m")["state"] == "unloaded", timeout=60)


# ----- OpenAI's audio ---------------------------------------------------------------------------------------------

SENTENCE = "Please turn off the lights in the kitchen before you go to bed."
SPEECH_FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"]


def seconds_of(data: bytes, fmt: str) -> float:
    if fmt == "pcm":
        return len(data) / 2 / 24_000  # OpenAI's pcm: 24 kHz s16 mono
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)) / stream.rate


def test_speech_comes_in_every_format_and_speed_two_is_shorter(stack: Stack) -> None:
    lengths = {}
    for fmt in SPEECH_FORMATS:
        made = stack.openai.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE, response_format=fmt)
        lengths[fmt] = seconds_of(made.content, fmt)
    assert 1.5 < lengths["wav"] < 10, lengths
    # Each request is synthesized anew and Piper varies its timing a little (noise_w): within a quarter, a format
    # at a wrong sample rate would be off by 2x or more.
    assert all(abs(s - lengths["wav"]) < 0.25 * lengths["wav"] for s in lengths.values()), str(lengths)
    fast = stack.openai.audio.speech.create(model="tts-1", voice="joe", input=SENTENCE, response_format="wav", speed=2)
    assert seconds_of(fast.content, "wav") < 0.8 * min(lengths.values()), "the pauses between words do not scale"
    voices = httpx.get(f"{stack.url}/v1/audio/voices", timeout=10).json()["voices"]
    assert [v["id"] for v in voices] == ["joe"]


def test_a_transcription_in_every_format_gives_the_words_back(stack: Stack) -> None:
    spoken = stack.openai.audio.speech.create(model="tts-1", voice="joe", input=SENTENCE, response_format="flac")
    upload = ("question.flac", spoken.content)
    heard = {}
    for fmt in ("json", "verbose_json", "text", "srt", "vtt"):
        result = stack.openai.audio.transcriptions.create(
            model="whisper-1", file=upload, response_format=fmt, language="en", timestamp_granularities=["word"]
        )
        heard[fmt] = result if isinstance(result, str) else result.text
    assert heard["srt"].startswith("1\n00:00:0") and heard["vtt"].startswith("WEBVTT\n\n00:00:0")
    assert " --> " in heard["srt"] and "," in heard["srt"].splitlines()[1] and "." in heard["vtt"].splitlines()[2]
    for fmt in ("srt", "vtt"):
        lines = [line for line in heard[fmt].splitlines() if line and "-->" not in line and not line.isdigit()]
        heard[fmt] = " ".join(line for line in lines if line != "WEBVTT")
    for fmt, text in heard.items():
        assert wer(SENTENCE, text) < 0.2, (fmt, text)
    detailed = stack.openai.audio.transcriptions.create(
        model="whisper-1", file=upload, response_format="verbose_json", timestamp_granularities=["word"]
    )
    assert detailed.duration > 1.5 and detailed.segments and len(detailed.words) >= 8


def test_bad_audio_requests_get_openai_errors(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as voice:
        stack.openai.audio.speech.create(model="tts-1", voice="nobody", input=SENTENCE)
    assert voice.value.body["param"] == "voice"
    for request in (
        {"data": {"model": "whisper-1"}, "files": {"other": ("x.txt", b"hello")}},  # a form without `file`
        {"json": {"model": "whisper-1"}},  # not multipart at all
        {"data": {"model": "whisper-1"}, "files": {"file": ("noise.wav", b"RIFF not really audio")}},
    ):
        answer = httpx.post(f"{stack.url}/v1/audio/transcriptions", timeout=30, **request)
        assert answer.status_code == 400, answer.text
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{stack.url}/v1/audio/models", timeout=10).status_code == 200


# ----- admission and keys -----------------------------------------------------------------------------------------


def test_a_full_queue_is_a_429_with_retry_after(stack: Stack) -> None:
    holders = [stack.client() for _ in range(3)]
    long = [{"role": "user", "content": "Count from 1 to 300, separated by commas: 1, 2, 3,"}]  # greedy: it goes on
    try:
        running = iter(holders[0].chat("smollm2-short-queue", long, stream=True, max_tokens=400, temperature=0.0))
        next(running)  # the first runs; the next two are sent and left waiting in its queue of two
        for holder in holders[1:]:
            args = {
                "model": "smollm2-short-queue",
                "messages": long,
                "max_tokens": 400,
                "stream": True,
                "temperature": 0.0,
            }
            holder.connection.send(protocol.Request(op="chat", args=args))
        with stack.client() as c:
            wait_for(lambda: model_status(c, "smollm2-short-queue")["queued"] == 2, timeout=60)
        with pytest.raises(openai.RateLimitError) as busy:
            stack.openai.chat.completions.create(model="smollm2-short-queue", messages=QUESTION, max_tokens=4)
        assert int(busy.value.response.headers["retry-after"]) >= 1
        assert busy.value.code == "rate_limit_exceeded"
    finally:
        for holder in holders:
            holder.close()


def test_api_keys_guard_every_route(stack: Stack) -> None:
    keyed = GatewaySettings(api_keys=["k" * 32])
    # On a loopback host name, as a local client names it (TestClient's own "testserver" is no host of ours).
    with TestClient(build_app(keyed, stack.manager.endpoint), base_url="http://127.0.0.1") as web:
        assert web.get("/v1/models").status_code == 401
        assert web.get("/v1/models", headers={"Authorization": "Bearer " + "x" * 32}).status_code == 401
        answer = web.get("/api/tags")
        assert answer.status_code == 401 and "error" in answer.json()
        assert web.get("/v1/models", headers={"Authorization": "Bearer " + "k" * 32}).status_code == 200
        with (
            pytest.raises(WebSocketDisconnect) as refused,
            web.websocket_connect("ws://127.0.0.1/v1/realtime?model=smollm2"),
        ):
            pass
        assert refused.value.code == 1008, "the Realtime API's WebSocket needs the key too"
        with web.websocket_connect(
            "ws://127.0.0.1/v1/realtime?model=smollm2", headers={"Authorization": "Bearer " + "k" * 32}
        ) as ws:
            assert ws.receive_json()["type"] == "session.created"
    with pytest.raises(ConfigError, match="api_keys"):
        path = stack.manager.run_dir / "open.yaml"
        path.write_text("gateway: {host: 0.0.0.0}\n")
        load_gateway_settings(path)


# ----- tools -------------------------------------------------------------------------------------------------------

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "lights_off", "description": "Turn off the lights in a room."}},
]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_forced_tool_call_has_arguments_that_validate(stack: Stack) -> None:
    for model in ("smollm2", "smollm2-batched"):
        reply = stack.openai.chat.completions.create(
            model=model,
            messages=ASK_WEATHER,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=0,
            max_tokens=64,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_auto_tools_answer_or_call_and_the_result_goes_back_into_the_talk(stack: Stack) -> None:
    history: list[dict] = list(ASK_WEATHER)
    for _ in range(2):
        reply = stack.openai.chat.completions.create(
            model="smollm2", messages=history, tools=TOOLS, temperature=0, max_tokens=64, stream=True
        )
        chunks = list(reply)
        finish = chunks[-1].choices[0].finish_reason
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        if finish == "tool_calls":
            [call] = calls
            assert call.function.name in {"get_weather", "lights_off"}
            assert isinstance(json.loads(call.function.arguments), dict)
            history.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.function.name, "arguments": call.function.arguments},
                        }
                    ],
                }
            )
            history.append({"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'})
        else:
            assert finish == "stop" and text and not calls
            history += [{"role": "assistant", "content": text}, {"role": "user", "content": "And in Rome?"}]


def test_ollama_chat_with_tools_and_bad_tool_requests(stack: Stack) -> None:
    for stream in (False, True):
        if stream:
            options = {"temperature": 0, "num_predict": 64}
            parts = list(stack.ollama.chat("smollm2", messages=ASK_WEATHER, tools=TOOLS, stream=True, options=options))
            assert parts[-1].done
            calls = [call for part in parts for call in part.message.tool_calls or []]
            content = "".join(part.message.content or "" for part in parts)
        else:
            options = {"temperature": 0, "num_predict": 64}
            answer = stack.ollama.chat("smollm2", messages=ASK_WEATHER, tools=TOOLS, options=options)
            calls, content = answer.message.tool_calls or [], answer.message.content
        if calls:
            assert calls[0].function.name in {"get_weather", "lights_off"}
            assert isinstance(calls[0].function.arguments, dict)
        else:
            assert content
    shaped = list(
        stack.ollama.chat("smollm2", messages=QUESTION, format=PERSON, stream=True, options={"num_predict": 64})
    )
    jsonschema.validate(json.loads("".join(part.message.content for part in shaped)), PERSON)
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        stack.openai.chat.completions.create(
            model="smollm2",
            messages=ASK_WEATHER,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "x"}},
        )
    with pytest.raises(openai.BadRequestError, match="not both"):
        stack.openai.chat.completions.create(
            model="smollm2",
            messages=ASK_WEATHER,
            tools=TOOLS,
            tool_choice="required",
            response_format={"type": "json_object"},
        )
    with pytest.raises(openai.BadRequestError, match="no tools"):
        stack.openai.chat.completions.create(model="smollm2", messages=ASK_WEATHER, tool_choice="required")


# ----- embeddings --------------------------------------------------------------------------------------------------


def test_embeddings_are_unit_vectors_that_put_like_with_like(stack: Stack) -> None:
    texts = ["The cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    for model in ("smollm2", "smollm2-batched"):
        answer = stack.openai.embeddings.create(model=model, input=texts)  # the SDK asks for base64 and decodes it
        vectors = np.array([item.embedding for item in answer.data])
        assert vectors.shape == (3, 576) and answer.usage.prompt_tokens > 10
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
        similar, unlike = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
        assert similar > unlike + 0.05, (model, similar, unlike)
    plain = stack.openai.embeddings.create(model="smollm2", input=texts[0], encoding_format="float")
    assert np.allclose(plain.data[0].embedding, vectors[0], atol=1e-3)
    ollama_vectors = stack.ollama.embed("smollm2", texts).embeddings
    assert np.allclose(np.array(ollama_vectors), vectors, atol=1e-3)
    with stack.client() as c:
        assert np.allclose(c.embed("smollm2", texts[2]), vectors[2:], atol=1e-3)
    with pytest.raises(openai.BadRequestError):
        stack.openai.embeddings.create(model="smollm2", input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="tokens, over"):
        stack.openai.embeddings.create(model="smollm2", input="word " * 600)
    with pytest.raises(openai.NotFoundError):
        stack.openai.embeddings.create(model="no-such-model", input="x")


# ----- LangChain ---------------------------------------------------------------------------------------------------


def test_langchain_chat_openai_invokes_streams_and_structures(stack: Stack) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(
        base_url=f"{stack.url}/v1", api_key="unused", model="smollm2", temperature=0, max_tokens=24, max_retries=0
    )
    answer = llm.invoke("What is the capital of France?")
    assert answer.content and answer.usage_metadata["output_tokens"] > 0
    pieces = list(llm.stream("What is the capital of France?", stream_usage=True))
    assert "".join(p.content for p in pieces) == answer.content
    assert sum((p.usage_metadata or {}).get("output_tokens", 0) for p in pieces) > 0

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=150)

    longer = ChatOpenAI(
        base_url=f"{stack.url}/v1", api_key="unused", model="smollm2", temperature=0, max_tokens=64, max_retries=0
    )
    for method in ("json_schema", "function_calling"):
        person = longer.with_structured_output(Person, method=method).invoke("Invent a person with a name and an age.")
        assert isinstance(person, Person), method
