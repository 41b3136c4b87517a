"""Stored responses of OpenAI's Responses API: what ``GET /v1/responses/{id}`` returns and what a later request's
``previous_response_id`` continues (its conversation's messages and the conversation id whose KV cache the manager
keeps).

One JSON file per response in ``gateway.responses_dir``, so a conversation survives a restart of the gateway; the
most recent ones are also kept in memory. At most ``max_stored`` responses are kept: the oldest files go first.
Without a directory, the store is in memory only (and bounded the same way).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec

RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}$")  # the ids this gateway makes: safe as file names
MEMORY_ENTRIES = 256


class StoredResponse(msgspec.Struct, kw_only=True):
    response: dict[str, Any]  # the response object, as the API returned it
    conversation_id: str  # the manager's conversation: every response of one chain shares it
    messages: list[dict[str, Any]]  # the conversation so far (without the instructions), the reply included
    tool_names: dict[str, str] = {}  # call id -> function name, for a later function_call_output


class ResponseStore:
    def __init__(self, directory: Path | None, max_stored: int) -> None:
        self.directory = directory
        self.max_stored = max_stored
        self.memory: OrderedDict[str, StoredResponse] = OrderedDict()
        self.files = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self.files = sum(1 for _ in directory.glob("resp_*.json"))

    def get(self, response_id: str) -> StoredResponse | None:
        if not RESPONSE_ID.match(response_id):
            return None
        if (stored := self.memory.get(response_id)) is not None:
            self.memory.move_to_end(response_id)
            return stored
        if self.directory is None:
            return None
        try:
            stored = msgspec.json.decode(self._path(response_id).read_bytes(), type=StoredResponse)
        except (OSError, msgspec.DecodeError):
            return None
        self._remember(response_id, stored)
        return stored

    def put(self, response_id: str, stored: StoredResponse) -> None:
        assert RESPONSE_ID.match(response_id), response_id
        self._remember(response_id, stored)
        if self.directory is None:
            return
        path = self._path(response_id)
        self.files += not path.exists()
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(msgspec.json.encode(stored))
        os.replace(temporary, path)  # a reader never sees half a file
        if self.files > self.max_stored:
            self._prune()

    def delete(self, response_id: str) -> bool:
        if not RESPONSE_ID.match(response_id):
            return False
        found = self.memory.pop(response_id, None) is not None
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(response_id).unlink()
                self.files -= 1
                found = True
        return found

    def _remember(self, response_id: str, stored: StoredResponse) -> None:
        self.memory[response_id] = stored
        self.memory.move_to_end(response_id)
        limit = self.max_stored if self.directory is None else min(MEMORY_ENTRIES, self.max_stored)
        while len(self.memory) > limit:
            self.memory.popitem(last=False)

    def _prune(self) -> None:
        """The oldest files go, down to nine tenths of the limit (so that a prune, which reads the directory, comes
        once in many puts)."""
        assert self.directory is not None
        files = sorted(self.directory.glob("resp_*.json"), key=lambda p: p.stat().st_mtime)
        keep = max(1, self.max_stored * 9 // 10)
        for path in files[: max(0, len(files) - keep)]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.memory.pop(path.stem, None)
        self.files = min(len(files), keep)

    def _path(self, response_id: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{response_id}.json"
