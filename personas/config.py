"""Personas, routing and the agents' sockets: the ``personas``, ``routing`` and ``agents`` sections of the YAML,
shared by the persona agents and by ``mm talk``.

Routing decides which persona answers an utterance, the same way in every agent process (each agent answers only
what routes to it):

1. An explicit persona (``mm talk --persona``) wins.
2. A wake word at the start of the utterance: a persona's name or one of its ``wake_words``, optionally after a
   greeting (``hey``, ``ok``, ...). "Jarvis, what time is it?" goes to Jarvis.
3. The heuristic: an utterance with one of ``routing.analysis_keywords`` (as whole words or phrases), or at
   least ``routing.long_request_words`` words, needs analysis and goes to ``routing.analysis``.
4. Everything else is chat and goes to ``routing.default``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from daemonkit.settings import Section, convert, read_sections, resolve_path
from model_client.endpoints import config_path, resolve_endpoint
from model_client.protocol import NoArgs, OpArgs

TOPIC_HEARTBEAT = "agent.heartbeat"  # agent PUB: {persona, pid, uptime_s}; at once to a new subscriber
TOPIC_REPLY = "agent.reply"  # agent PUB: {persona, answered_by, session_id, turn_id, text, usage, timings, ...}
GREETINGS = ("hey", "hi", "hello", "ok", "okay", "yo", "dear")


class Generation(Section):
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 128
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] = 0.3
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 40
    repeat_penalty: Annotated[float, msgspec.Meta(ge=0.0)] = 1.1
    seed: int | None = None


class Persona(Section):
    model: str  # an llm of the catalogue
    system_prompt: str
    # chat: the model's chat template (instruction-tuned models). transcript: a plain-text "Question: / Answer:"
    # transcript after the system prompt, completed with `complete` (base models, which a chat template confuses).
    prompt_style: Literal["chat", "transcript"] = "chat"
    display_name: str = ""
    description: str = ""
    voice: str | None = None  # a tts voice of the catalogue; None: the TTS service's default
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0
    wake_words: list[str] = []  # besides the persona's name
    generation: Generation = msgspec.field(default_factory=Generation)
    # Where this persona's model should run (e.g. gpu:0, cpu); the agent logs a warning when the manager placed
    # it elsewhere. Placement itself is the model's catalogue entry (gpu, n_gpu_layers).
    device: str | None = None
    fallback: str | None = None  # the persona that answers when this one's model cannot be served


class Routing(Section):
    default: str
    analysis: str | None = None
    analysis_keywords: list[str] = []
    long_request_words: Annotated[int, msgspec.Meta(ge=1)] = 30


class AgentSettings(Section):
    requests: str = "ipc://../run/agent-{persona}.sock"  # ROUTER: ping, agent.ask
    events: str = "ipc://../run/agent-{persona}-events.sock"  # PUB: agent.reply
    history_dir: str | None = "../run/agents"  # each session's messages, kept across restarts
    max_history_messages: Annotated[int, msgspec.Meta(ge=2)] = 24
    manager_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    first_piece_words: Annotated[int, msgspec.Meta(ge=1)] = 4  # the first spoken piece may end at a comma


@dataclass(frozen=True)
class AgentsConfig:
    agents: AgentSettings
    personas: dict[str, Persona]
    routing: Routing

    def requests_endpoint(self, persona: str) -> str:
        return self.agents.requests.replace("{persona}", persona)

    def events_endpoint(self, persona: str) -> str:
        return self.agents.events.replace("{persona}", persona)


def load_agents_config(path: Path | None = None) -> AgentsConfig:
    """The three sections, validated: every persona named in routing and fallbacks must exist."""
    path = path or config_path()
    sections, base = read_sections(path)
    personas = convert(sections.get("personas") or {}, dict[str, Persona], str(path), "$.personas")
    routing = convert(sections.get("routing") or {}, Routing, str(path), "$.routing")
    agents = convert(sections.get("agents") or {}, AgentSettings, str(path), "$.agents")
    named = [("routing.default", routing.default), ("routing.analysis", routing.analysis)]
    named += [(f"personas.{n}.fallback", p.fallback) for n, p in personas.items()]
    for where, name in named:
        if name is not None and name not in personas:
            raise ValueError(f"{where} names {name!r}, which is not a persona ({sorted(personas)})")
    history = str(resolve_path(agents.history_dir, base)) if agents.history_dir else None
    agents = msgspec.structs.replace(
        agents,
        requests=resolve_endpoint(agents.requests, base),
        events=resolve_endpoint(agents.events, base),
        history_dir=history,
    )
    return AgentsConfig(agents=agents, personas=personas, routing=routing)


# ----- routing --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    persona: str
    reason: str  # explicit, wake_word, analysis_keyword, long_request, default
    detail: str = ""


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def route(text: str, personas: dict[str, Persona], routing: Routing, explicit: str | None = None) -> Route:
    if explicit:
        if explicit not in personas:
            raise ValueError(f"unknown persona {explicit!r}")
        return Route(explicit, "explicit")
    words = _words(text)
    start = 1 if words and words[0] in GREETINGS else 0
    for name, persona in personas.items():
        for wake in [name, persona.display_name, *persona.wake_words]:
            wake_words = _words(wake)
            if wake_words and words[start : start + len(wake_words)] == wake_words:
                return Route(name, "wake_word", wake)
    if routing.analysis:
        joined = " " + " ".join(words) + " "
        for keyword in routing.analysis_keywords:
            if f" {' '.join(_words(keyword))} " in joined:
                return Route(routing.analysis, "analysis_keyword", keyword)
        if len(words) >= routing.long_request_words:
            return Route(routing.analysis, "long_request", f"{len(words)} words")
    return Route(routing.default, "default")


# ----- an agent's request socket ---------------------------------------------------------------------------------


class AskArgs(OpArgs, kw_only=True):
    """``agent.ask``: one turn from text, as if it had been heard (the reply is spoken too)."""

    text: Annotated[str, msgspec.Meta(min_length=1)]
    session_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = "default"


AGENT_OPS: dict[str, type[OpArgs]] = {"ping": NoArgs, "agent.ask": AskArgs}
