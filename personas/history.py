"""Each session's messages for one persona: the most recent sessions in memory, every session on disk (one JSON
file each), so a restarted agent or service goes on where it was."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import structlog

SESSIONS_IN_MEMORY = 256

log = structlog.get_logger("agents")


class Histories:
    def __init__(self, directory: Path | None, keep_messages: int, owner: str) -> None:
        self.directory = directory
        self.keep_messages = keep_messages
        self.owner = owner
        self.sessions: OrderedDict[str, list[dict[str, str]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.sessions)

    def path(self, session_id: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / (re.sub(r"[^A-Za-z0-9._-]+", "_", session_id)[:100] + ".json")

    def get(self, session_id: str) -> list[dict[str, str]]:
        """A copy of the session's messages (empty for a new session)."""
        if session_id not in self.sessions:
            path = self.path(session_id)
            messages: list[dict[str, str]] = []
            if path is not None and path.exists():
                try:
                    messages = json.loads(path.read_text(encoding="utf-8"))["messages"]
                except (OSError, ValueError, KeyError):
                    log.warning("history_unreadable", session_id=session_id, path=str(path))
            self.sessions[session_id] = messages
            if len(self.sessions) > SESSIONS_IN_MEMORY:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(session_id)
        return list(self.sessions[session_id])

    def save(self, session_id: str, messages: list[dict[str, str]]) -> None:
        messages = messages[-self.keep_messages :]
        self.sessions[session_id] = messages
        path = self.path(session_id)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"persona": self.owner, "messages": messages}, indent=1), encoding="utf-8")
        tmp.replace(path)
