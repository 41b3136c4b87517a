"""What a request becomes before the engine sees it: the prompt's tokens (the GGUF's chat template, or the YAML's
``chat_format``), its stop strings, the overflow policy applied, and its grammar compiled.

Pure of engine state: the same request gives the same tokens whichever sequence serves it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format
from llama_cpp.llama_chat_format import ChatFormatter, Jinja2ChatFormatter

from model_client.errors import BadRequest, ContextOverflow, ModelLoadFailed
from model_client.results import ContextReport
from model_manager.worker_protocol import ChatRun, GenerationRun

# Used when a GGUF carries no chat template and the YAML names no ``chat_format`` (base models).
FALLBACK_CHAT_FORMAT = "chatml"


def chat_formatter(model: Any, metadata: dict[str, str], chat_format: str | None) -> ChatFormatter:
    """The YAML's ``chat_format`` (a llama-cpp-python format name), else the GGUF's template, else ChatML."""
    template = metadata.get("tokenizer.chat_template")
    if chat_format is None and template:
        eos_id, bos_id = model.token_eos(), model.token_bos()
        eos = model.token_get_text(eos_id) if eos_id >= 0 else ""
        bos = model.token_get_text(bos_id) if bos_id >= 0 else ""
        return Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])
    name = chat_format or FALLBACK_CHAT_FORMAT
    formatter = getattr(llama_chat_format, "format_" + name.replace("-", "_"), None)
    if formatter is None:
        raise ModelLoadFailed(f"unknown chat_format {name!r}", chat_format=name)
    return formatter if keeps_system(formatter) else system_in_first_user_turn(formatter)


SYSTEM_PROBE = "\x01system\x01"


def keeps_system(formatter: ChatFormatter) -> bool:
    """Whether the format writes a system message at all (llama-cpp-python's ``gemma`` drops it silently)."""
    probe = [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
    return SYSTEM_PROBE in formatter(messages=probe).prompt


def system_in_first_user_turn(formatter: ChatFormatter) -> ChatFormatter:
    """A format without a system role gets the system text at the head of the first user turn, a blank line
    between, as llama.cpp's own templates for such models write it (Gemma's): a persona's prompt is never lost."""

    def formatted(messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
        turns = [dict(m) for m in messages if m["role"] != "system"]
        first = next((t for t in turns if t["role"] == "user"), None)
        if system and first is not None:
            first["content"] = f"{system}\n\n{first['content']}"
        elif system:
            turns.insert(0, {"role": "user", "content": system})
        return formatter(messages=turns, **kwargs)

    return formatted


def chat_prompt(
    formatter: ChatFormatter, tokenize: Callable[..., list[int]], n_ctx: int, policy: str | None, args: ChatRun
) -> tuple[list[int], list[str], int]:
    """Tokens of the chat prompt, its stop strings, and how many old turns were dropped: under the ``truncate``
    policy, the oldest turns go until the prompt and the reply fit in ``n_ctx``. The messages are plain turns
    (``tools.prepare`` wrote tool calls and results as text)."""
    messages = [{"role": m.role, "content": m.content} for m in args.messages]
    room = min(args.max_tokens, n_ctx // 2)
    dropped = 0
    while True:
        formatted = formatter(messages=messages)
        stops = [*([formatted.stop] if isinstance(formatted.stop, str) else formatted.stop or []), *args.stop]
        tokens = tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
        if policy != "truncate" or len(tokens) + room <= n_ctx:
            return tokens, stops, dropped
        oldest = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
        if oldest is None:
            return tokens, stops, dropped  # only the system prompt and the last message are left
        del messages[oldest]
        dropped += 1


def prompt_for(
    args: GenerationRun,
    chat: Callable[[ChatRun], tuple[list[int], list[str], int]],
    tokenize: Callable[..., list[int]],
    policy: str | None,
) -> tuple[list[int], list[str], ContextReport]:
    """The prompt's tokens, its stop strings, and the ``context`` report (overflow policy, turns dropped)."""
    context = ContextReport(policy=policy or "error")
    if isinstance(args, ChatRun):
        tokens, stops, context.dropped_messages = chat(args)
    else:
        stops = list(args.stop)
        tokens = tokenize(args.prompt.encode(), add_bos=True, special=False)
    return tokens, stops, context


def check_prompt(tokens: list[int], max_prompt_tokens: int, n_ctx: int, policy: str | None) -> None:
    """Refuse a prompt over the limit, or one that leaves the context no room for a single new token."""
    if len(tokens) > max_prompt_tokens:
        limit = max_prompt_tokens
        raise BadRequest(f"prompt is {len(tokens)} tokens, over the limit of {limit}", max_prompt_tokens=limit)
    if len(tokens) >= n_ctx:
        raise ContextOverflow(
            f"prompt is {len(tokens)} tokens, the context holds {n_ctx}",
            prompt_tokens=len(tokens),
            n_ctx=n_ctx,
            policy=policy or "error",
        )


def compile_grammar(vocab: Any, args: GenerationRun) -> Any:
    """The request's ``grammar`` (GBNF) or ``json_schema`` as a llama.cpp grammar; None when it has neither.
    Raises BadRequest naming what does not compile (tried here: llama.cpp takes a broken grammar silently)."""
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    grammar, schema = args.grammar, args.json_schema
    if grammar is None and schema is None:
        return None
    what = "grammar" if grammar is not None else "json_schema"
    try:
        text = grammar if grammar is not None else json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # a schema the converter does not support
        raise BadRequest(f"the json_schema cannot be turned into a grammar: {exc}", field=what) from None
    trial = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
    if not trial:
        raise BadRequest(f"the {what} does not compile (llama.cpp's GBNF, with a `root` rule)", field=what)
    llama_cpp.llama_sampler_free(trial)
    return LlamaGrammar.from_string(text, verbose=False)
