"""The manager's operations: check each request's arguments against the limits, then hand it to the lifecycle.

Every check that can refuse a request cheaply happens here, before a worker spends time on it; a refusal is a
typed error raised to the broker, which answers it. Nothing here touches a socket or a process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from model_client import protocol
from model_client.errors import BadRequest, InvalidAudio, ModelNotFound
from model_manager import worker_protocol as wire
from model_manager.config import Config
from model_manager.footprint import gguf_metadata
from model_manager.lifecycle import Lifecycle
from model_manager.live_catalogue import LiveCatalogue
from model_manager.pulls.tracker import Pulls, PullWaiter
from model_manager.slots import Job, ModelSlot, Waiter
from model_manager.status import model_entry
from model_manager.worker_events import Outbox

Handler = Callable[[list[bytes], protocol.Request, Any], None]


class Ops:
    def __init__(
        self,
        config: Config,
        lifecycle: Lifecycle,
        outbox: Outbox,
        status: Callable[[], dict],
        catalogue: LiveCatalogue,
        pulls: Pulls,
    ) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.slots = lifecycle.slots
        self.outbox = outbox
        self.status = status
        self.catalogue = catalogue
        self.pulls = pulls
        self._metadata: dict[str, dict[str, Any]] = {}  # GGUF header fields by file identity, for `show`
        self.handlers: dict[str, Handler] = {
            "ping": self.ping,
            "status": self.report_status,
            "models": self.models,
            "load": self.load,
            "unload": self.unload,
            "chat": self.generate,
            "complete": self.generate,
            "conversation.drop": self.drop_conversation,
            "embed": self.embed,
            "transcribe": self.transcribe,
            "synthesize": self.synthesize,
            "pull": self.pull,
            "remove": self.remove,
            "copy": self.copy,
            "show": self.show,
            "reload": self.reload,
            "pin": self.pin,
        }

    def run(self, route: list[bytes], request: protocol.Request, args: Any) -> None:
        """Run ``request`` (its arguments already parsed); raises the typed error that refuses it."""
        self.handlers[request.op](route, request, args)

    def _reply(self, route: list[bytes], request: protocol.Request, result: Any) -> None:
        self.outbox.send(route, protocol.encode_result(request.id, result))

    # ----- the manager itself ---------------------------------------------------------------------------------

    def ping(self, route: list[bytes], request: protocol.Request, _args: Any) -> None:
        self._reply(route, request, {"pong": True, "protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid()})

    def report_status(self, route: list[bytes], request: protocol.Request, _args: Any) -> None:
        self._reply(route, request, self.status())

    def models(self, route: list[bytes], request: protocol.Request, _args: Any) -> None:
        self._reply(route, request, {"models": self.catalogue.entries()})

    def pin(self, route: list[bytes], request: protocol.Request, args: protocol.PinArgs) -> None:
        """Pin (never evicted, never unloaded for idleness) or unpin a model while the manager runs; the YAML's
        ``pinned`` comes back on a restart."""
        slot = self.slot(args.model)
        slot.pin = args.pinned
        self.outbox.publish(protocol.EVENT_MODEL_PINNED, model=slot.name, pinned=args.pinned)
        self._reply(route, request, model_entry(slot, time.time()))

    # ----- the catalogue --------------------------------------------------------------------------------------

    def pull(self, route: list[bytes], request: protocol.Request, args: protocol.PullArgs) -> None:
        waiter = PullWaiter(route, request.id, stream=args.stream)
        self.pulls.start(waiter, args.ref, args.name, args.check, args.allow_no_fit)

    def remove(self, route: list[bytes], request: protocol.Request, args: protocol.ModelArgs) -> None:
        answer = self.catalogue.remove(args.model, Waiter(route, request.id))
        if answer is not None:
            self._reply(route, request, answer)

    def copy(self, route: list[bytes], request: protocol.Request, args: protocol.CopyArgs) -> None:
        self._reply(route, request, self.catalogue.copy(args.source, args.destination))

    def reload(self, route: list[bytes], request: protocol.Request, _args: Any) -> None:
        self._reply(route, request, self.catalogue.reload())

    def show(self, route: list[bytes], request: protocol.Request, args: protocol.ModelArgs) -> None:
        """A model's entry, where it came from, its aliases and, an LLM, its GGUF header's fields (chat template,
        architecture, context length, ...), read once per file."""
        slot = self.slot(args.model)
        entry = next(e for e in self.catalogue.entries() if e["name"] == args.model)
        entry["aliases"] = sorted(a for a, target in self.catalogue.aliases.items() if target == slot.name)
        if slot.spec.kind == "llm" and os.path.isfile(slot.spec.path):
            key = self.lifecycle.memory.store.file_key(slot.spec.path) or slot.spec.path
            if key not in self._metadata:
                try:
                    self._metadata[key] = gguf_metadata(slot.spec.path)
                except (OSError, ValueError) as exc:
                    self._metadata[key] = {"error": str(exc)}
            entry["gguf"] = self._metadata[key]
        self._reply(route, request, entry)

    def load(self, route: list[bytes], request: protocol.Request, args: protocol.LoadArgs) -> None:
        self.lifecycle.load(self.slot(args.model), Waiter(route, request.id), args.keep_alive_s)

    def unload(self, route: list[bytes], request: protocol.Request, args: protocol.ModelArgs) -> None:
        self.lifecycle.unload(self.slot(args.model), Waiter(route, request.id))

    # ----- work for a model -----------------------------------------------------------------------------------

    def generate(self, route: list[bytes], request: protocol.Request, args: protocol.GenerationArgs) -> None:
        limits = self.config.limits
        if args.max_tokens > limits.max_tokens:
            raise BadRequest(
                f"max_tokens {args.max_tokens} is over the limit of {limits.max_tokens}", max_tokens=limits.max_tokens
            )
        messages = len(getattr(args, "messages", ()))
        if messages > limits.max_messages:
            raise BadRequest(
                f"{messages} messages is over the limit of {limits.max_messages}", max_messages=limits.max_messages
            )
        if args.grammar is not None and args.json_schema is not None:
            raise BadRequest("give grammar or json_schema, not both")
        if isinstance(args, protocol.ChatArgs):
            check_tools(args)
        # Checked here, before a worker spends seconds tokenizing megabytes only to refuse them by token count.
        texts = [args.prompt] if isinstance(args, protocol.CompleteArgs) else [m.content for m in args.messages]
        prompt_bytes = sum(len(text.encode()) for text in texts)
        if prompt_bytes > limits.max_prompt_bytes:
            raise BadRequest(
                f"the prompt is {prompt_bytes} bytes, over the limit of {limits.max_prompt_bytes}",
                prompt_bytes=prompt_bytes,
                max_prompt_bytes=limits.max_prompt_bytes,
            )
        slot = self.kind_slot(args.model, "llm", request.op)
        self.lifecycle.enqueue(slot, job_for(route, request, args))

    def drop_conversation(self, route: list[bytes], request: protocol.Request, args: protocol.ConversationArgs) -> None:
        slot = self.kind_slot(args.model, "llm", request.op)
        self.lifecycle.drop_conversation(slot, Waiter(route, request.id), job_for(route, request, args))

    def embed(self, route: list[bytes], request: protocol.Request, args: protocol.EmbedArgs) -> None:
        texts = [args.input] if isinstance(args.input, str) else args.input
        total = sum(len(text.encode()) for text in texts)
        if total > self.config.limits.max_prompt_bytes:
            raise BadRequest(f"the input is {total} bytes, over the limit of {self.config.limits.max_prompt_bytes}")
        slot = self.kind_slot(args.model, "llm", request.op)
        self.lifecycle.enqueue(slot, job_for(route, request, args))

    def transcribe(self, route: list[bytes], request: protocol.Request, args: protocol.TranscribeArgs) -> None:
        slot = self.kind_slot(args.model, "stt", request.op)
        if not request.payloads:
            raise InvalidAudio("no audio: transcribe takes the audio in one binary frame after the envelope")
        if len(request.payloads) != 1:
            raise BadRequest(
                f"transcribe takes the audio in one binary frame after the envelope, got {len(request.payloads)}"
            )
        if not request.payloads[0]:
            raise InvalidAudio("the audio frame is empty")
        self.lifecycle.enqueue(slot, job_for(route, request, args, audio=request.payloads[0]))

    def synthesize(self, route: list[bytes], request: protocol.Request, args: protocol.SynthesizeArgs) -> None:
        if not args.text.strip():
            raise BadRequest("text is empty: there is nothing to say")
        if "\x00" in args.text:
            raise BadRequest("text holds a NUL character")
        limit = self.config.limits.max_text_chars
        if len(args.text) > limit:
            raise BadRequest(f"text is {len(args.text)} characters, over the limit of {limit}", max_text_chars=limit)
        if args.stream and args.format != "pcm":
            raise BadRequest("streamed speech is raw PCM: ask for format 'pcm' with stream, or 'wav' without")
        try:
            slot = self.kind_slot(args.voice, "tts", request.op)
        except ModelNotFound as exc:
            voices = [name for name, s in self.slots.items() if s.spec.kind == "tts"]
            message = f"voice {args.voice!r} is not in the catalogue"
            raise ModelNotFound(message, voice=args.voice, available=voices) from exc
        self.lifecycle.enqueue(slot, job_for(route, request, args))

    # ----- which model ----------------------------------------------------------------------------------------

    def slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(self.catalogue.resolve(name))
        if slot is None:
            raise ModelNotFound(f"model {name!r} is not in the catalogue", model=name, available=sorted(self.slots))
        return slot

    def kind_slot(self, name: str | None, kind: str, op: str) -> ModelSlot:
        """The named catalogue model, which must be of ``kind``; None: the catalogue's first model of it."""
        if name is None:
            for slot in self.slots.values():
                if slot.spec.kind == kind:
                    return slot
            raise ModelNotFound(f"the catalogue has no {kind} model for {op!r}", kind=kind)
        slot = self.slot(name)
        if slot.spec.kind != kind:
            raise BadRequest(f"{op!r} needs a model of kind {kind}; {name!r} is {slot.spec.kind}", model=name)
        return slot


def job_for(route: list[bytes], request: protocol.Request, args: Any, **extra: Any) -> Job:
    """The queued form of a request: its arguments as the worker reads them, its priority and its deadline."""
    job = Job(route=route, request_id=request.id, op=request.op, args=wire.run_args(request.op, args, **extra))
    job.keep_alive_s = getattr(args, "keep_alive_s", None)  # the manager's business (the worker ignores it)
    job.priority = protocol.PRIORITY_NORMAL if request.priority is None else request.priority
    if request.deadline_ms is not None:
        job.deadline = job.received_at + request.deadline_ms / 1000
    return job


def check_tools(args: protocol.ChatArgs) -> None:
    """Tools are sampled under a schema of their own: not with another grammar; a chosen tool must be given."""
    choice = args.tool_choice
    if not args.tools:
        if choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice asks for a call, but no tools are given", field="tool_choice")
        return
    if choice != "none" and (args.grammar is not None or args.json_schema is not None):
        raise BadRequest("tools are sampled under their own schema: give tools or grammar/json_schema, not both")
    names = [tool.function.name for tool in args.tools]
    if len(set(names)) != len(names):
        raise BadRequest("two tools have the same name", field="tools")
    if isinstance(choice, protocol.ToolChoice) and choice.function.name not in names:
        message = f"tool_choice names {choice.function.name!r}, which is not among the tools"
        raise BadRequest(message, field="tool_choice")
