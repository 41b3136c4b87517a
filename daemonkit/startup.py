"""The start of every daemon built on the client (the services, the persona agents): command line, config, logs,
and the wait for the manager."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from daemonkit.binding import CurveServer, server_from_config
from daemonkit.logs import configure_logging
from daemonkit.memory import return_freed_memory
from model_client.client import ModelClient
from model_client.endpoints import config_path, configured_endpoints

Settings = TypeVar("Settings")


def parser_for(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, default=config_path(), help="YAML config (default: %(default)s)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    parser.add_argument(
        "--ports-file",
        type=Path,
        help="a daemon that serves TCP writes the ports it listens on here as JSON (with port 0 in the YAML: any)",
    )
    return parser


def start_daemon(
    prog: str,
    description: str,
    argv: list[str] | None,
    load: Callable[[argparse.Namespace], Settings],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Settings, str, CurveServer | None]:
    """Parse the command line, read the daemon's settings with ``load`` (a bad YAML ends it with exit 2 and one
    line), set up logs, wait for the manager; return the settings, the manager's endpoint and the CURVE keys."""
    parser = parser_for(prog, description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    return_freed_memory()  # before any thread (ZeroMQ's I/O) allocates
    try:
        settings = load(args)
        manager = configured_endpoints(args.config)["requests"]
        curve = server_from_config(args.config)
    except (OSError, ValueError, KeyError) as exc:
        print(f"{prog}: {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(args.log_level)
    wait_for_manager(manager, prog)
    return settings, manager, curve


def wait_for_manager(endpoint: str, who: str) -> None:
    """Started beside the manager (supervisord starts everything at once): wait for its ``ping``, don't fail."""
    log = structlog.get_logger(who)
    announced = [0.0]

    def waiting(seconds: float) -> None:
        if seconds - announced[0] >= 5.0:
            announced[0] = seconds
            log.info("waiting_for_manager", endpoint=endpoint, waited_s=round(seconds, 1))

    with ModelClient(endpoint, retries=0) as client:
        reply = client.wait_ready(on_wait=waiting)
    log.info("manager_ready", endpoint=endpoint, manager_pid=reply.get("pid"))
