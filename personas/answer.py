"""What a persona asks its model for one turn: the prompt (a chat, or a Q/A transcript for a base model), the
sampling settings and a stable ``conversation_id``. Shared by the persona agents and the Wyoming service, so a
persona answers the same way whichever door the question came in by."""

from __future__ import annotations

from typing import Any

import msgspec

from model_client.errors import InsufficientMemory, ModelFailed, ModelLoadFailed, ModelNotFound
from personas.config import Persona

UNSERVABLE = (ModelLoadFailed, InsufficientMemory, ModelNotFound, ModelFailed)  # the fallback persona answers
TRANSCRIPT_STOPS = ["\nQuestion:", "\n\n"]


def transcript_prompt(system: str, history: list[dict[str, str]], text: str) -> str:
    """A base model's prompt: the system text, then the session as a question-and-answer transcript. Each turn
    only appends to it, so the manager's KV cache of the conversation still applies."""
    lines = [system.strip(), ""]
    for message in history:
        label = "Question" if message["role"] == "user" else "Answer"
        lines.append(f"{label}: {message['content'].strip()}")
        if label == "Answer":
            lines.append("")
    lines += [f"Question: {text.strip()}", "Answer:"]
    return "\n".join(lines)


def generation_request(
    persona: Persona, history: list[dict[str, str]], text: str, conversation_id: str
) -> tuple[str, dict[str, Any]]:
    """The manager op (``chat`` or ``complete``) and its arguments for one turn of ``persona``."""
    generation = {k: v for k, v in msgspec.structs.asdict(persona.generation).items() if v is not None}
    if persona.prompt_style == "transcript":
        prompt = transcript_prompt(persona.system_prompt, history, text)
        args = {"model": persona.model, "prompt": prompt, "stop": TRANSCRIPT_STOPS}
        return "complete", {**args, "conversation_id": conversation_id, **generation}
    messages = [{"role": "system", "content": persona.system_prompt}, *history, {"role": "user", "content": text}]
    return "chat", {"model": persona.model, "messages": messages, "conversation_id": conversation_id, **generation}
