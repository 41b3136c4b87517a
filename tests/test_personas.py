"""Routing, the personas' YAML, and how a streamed reply is cut into spoken pieces (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agents.config import Persona, Routing, load_agents_config, route
from agents.pieces import SpeechPieces
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
