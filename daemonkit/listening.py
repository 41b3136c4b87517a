"""TCP listening sockets for the network front ends: bound by the daemon itself, port 0 meaning any free one, and
the ports it got written where its starter reads them.

A starter that picks a free port and passes it on races every other process on the machine for it (a suite run
beside another stack lost that race now and then: `address already in use`). Binding port 0 and reporting the
port leaves no gap between choosing and binding.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def listen_tcp(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: any free port), IPv6 when the host is an IPv6 address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
    sock.setblocking(False)
    return sock


def bound_port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def write_ports_file(path: Path | None, ports: dict[str, int]) -> None:
    """``{name: port}`` as JSON, written whole (a reader never sees half a file), once every socket listens."""
    if path is None:
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(ports))
    os.replace(partial, path)
