"""Routing, the personas' YAML, and how a streamed reply is cut into spoken pieces (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from model_client.errors import BadRequest, ModelFailed, ModelLoadFailed, ModelNotFound
from model_client.results import Completion, Timings, Usage
from personas.config import Persona, Routing, load_agents_config, route
from personas.history import Histories
from personas.pieces import SpeechPieces
from personas.turn import PersonaTurn, Piece
from tests.conftest import SHIPPED_CONFIG

PERSONAS = {
    "jarvis": Persona(model="smollm2", system_prompt="quick", display_name="Jarvis", wake_words=["hey jarvis"]),
    "leonardo": Persona(model="gemma3-270m", system_prompt="deep", display_name="Leonardo"),
}
ROUTING = Routing(
    default="jarvis", analysis="leonardo", analysis_keywords=["compare", "explain why"], long_request_words=12
)


@pytest.mark.parametrize(
    ("text", "persona", "reason"),
    [
        ("Jarvis, compare these two laptops.", "jarvis", "wake_word"),  # the name first beats the keyword
        ("hey Leonardo, what time is it?", "leonardo", "wake_word"),
        ("Hey Jarvis what's up", "jarvis", "wake_word"),
        ("Can you compare Python and Rust?", "leonardo", "analysis_keyword"),
        ("Explain why the sky is blue.", "leonardo", "analysis_keyword"),
        (
            "I wonder if you could tell me a little about the history of this old town please",
            "leonardo",
            "long_request",
        ),
        ("What time is it?", "jarvis", "default"),
        ("Tell me about Jarvis.", "jarvis", "default"),  # a name later in the sentence is no wake word
        ("Whyever not?", "jarvis", "default"),  # keywords match whole words only
    ],
)
def test_routing_rule(text: str, persona: str, reason: str) -> None:
    chosen = route(text, PERSONAS, ROUTING)
    assert (chosen.persona, chosen.reason) == (persona, reason)


def test_an_explicit_persona_wins_and_must_exist() -> None:
    assert route("Jarvis, hello", PERSONAS, ROUTING, explicit="leonardo").persona == "leonardo"
    with pytest.raises(ValueError, match="unknown persona"):
        route("hello", PERSONAS, ROUTING, explicit="nobody")


def test_the_shipped_personas_validate_and_name_catalogue_models() -> None:
    config = load_agents_config(SHIPPED_CONFIG)
    assert set(config.personas) == {"jarvis", "leonardo"}
    models = yaml.safe_load(SHIPPED_CONFIG.read_text())["models"]
    for name, persona in config.personas.items():
        assert models[persona.model]["kind"] == "llm", name
        assert models[persona.voice]["kind"] == "tts", name
        assert persona.fallback in config.personas
    assert config.routing.default == "jarvis" and config.routing.analysis == "leonardo"
    assert config.requests_endpoint("jarvis").endswith("/run/agent-jarvis.sock")


def test_a_routing_to_an_unknown_persona_is_a_config_error(tmp_path: Path) -> None:
    data = yaml.safe_load(SHIPPED_CONFIG.read_text())
    data["routing"]["analysis"] = "sherlock"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="routing.analysis names 'sherlock'"):
        load_agents_config(path)
    data["routing"]["analysis"] = "leonardo"
    data["personas"]["jarvis"]["temprature"] = 0.1
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="temprature"):
        load_agents_config(path)


def test_speech_pieces_start_early_and_end_at_sentences() -> None:
    pieces = SpeechPieces(first_piece_words=4)
    stream = ["Well, the capital", " of France, as you", " know, is Paris. It is", " lovely!", " **Bye**"]
    out = [p for token in stream for p in pieces.feed(token)]
    assert out == ["Well, the capital of France,", "as you know, is Paris.", "It is lovely!"]
    assert pieces.flush() == "Bye"  # markdown marks are not read out
    assert pieces.count == 4


def test_speech_pieces_skip_what_cannot_be_spoken() -> None:
    pieces = SpeechPieces()
    assert pieces.feed("... ") == []
    assert pieces.feed("*** \n") == []
    assert pieces.flush() is None and pieces.count == 0


# ----- the transport-free turn ------------------------------------------------------------------------------------


def completion(text: str, model: str) -> Completion:
    usage, timings = Usage(prompt_tokens=9, completion_tokens=3), Timings(ttft_ms=1.0, total_ms=2.0, tokens_per_s=1.0)
    return Completion(text=text, finish_reason="stop", model=model, usage=usage, timings=timings)


def test_a_turn_speaks_as_it_streams_and_the_session_keeps_it(tmp_path: Path) -> None:
    config = load_agents_config(SHIPPED_CONFIG)
    histories = Histories(tmp_path, 24, "jarvis")
    turn = PersonaTurn(config.personas, histories, "jarvis", "kitchen", "What is the capital of France?", 4)
    op, args = turn.request()
    assert op == "chat" and args["model"] == "smollm2" and args["conversation_id"] == "jarvis:kitchen"
    assert turn.feed("The capital of France, ") == [Piece(0, "The capital of France,")], "the first ends early"
    assert turn.take_written() == "The capital of France, "
    assert turn.feed("as you know, is Paris. ") == [Piece(1, "as you know, is Paris.")], "later ones: sentences"
    assert turn.feed("Bye") == [] and turn.take_written() == "as you know, is Paris. Bye"
    assert turn.flush() == Piece(2, "Bye")
    answer = turn.finish(completion(" The capital of France, as you know, is Paris. Bye ", "smollm2"))
    assert (answer.answered_by, answer.parts, answer.fallback) == ("jarvis", 3, None)
    assert Histories(tmp_path, 24, "jarvis").get("kitchen")[-2:] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France, as you know, is Paris. Bye"},
    ]
    again = PersonaTurn(config.personas, histories, "jarvis", "kitchen", "And Germany?", 4)
    assert again.request()[1]["messages"][-3]["content"] == "What is the capital of France?", "turn 2 has turn 1"


def test_one_chunk_that_completes_several_pieces_numbers_each(tmp_path: Path) -> None:
    """A chunk carries every token since the last one: it can end two sentences, each spoken as its own part."""
    config = load_agents_config(SHIPPED_CONFIG)
    turn = PersonaTurn(config.personas, Histories(tmp_path, 24, "jarvis"), "jarvis", "s", "Hi", 4)
    turn.request()
    pieces = turn.feed("Hello there, my friend. How are you today? I am fine. ")
    assert [p.number for p in pieces] == [0, 1, 2] and pieces[-1].text == "I am fine."
    assert turn.flush() is None and turn.feed("Good. ") == [Piece(3, "Good.")]


def test_an_unservable_model_hands_the_turn_to_the_fallback_once_and_only_before_speech(tmp_path: Path) -> None:
    config = load_agents_config(SHIPPED_CONFIG)
    histories = Histories(tmp_path, 24, "jarvis")
    turn = PersonaTurn(config.personas, histories, "jarvis", "s", "Hello", 4)
    assert not turn.fall_back(BadRequest("a bad argument is not a reason to fall back"))
    assert turn.fall_back(ModelLoadFailed("no memory for smollm2"))
    op, args = turn.request()
    leonardo = config.personas["leonardo"]
    assert turn.answering == "leonardo" and args["model"] == leonardo.model and args["conversation_id"] == "leonardo:s"
    assert not turn.fall_back(ModelNotFound("and the fallback's model is gone too")), "once"
    answer = turn.finish(completion("Hi.", leonardo.model))
    assert answer.answered_by == "leonardo" and answer.fallback is not None and answer.fallback["from"] == "jarvis"
    assert histories.get("s")[-1]["content"] == "Hi.", "the routed persona's session keeps the fallback's answer"
    spoke = PersonaTurn(config.personas, histories, "jarvis", "t", "Hello", 4)
    spoke.request()
    spoke.feed("Hello there. ")
    assert not spoke.fall_back(ModelFailed("died mid-answer")), "no second voice after the first has spoken"


def test_an_answer_spoken_over_keeps_only_what_was_said(tmp_path: Path) -> None:
    config = load_agents_config(SHIPPED_CONFIG)
    histories = Histories(tmp_path, 24, "jarvis")
    turn = PersonaTurn(config.personas, histories, "jarvis", "s", "Tell me a story.", 4)
    turn.request()
    said = [p.text for p in turn.feed("Once upon a time, there was a dragon. It liked to cook. ")]
    turn.interrupted(" ".join(said[:1]))  # the person spoke after the first piece
    assert histories.get("s")[-2:] == [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once upon a time,"},
    ]
    silent = PersonaTurn(config.personas, histories, "jarvis", "t", "Hello?", 4)
    silent.interrupted("")
    assert histories.get("t") == [], "nothing said: no turn kept"
