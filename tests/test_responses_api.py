"""OpenAI's Responses API through the gateway, real end to end with the ``openai`` package: create, stream,
continue by ``previous_response_id`` on the conversation's KV cache, retrieve (across a gateway restart), delete,
function calls, and what is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from gateway.response_store import ResponseStore, StoredResponse
from tests.test_gateway import WEATHER, Stack, running_stack, start_gateway

GREEDY = {"temperature": 0, "max_output_tokens": 24}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": WEATHER,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack({"responses_dir": str(tmp_path_factory.mktemp("responses"))}) as running:
        yield running


def test_a_response_continues_by_its_id_on_the_cached_conversation(stack: Stack) -> None:
    first = stack.openai.responses.create(
        model="smollm2", instructions="You are terse.", input="What is the capital of France?", **GREEDY
    )
    assert first.id.startswith("resp_") and first.status in ("completed", "incomplete") and first.output_text
    assert first.usage is not None and first.usage.input_tokens > 10 and first.usage.output_tokens >= 1
    second = stack.openai.responses.create(
        model="smollm2",
        instructions="You are terse.",
        input="And of Germany?",
        previous_response_id=first.id,
        **GREEDY,
    )
    assert second.previous_response_id == first.id and second.output_text
    assert second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens, "the history came along"
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens, "turn 1 was not evaluated again"
    again = stack.openai.responses.retrieve(second.id)
    assert again.output_text == second.output_text and again.usage.input_tokens == second.usage.input_tokens


def test_a_streamed_response_sends_openais_events_in_order(stack: Stack) -> None:
    events = list(
        stack.openai.responses.create(model="smollm2", input="Count from one to five.", stream=True, **GREEDY)
    )
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(1, len(events) + 1))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and deltas == final.output_text == stack.openai.responses.retrieve(final.id).output_text
    with stack.openai.responses.stream(model="smollm2", input="Say hello.", **GREEDY) as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        assert stream.get_final_response().output_text == text


def test_a_function_call_goes_out_and_its_result_comes_back(stack: Stack) -> None:
    call_reply = stack.openai.responses.create(
        model="smollm2",
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=64,
    )
    [call] = call_reply.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    answer = stack.openai.responses.create(
        model="smollm2",
        previous_response_id=call_reply.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny", "celsius": 21}'}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        **GREEDY,
    )
    assert answer.output[0].type == "message" and answer.output_text
    assert answer.usage is not None and answer.usage.input_tokens_details.cached_tokens > 0


def test_unknown_ids_unstored_responses_and_unserved_input_are_refused(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError):
        stack.openai.responses.retrieve("resp_" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        stack.openai.responses.retrieve("../../etc/passwd")
    with pytest.raises(openai.NotFoundError, match="previous_response_id|no stored response"):
        stack.openai.responses.create(model="smollm2", input="Hi", previous_response_id="resp_" + "1" * 32, **GREEDY)
    unstored = stack.openai.responses.create(model="smollm2", input="Hi", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        stack.openai.responses.retrieve(unstored.id)
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        stack.openai.responses.create(model="smollm2", input=image, **GREEDY)
    with pytest.raises(openai.BadRequestError, match="only function tools"):
        stack.openai.responses.create(model="smollm2", input="Hi", tools=[{"type": "web_search"}], **GREEDY)
    with pytest.raises(openai.BadRequestError, match="background"):
        stack.openai.responses.create(model="smollm2", input="Hi", background=True, **GREEDY)
    for body in (b"{", b'{"model": "smollm2", "input": 5}', b'{"model": "smollm2", "input": [{"type": "x"}]}'):
        reply = httpx.post(f"{stack.url}/v1/responses", content=body, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["message"], body
    gone = stack.openai.responses.create(model="smollm2", input="Hi", **GREEDY)
    assert stack.openai.responses.delete(gone.id) is None
    with pytest.raises(openai.NotFoundError):
        stack.openai.responses.retrieve(gone.id)
    assert stack.openai.models.list().data, "the gateway keeps serving"


def test_stored_responses_survive_a_gateway_restart(stack: Stack) -> None:
    kept = stack.openai.responses.create(model="smollm2", input="Name a colour.", **GREEDY)
    other, url = start_gateway(stack.manager, stack.manager.config_path, "gateway-2")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert client.responses.retrieve(kept.id).output_text == kept.output_text
        follow = client.responses.create(model="smollm2", input="Another one.", previous_response_id=kept.id, **GREEDY)
        assert follow.usage is not None and follow.usage.input_tokens_details.cached_tokens > 0
    finally:
        other.stop(timeout=10)


def test_the_store_keeps_at_most_its_limit_and_refuses_foreign_names(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, max_stored=10)
    ids = [f"resp_{i:032x}" for i in range(25)]
    for response_id in ids:
        store.put(response_id, StoredResponse(response={"id": response_id}, conversation_id="c", messages=[]))
    files = sorted(path.stem for path in tmp_path.glob("resp_*.json"))
    assert len(files) <= 10 and ids[-1] in files and ids[0] not in files
    reopened = ResponseStore(tmp_path, max_stored=10)
    assert reopened.get(ids[-1]) is not None and reopened.get(ids[0]) is None
    assert reopened.get("resp_../x") is None and not reopened.delete("../" + ids[-1])
