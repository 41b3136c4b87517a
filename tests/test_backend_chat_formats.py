"""A chat format without a system role keeps the system prompt: at the head of the first user turn, as llama.cpp's
own templates for such models (Gemma's) write it. llama-cpp-python's ``gemma`` format alone drops it."""

from __future__ import annotations

from llama_cpp import llama_chat_format

from model_manager.backends.llm.prompt import chat_formatter, keeps_system

TURNS = [
    {"role": "system", "content": "You are Jarvis."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "more"},
]


def test_the_gemma_format_keeps_the_system_prompt_in_the_first_user_turn() -> None:
    assert not keeps_system(llama_chat_format.format_gemma)  # the planted fault: llama-cpp-python's own drops it
    prompt = chat_formatter(None, {}, "gemma")(messages=TURNS).prompt
    assert prompt == (
        "<start_of_turn>user\nYou are Jarvis.\n\nhello there<end_of_turn>\n<start_of_turn>model\nHi!<end_of_turn>\n"
        "<start_of_turn>user\nmore<end_of_turn>\n<start_of_turn>model\n"
    )


def test_a_system_prompt_alone_becomes_a_user_turn() -> None:
    prompt = chat_formatter(None, {}, "gemma")(messages=TURNS[:1]).prompt
    assert "You are Jarvis." in prompt


def test_formats_with_a_system_role_are_left_as_they_are() -> None:
    formatter = chat_formatter(None, {}, "chatml")
    assert formatter is llama_chat_format.format_chatml
    assert "<|im_start|>system\nYou are Jarvis.<|im_end|>" in formatter(messages=TURNS).prompt
