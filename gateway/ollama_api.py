"""Ollama's API, the subset Home Assistant's Ollama integration and editors' Ollama providers call: version, tags,
ps, show, chat and generate (NDJSON streams, streamed unless ``stream: false``), and pull (which never downloads:
it succeeds for a catalogue name, else 404). Model names may carry Ollama's ``:latest`` tag."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from gateway.body import decode, refuse_unserved
from gateway.errors import HttpError
from gateway.ollama_schema import (
    ChatBody,
    CopyBody,
    EmbedBody,
    GenerateBody,
    Generation,
    LegacyEmbedBody,
    ModelBody,
    OllamaMessage,
    Options,
    PullBody,
    keep_alive_seconds,
    name_of,
    unloads,
)
from gateway.watch import CLIENT_CLOSED, unless_gone
from model_client.aio import ManagerLink
from model_client.results import Completion, TextChunk

VERSION = "0.9.0"  # the Ollama API version whose subset is served


def _args(body: Generation) -> dict[str, Any]:
    args: dict[str, Any] = {"model": name_of(body.model)}
    options = body.options or Options()
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop"):
        if (value := getattr(options, name)) is not None:
            args[name] = value
    if options.num_predict is not None and options.num_predict > 0:
        args["max_tokens"] = options.num_predict
    if body.format == "json":
        args["json_schema"] = {"type": "object"}
    elif isinstance(body.format, dict):
        args["json_schema"] = body.format
    if (keep := keep_alive_seconds(body.keep_alive)) is not None:
        args["keep_alive_s"] = keep
    return args


def _turn(message: OllamaMessage) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [
            {"function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"].get("arguments", {}))}}
            for c in message.tool_calls
            if isinstance(c.get("function"), dict) and "name" in c["function"]
        ]
    if message.tool_name:
        turn["name"] = message.tool_name
    return turn


def _ollama_calls(result: Completion) -> list[dict[str, Any]]:
    return [
        {"function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
        for c in result.tool_calls
    ]


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": entry.get("architecture") or "",
        "families": None,
        "parameter_size": "",
        "quantization_level": entry.get("quantization") or "",
    }


class Ollama:
    def __init__(self, link: ManagerLink) -> None:
        self.link = link

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def _llms(self) -> list[dict[str, Any]]:
        return [m for m in (await self.link.request("models", {}, timeout_s=5.0))["models"] if m["kind"] == "llm"]

    async def tags(self, request: Request) -> Response:
        models = [
            {
                "name": m["name"],
                "model": m["name"],
                "modified_at": _now(),
                "size": m.get("file_bytes") or 0,
                "digest": "",
                "details": _details(m),
            }
            for m in await self._llms()
        ]
        return JSONResponse({"models": models})

    async def ps(self, request: Request) -> Response:
        status = await self.link.request("status", {}, timeout_s=5.0)
        running = []
        for m in status["models"]:
            if m["kind"] != "llm" or m["state"] != "ready":
                continue
            left = m.get("ttl_left_s")
            expires = datetime.fromtimestamp(time.time() + (left if left is not None else 10 * 365 * 86400), UTC)
            vram = sum(b for device, b in (m.get("placements") or {}).items() if device != "cpu")
            running.append(
                {
                    "name": m["name"],
                    "model": m["name"],
                    "size": m["size_bytes"] or 0,
                    "size_vram": vram,  # the GPU share (all of it unless partly offloaded)
                    "digest": "",
                    "details": _details(m),
                    "expires_at": expires.isoformat().replace("+00:00", "Z"),
                    "context_length": m.get("n_ctx") or 0,
                }
            )
        return JSONResponse({"models": running})

    async def show(self, request: Request) -> Response:
        name = (await decode(request, ModelBody)).chosen
        entry = await self.link.request("show", {"model": name}, timeout_s=10.0)
        if entry["kind"] != "llm":
            raise HttpError(404, f"model '{name}' not found")
        header = entry.get("gguf") or {}
        architecture = header.get("general.architecture") or "llama"
        info = {k: v for k, v in header.items() if k != "tokenizer.chat_template" and isinstance(v, int | float | str)}
        info.setdefault(f"{architecture}.context_length", entry["n_ctx"])
        parameters = [f"num_ctx {entry['n_ctx']}"] + [f"stop {s}" for s in entry.get("stop") or []]
        return JSONResponse(
            {
                "modelfile": f"FROM {entry['path']}\n",
                "parameters": "\n".join(parameters),
                "template": header.get("tokenizer.chat_template") or "",
                "details": _details(entry),
                "model_info": info,
                "capabilities": ["completion", "tools", "embedding"],
                "modified_at": _now(),
            }
        )

    async def pull(self, request: Request) -> Response:
        """Fetch a model by reference (``hf.co/ORG/REPO:QUANT``, ``hf://``, a URL) through the manager, with
        progress in Ollama's shape; a name already in the catalogue answers ``success`` at once."""
        body = await decode(request, PullBody)
        name = body.chosen
        if name in {m["name"] for m in (await self.link.request("models", {}, timeout_s=5.0))["models"]}:
            lines = [{"status": "pulling manifest"}, {"status": "success"}]
            return (
                StreamingResponse(_lines(lines), media_type="application/x-ndjson")
                if body.stream
                else JSONResponse(lines[-1])
            )
        if not name.startswith(PULLABLE):
            raise HttpError(
                404,
                f"pull model manifest: {name!r} is not in the catalogue, and only hf.co/ORG/REPO:QUANT, "
                "hf://ORG/REPO/FILE and https:// references are pulled here (no Ollama registry)",
            )
        replies = self.link.replies("pull", {"ref": name, "stream": True}, timeout_s=PULL_QUIET_S)
        first = await anext(replies)  # a refused reference is an HTTP error, before any line is sent
        if not body.stream:
            async for _ in replies:
                pass
            return JSONResponse({"status": "success"})
        return StreamingResponse(_pull_lines(first.body, replies), media_type="application/x-ndjson")

    async def delete(self, request: Request) -> Response:
        await self.link.request("remove", {"model": (await decode(request, ModelBody)).chosen}, timeout_s=60.0)
        return Response(status_code=200)

    async def copy(self, request: Request) -> Response:
        body = await decode(request, CopyBody)
        await self.link.request("copy", {"source": name_of(body.source), "destination": body.destination})
        return Response(status_code=200)

    async def chat(self, request: Request) -> Response:
        body = await decode(request, ChatBody)
        refuse_unserved(body, "think")
        for index, message in enumerate(body.messages):
            if message.images:
                raise HttpError(400, "images are not served: no model here sees them", f"messages[{index}].images")
        if not body.messages:  # Ollama's way to load a model (or, with keep_alive 0, to unload it)
            return await self._load_or_unload(body)
        args = {**_args(body), "messages": [_turn(m) for m in body.messages]}
        if body.tools:
            args["tools"] = body.tools
        if cid := request.headers.get("x-conversation-id"):
            args["conversation_id"] = cid
        return await self._generate(request, body, "chat", args)

    async def generate(self, request: Request) -> Response:
        body = await decode(request, GenerateBody)
        if body.images:
            raise HttpError(400, "images are not served: no model here sees them", "images")
        refuse_unserved(body, "think", "suffix", "template", "context")
        if not body.prompt:
            return await self._load_or_unload(body)
        args = _args(body)
        if body.system:
            turns = [{"role": "system", "content": body.system}, {"role": "user", "content": body.prompt}]
            return await self._generate(request, body, "chat", {**args, "messages": turns}, field="response")
        return await self._generate(request, body, "complete", {**args, "prompt": body.prompt}, field="response")

    async def embed(self, request: Request) -> Response:
        body = await decode(request, EmbedBody)
        started = time.perf_counter_ns()
        args: dict[str, Any] = {"model": name_of(body.model), "input": body.input}
        if (keep := keep_alive_seconds(body.keep_alive)) is not None:
            args["keep_alive_s"] = keep
        result = await self.link.request("embed", args)
        await self._after(body)
        return JSONResponse(
            {
                "model": body.model,
                "embeddings": result["embeddings"],
                "total_duration": time.perf_counter_ns() - started,
                "load_duration": 0,
                "prompt_eval_count": result["usage"]["prompt_tokens"],
            }
        )

    async def embeddings(self, request: Request) -> Response:
        body = await decode(request, LegacyEmbedBody)
        if not body.prompt:  # Ollama answers an empty prompt with an empty vector
            return JSONResponse({"embedding": []})
        args: dict[str, Any] = {"model": name_of(body.model), "input": body.prompt, "normalize": False}
        if (keep := keep_alive_seconds(body.keep_alive)) is not None:
            args["keep_alive_s"] = keep
        result = await self.link.request("embed", args)
        await self._after(body)
        return JSONResponse({"embedding": result["embeddings"][0]})

    async def _load_or_unload(self, body: Generation) -> Response:
        name = name_of(body.model)
        keep = keep_alive_seconds(body.keep_alive)
        op = "unload" if keep == 0 else "load"
        args: dict[str, Any] = {"model": name}
        if op == "load" and keep is not None:
            args["keep_alive_s"] = keep
        await self.link.request(op, args)
        done = {"model": body.model, "created_at": _now(), "done": True, "done_reason": op}
        return JSONResponse({**done, "message": {"role": "assistant", "content": ""}, "response": ""})

    async def _generate(
        self, request: Request, body: Generation, op: str, args: dict[str, Any], field: str = "message"
    ) -> Response:
        started = time.perf_counter_ns()
        if not body.stream:  # streamed from the manager all the same: a client gone cancels it (gateway/watch.py)
            result = await unless_gone(request, self.link.completion(op, {**args, "stream": True}))
            if result is None:
                return Response(status_code=CLIENT_CLOSED)
            await self._after(body)
            answer = _final(body.model, result, started, field, result.text)
            if field == "message" and (calls := _ollama_calls(result)):
                answer["message"]["tool_calls"] = calls
            return JSONResponse(answer)
        replies = self.link.generation(op, {**args, "stream": True})
        first = await anext(replies)
        return StreamingResponse(self._ndjson(body, first, replies, started, field), media_type="application/x-ndjson")

    async def _ndjson(
        self,
        body: Generation,
        first: TextChunk | Completion,
        rest: AsyncIterator[TextChunk | Completion],
        started: int,
        field: str,
    ) -> AsyncIterator[bytes]:
        try:
            item, streamed = first, False
            while isinstance(item, TextChunk):
                if item.text:
                    streamed = True
                    piece = {"role": "assistant", "content": item.text} if field == "message" else item.text
                    yield _line({"model": body.model, "created_at": _now(), field: piece, "done": False})
                item = await anext(rest)
            if calls := _ollama_calls(item):  # with tools, the answer comes in the result only
                message = {"role": "assistant", "content": "", "tool_calls": calls}
                yield _line({"model": body.model, "created_at": _now(), "message": message, "done": False})
            elif not streamed and item.text:
                piece = {"role": "assistant", "content": item.text} if field == "message" else item.text
                yield _line({"model": body.model, "created_at": _now(), field: piece, "done": False})
            yield _line(_final(body.model, item, started, field, ""))
        except Exception as exc:
            yield _line({"error": getattr(exc, "message", str(exc))})
        finally:
            await rest.aclose()
        await self._after(body)

    async def _after(self, body: Generation | EmbedBody | LegacyEmbedBody) -> None:
        if unloads(body.keep_alive):
            await self.link.request("unload", {"model": name_of(body.model)})


def _final(model: str, result: Completion, started: int, field: str, text: str) -> dict[str, Any]:
    usage, timings = result.usage, result.timings
    total_ms, first_ms = timings.total_ms, timings.ttft_ms
    return {
        "model": model,
        "created_at": _now(),
        field: {"role": "assistant", "content": text} if field == "message" else text,
        "done": True,
        "done_reason": "length" if result.finish_reason == "length" else "stop",
        "total_duration": time.perf_counter_ns() - started,
        "load_duration": 0,
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": int(first_ms * 1e6),
        "eval_count": usage.completion_tokens,
        "eval_duration": int(max(0.0, total_ms - first_ms) * 1e6),
    }


PULLABLE = ("hf.co/", "huggingface.co/", "hf://", "https://", "http://")
PULL_QUIET_S = 600.0  # the longest a pull may go without a word (its progress comes every quarter second)


def _ollama_progress(chunk: dict[str, Any]) -> dict[str, Any] | None:
    """A manager pull chunk as Ollama's pull progress line (None: nothing to say in that shape)."""
    status = chunk.get("status")
    if status in ("resolving", "resolved"):
        return {"status": "pulling manifest"}
    if status == "fit":
        where = f"on {chunk['device']}" if chunk.get("fits") else f"nowhere now ({chunk.get('reason')})"
        evicting = f", evicting {', '.join(chunk['evicts'])}" if chunk.get("evicts") else ""
        return {"status": f"fits {where}{evicting}", "total": chunk.get("total")}
    if status == "downloading":
        file = chunk.get("file", "")
        return {"status": f"pulling {file}", "digest": file, "total": chunk["total"], "completed": chunk["completed"]}
    if status == "verified":
        return {"status": "verifying sha256 digest", "digest": f"sha256:{chunk['sha256']}"}
    return None


async def _pull_lines(first: dict[str, Any], rest: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    try:
        if (line := _ollama_progress(first)) is not None:
            yield _line(line)
        async for reply in rest:
            if reply.is_final:
                yield _line({"status": "writing manifest"})
                yield _line({"status": "success"})
            elif (line := _ollama_progress(reply.body)) is not None:
                yield _line(line)
    except Exception as exc:
        yield _line({"error": getattr(exc, "message", str(exc))})
    finally:
        await rest.aclose()


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


async def _lines(items: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for item in items:
        yield _line(item)
